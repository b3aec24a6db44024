"""anim_lab.vae: encode/decode conventions, chunked video helpers, the scaling factor, the latent preview,
loading."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from einops import rearrange

from anim_lab import configs
from anim_lab import vae as V
from anim_lab.causal_vae import CausalVAE


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(**configs.TINY.vae).eval()


def _images(b=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@torch.no_grad()
def test_encode_mean_and_sample(tiny_vae):
    x = _images()
    dist = tiny_vae.encode(x).latent_dist
    s = tiny_vae.config.scaling_factor
    torch.testing.assert_close(V.encode(tiny_vae, x), dist.mean * s)
    # a sample is mean + std * eps, with eps drawn from the generator: recompute eps independently
    z = V.encode(tiny_vae, x, sample=True, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (dist.mean + dist.std * eps) * s)
    assert not torch.allclose(z, dist.mean * s)
    assert z.shape == (2, 4, 4, 4)


@torch.no_grad()
def test_decode_undoes_the_scaling(tiny_vae):
    x = _images()
    expected = tiny_vae(x, sample_posterior=False).sample.clamp(
        -1, 1
    )  # diffusers' own forward: mean -> decode
    for s in (0.18215, 1.0, 3.0):
        out = V.decode(tiny_vae, V.encode(tiny_vae, x, scaling_factor=s), scaling_factor=s)
        torch.testing.assert_close(out, expected)


@torch.no_grad()
def test_video_helpers_match_one_call(tiny_vae):
    video = rearrange(_images(b=2 * 5, seed=1), "(b f) c h w -> b c f h w", b=2)  # (2, 3, 5, 32, 32)
    frames = rearrange(video, "b c f h w -> (b f) c h w")
    one_call = rearrange(V.encode(tiny_vae, frames), "(b f) c h w -> b c f h w", b=2)
    for chunk in (1, 3, 16):
        lat = V.encode_video(tiny_vae, video, chunk_size=chunk)
        assert lat.shape == (2, 4, 5, 4, 4)
        torch.testing.assert_close(lat, one_call, atol=1e-5, rtol=1e-4)
    decoded = V.decode_video(tiny_vae, one_call, chunk_size=2)
    expected = rearrange(
        V.decode(tiny_vae, rearrange(one_call, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", b=2
    )
    assert decoded.shape == video.shape
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-4)


def test_scaling_factor_is_one_over_std():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 8, 8, generator=g) * 5.49 + 0.3
    f = V.scaling_factor_from_latents(latents)
    assert f == pytest.approx(1.0 / latents.numpy().std(ddof=1), rel=1e-5)
    assert f == pytest.approx(0.18215, rel=0.02)  # a std of 5.49 is SD's documented factor
    assert (latents * f).std().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="more than one"):
        V.scaling_factor_from_latents(torch.ones(1))


def test_latent_preview_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 6, 6, generator=g)
    w, bias = torch.randn(4, 3, generator=g) * 0.2, torch.tensor([0.1, -0.2, 0.05])
    small = torch.einsum("bchw,cd->bdhw", latents, w) + bias[None, :, None, None]  # (B, 3, 6, 6)
    images = torch.repeat_interleave(
        torch.repeat_interleave(small, 8, dim=2), 8, dim=3
    )  # constant 8x8 blocks
    prev = V.LatentPreview.fit(latents, images)
    torch.testing.assert_close(prev.weight, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prev.bias, bias, atol=1e-4, rtol=1e-4)
    assert prev(latents).shape == (3, 3, 6, 6)


@torch.no_grad()
def test_save_and_load_folder(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path / "vae")
    loaded = V.load_vae(tmp_path / "vae")
    x = _images()
    torch.testing.assert_close(V.encode(loaded, x), V.encode(tiny_vae, x))
    assert not any(p.requires_grad for p in loaded.parameters())
    # a pipeline folder with a vae/ subfolder
    loaded = V.load_vae(tmp_path, subfolder="vae")
    assert loaded.config.latent_channels == 4


def test_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        V.load_vae(tmp_path / "nowhere")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(configs.TINY.vae))
    with pytest.raises(FileNotFoundError, match="incomplete: missing diffusion_pytorch_model"):
        V.load_vae(tmp_path / "vae")


def test_bad_inputs(tiny_vae):
    x = _images()
    with pytest.raises(ValueError, match="encode_video"):
        V.encode(tiny_vae, rearrange(x, "(b f) c h w -> b c f h w", f=1))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        V.encode(tiny_vae, (x + 1) * 127.5)  # [0, 255]
    with pytest.raises(TypeError, match="floating point"):
        V.encode(tiny_vae, ((x + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="multiples of 8"):
        V.encode(tiny_vae, _images(h=36, w=32))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        V.encode(tiny_vae, x[:, :2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        V.encode(tiny_vae, x.numpy())
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        V.encode_video(tiny_vae, x)
    with pytest.raises(ValueError, match="4 channels"):
        V.decode_video(tiny_vae, torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="decode_video"):
        V.decode(tiny_vae, torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="latent channels"):
        V.decode(tiny_vae, torch.zeros(1, 3, 4, 4))


def test_sd15_vae_on_meta():
    vae = V.build_vae(configs.SD15.vae, device="meta")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD1.5 / sd-vae-ft-mse
    x = torch.empty(1, 3, 512, 512, device="meta")
    lat = V.encode(vae, x)
    assert lat.shape == (1, 4, 64, 64)
    video = V.decode_video(vae, torch.empty(1, 4, 3, 64, 64, device="meta"), chunk_size=2)
    assert video.shape == (1, 3, 3, 512, 512)
    assert vae.config.scaling_factor == 0.18215


def test_uint8_helpers_round_trip_and_match_the_formula():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)  # (N, H, W, 3)
    x = V.images_from_uint8(u8)  # (N, 3, H, W)
    expected = torch.from_numpy(u8.astype(np.float32)).movedim(-1, 1) / 127.5 - 1  # written out independently
    assert x.shape == (2, 3, 5, 4) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    np.testing.assert_array_equal(V.images_to_uint8(x), u8)
    with pytest.raises(ValueError, match="uint8 pictures"):
        V.images_from_uint8(u8.astype(np.float32))


# --- the range is decided by the values, at any size; NaN and inf never pass --------------------------------
@pytest.mark.parametrize("size", [8, 16, 64, 128])
def test_valid_bright_images_never_raise(size):
    V.check_images(torch.full((1, 3, size, size), 0.5))
    V.check_images(torch.full((1, 3, size, size), 1.0))
    V.check_images(torch.rand(1, 3, size, size))  # [0, 1] values are legal [-1, 1] values (documented)
    V.check_images(torch.rand(1, 3, size, size, dtype=torch.float64) * 2 - 1)


@pytest.mark.parametrize("size", [8, 16, 64, 128])
def test_out_of_range_always_raises(size):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    with pytest.raises(ValueError, match=r"look like \[0, 255\] pixels.*images_from_uint8"):
        V.check_images((x + 1) * 127.5)
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\], got values in \[-1\.[12]"):
        V.check_images(x * 1.2)
    y = x.clone()
    y[0, 0, 0, 0] = 1.01  # one pixel is enough
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        V.check_images(y)


def test_nan_and_inf_are_caught_at_every_entry_point(tiny_vae):
    x = _images()
    x[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="images contain 1 NaN or infinite values"):
        V.encode(tiny_vae, x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        V.encode_latent_dist(tiny_vae, x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        V.encode_video(tiny_vae, rearrange(x, "(b f) c h w -> b c f h w", b=1))
    z = torch.zeros(1, 4, 4, 4)
    z[0, 2, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="latents contain 1 NaN or infinite values"):
        V.decode(tiny_vae, z)
    with pytest.raises(ValueError, match="latents contain 1 NaN or infinite values"):
        V.decode_video(tiny_vae, rearrange(z, "(b f) c h w -> b c f h w", b=1))
    with pytest.raises(TypeError, match="floating point"):
        V.decode(tiny_vae, torch.zeros(1, 4, 4, 4, dtype=torch.int64))


@torch.no_grad()
def test_float64_images_are_cast(tiny_vae):
    x = _images()
    torch.testing.assert_close(V.encode(tiny_vae, x.double()), V.encode(tiny_vae, x), rtol=0, atol=0)


def test_loading_prints_nothing(capfd):
    """No progress bar or log line from loading (a notebook would keep it as a red stderr box)."""
    V.load_toy_vae()
    CausalVAE.from_pretrained()
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")
