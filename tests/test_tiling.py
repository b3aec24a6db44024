"""anim_lab.tiling against diffusers' tiled encode/decode of AutoencoderKLHunyuanVideo on the same weights and
tile settings, the blend formula written out, and the working memory it promises."""

import pytest
import torch

from anim_lab import inspect, tiling
from anim_lab.inspect import PeakMemory
from anim_lab.tiling import (
    TileSettings,
    blend,
    spatial_tiled_decode,
    spatial_tiled_encode,
    temporal_tiled_decode,
    temporal_tiled_encode,
    tiled_decode,
)

# tiles of 32 px (4 latents) every 24 px, windows of 8 frames (2 latents) every 4: small enough for a tiny
# video to need several tiles in both space and time
TILES = TileSettings(32, 32, 24, 24, 8, 4)


def _diffusers(ref, spatial: bool, temporal: bool):
    ref.use_tiling = spatial
    ref.use_framewise_encoding = ref.use_framewise_decoding = temporal
    ref.tile_sample_min_height = ref.tile_sample_min_width = 32
    ref.tile_sample_stride_height = ref.tile_sample_stride_width = 24
    ref.tile_sample_min_num_frames, ref.tile_sample_stride_num_frames = 8, 4
    return ref


@pytest.mark.parametrize(
    "spatial, temporal, shape",
    [(True, False, (5, 56, 40)), (False, True, (17, 16, 16)), (True, True, (9, 40, 56))],
    ids=["space", "time", "space+time"],
)
def test_tiled_encode_decode_match_diffusers(pair, spatial, temporal, shape):
    ref, ours = pair
    ref = _diffusers(ref, spatial, temporal)
    tiles = TileSettings(32, 32, 24, 24, 8, 4, spatial=spatial, temporal=temporal)
    x = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(sum(shape))) * 2 - 1  # [-1, 1]
    with torch.no_grad():
        mean_ref = ref.encode(x).latent_dist.mean
        mean = ours.encode(x, tiling=tiles).mean
        torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=0)
        video = ours.decode(mean_ref, tiling=tiles)
        torch.testing.assert_close(video, ref.decode(mean_ref).sample, atol=1e-5, rtol=0)
        untiled = ours.decode(mean_ref)
    assert video.shape == untiled.shape == x.shape
    assert (video - untiled).abs().max() > 1e-3  # the tiles really were decoded apart


def test_one_tile_is_the_untiled_pass(pair):
    _, ours = pair
    z = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(
            ours.decode(z, tiling=TILES), ours.decode(z)
        )  # 24 px < one 32 px tile, 5 frames < 8


def test_blend_is_a_linear_ramp():
    a = torch.arange(6.0).view(1, 6) + 100  # previous tile; its last 4 columns overlap the new tile
    b = torch.zeros(1, 5)
    out = blend(a, b.clone(), 4, dim=-1)
    expected = torch.tensor([[102 * 1.0, 103 * 0.75, 104 * 0.5, 105 * 0.25, 0.0]])
    torch.testing.assert_close(out, expected)


def test_no_blend_cuts_hard_at_the_stride(pair):
    """blend=False: every kept pixel is the raw decode of the tile it belongs to."""
    _, ours = pair
    # one row of tiles (3 latents high), tiles across at latent columns 0..3, 3..6, 6
    z = torch.randn(1, 4, 1, 3, 7, generator=torch.Generator().manual_seed(2))
    hard = TileSettings(32, 32, 24, 24, spatial=True, temporal=False, blend=False)
    with torch.no_grad():
        video = ours.decode(z, tiling=hard)
        left, right = ours.decode(z[..., :4]), ours.decode(z[..., 3:])
    assert torch.equal(video[..., :24], left[..., :24])
    assert torch.equal(video[..., 24:48], right[..., :24])
    assert (
        video[..., 24:32] - left[..., 24:32]
    ).abs().max() > 1e-3  # the overlap columns of the left tile are dropped


def test_temporal_tiling_keeps_working_memory_flat(pair):
    """Peak memory minus the output: about the same for 17 and 33 frames when decoding in windows."""
    _, ours = pair
    tiles = TileSettings(32, 32, 24, 24, 8, 4)
    working = {}
    for t_lat in (5, 9):
        z = torch.randn(1, 4, t_lat, 3, 3)
        with torch.no_grad(), PeakMemory() as mem:
            video = tiled_decode(ours, z, tiles)
        working[t_lat] = mem.peak - video.numel() * video.element_size()
        with torch.no_grad(), PeakMemory() as mem_full:
            full = ours.decode(z)
        working[("untiled", t_lat)] = mem_full.peak - full.numel() * full.element_size()
    assert working[9] <= 1.1 * working[5]
    assert working[("untiled", 9)] > 1.5 * working[("untiled", 5)]


def test_peak_memory_counts_live_tensors():
    with PeakMemory() as mem:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # +4000
        del b
        c = a + 1  # +4000 again; peak stays 8000
    assert (mem.peak, mem.current) == (8000, 8000)
    del c


SMALL = {
    "tile_sample_min_height": 32,
    "tile_sample_min_width": 32,
    "tile_sample_stride_height": 24,
    "tile_sample_stride_width": 24,
}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"tile_sample_min_height": 16, "tile_sample_stride_height": 24},
            ValueError,
            "smaller than its stride",
        ),
        ({"tile_sample_stride_width": 0}, ValueError, "must be > 0"),
        ({"tile_sample_min_num_frames": -4}, ValueError, "must be > 0"),
        ({"tile_sample_min_height": 32.5}, TypeError, "must be an int"),
        ({"blend": "yes"}, TypeError, "True or False"),
    ],
)
def test_invalid_tile_settings_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        TileSettings(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_sample_min_height": 36, "tile_sample_stride_height": 28},
        {"tile_sample_min_num_frames": 6, "tile_sample_stride_num_frames": 4},
    ],
)
def test_tiles_off_the_latent_grid_fail_before_any_work(pair, kwargs):
    """Multiples of the VAE's ratios are checked with the VAE: by decode/encode and by every public tiled
    function."""
    _, ours = pair
    tiles = TileSettings(**{**SMALL, **kwargs})
    z, x = torch.zeros(1, 4, 2, 6, 6), torch.zeros(1, 3, 5, 48, 48)
    calls = [
        lambda: ours.decode(z, tiling=tiles),
        lambda: ours.encode(x, tiling=tiles),
        lambda: spatial_tiled_decode(ours, z, tiles),
        lambda: spatial_tiled_encode(ours, x, tiles),
        lambda: temporal_tiled_decode(ours, z, tiles),
        lambda: temporal_tiled_encode(ours, x, tiles),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="multiples of the VAE's compression ratio"):
            call()


def test_public_tiled_functions_validate_a_stride_larger_than_the_tile(pair):
    """Settings that slipped past construction (a frozen dataclass edited in place) are still refused by the
    public functions, with the reason, instead of torch's 'narrow(): length must be non-negative'."""
    _, ours = pair
    tiles = TileSettings(**SMALL)
    object.__setattr__(tiles, "tile_sample_stride_height", 40)
    z, x = torch.zeros(1, 4, 2, 6, 6), torch.zeros(1, 3, 5, 48, 48)
    for call in (
        lambda: spatial_tiled_decode(ours, z, tiles),
        lambda: spatial_tiled_encode(ours, x, tiles),
        lambda: temporal_tiled_decode(ours, z, tiles),
        lambda: temporal_tiled_encode(ours, x, tiles),
    ):
        with pytest.raises(ValueError, match="smaller than its stride 40 .* leave gaps"):
            call()


def test_peak_memory_lives_in_inspect():
    assert tiling.PeakMemory is inspect.PeakMemory
