"""anim_lab.causal_vae against diffusers' AutoencoderKLHunyuanVideo (same weights, strict load) and against
direct computations of the causal convolution, frame counts and the first-frame upsampling."""

import json

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from torch.nn import functional as F

from anim_lab.causal_vae import (
    CAUSAL_VAE_HUNYUAN,
    CAUSAL_VAE_TINY,
    TOY_ASSET_DIR,
    CausalConv3d,
    CausalVAE,
    UpsampleCausal3D,
    check_num_frames,
    frame_causal_mask,
    latent_num_frames,
    sample_num_frames,
)

MIN_TOY_PSNR = (
    21.0  # dB on one 9-frame clip (measured about 23); train_log.json: held-out mean 26.07 dB over 64 clips
)


def test_state_dict_keys_and_shapes_equal_diffusers(pair):
    ref, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


@pytest.mark.parametrize("num_frames", [1, 5, 9, 17])
def test_encode_decode_match_diffusers(pair, num_frames):
    ref, ours = pair
    x = torch.rand(1, 3, num_frames, 16, 24, generator=torch.Generator().manual_seed(num_frames)) * 2 - 1
    with torch.no_grad():
        post_ref, post = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(post.mean, post_ref.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.logvar, post_ref.logvar, atol=1e-5, rtol=0)
        assert post.mean.shape == (1, 4, (num_frames - 1) // 4 + 1, 2, 3)
        video_ref, video = ref.decode(post_ref.mean).sample, ours.decode(post_ref.mean)
    assert video.shape == x.shape
    torch.testing.assert_close(video, video_ref, atol=1e-5, rtol=0)


def test_full_size_on_meta_matches_diffusers():
    with torch.device("meta"):
        ours, ref = CausalVAE(**CAUSAL_VAE_HUNYUAN), AutoencoderKLHunyuanVideo(**CAUSAL_VAE_HUNYUAN)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert len(ours.state_dict()) == 248
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 246.5
    assert round(sum(p.numel() for p in ours.encoder.parameters()) / 1e6, 1) == 100.3
    assert ours.scaling_factor == 0.476986 and ours.post_quant_conv.in_channels == 16


def test_causal_conv_equals_explicit_padding_and_ignores_the_future():
    torch.manual_seed(1)
    conv = CausalConv3d(2, 3, 3)
    x = torch.randn(1, 2, 5, 6, 7)
    # independent computation: two copies of frame 0 in front, replicate borders in space, plain conv3d
    front = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    padded = F.pad(front.flatten(1, 2), (1, 1, 1, 1), mode="replicate").unflatten(1, (2, 7))
    expected = F.conv3d(padded, conv.conv.weight, conv.conv.bias)
    torch.testing.assert_close(conv(x), expected)
    changed = x.clone()
    changed[:, :, 3:] += 1.0
    assert torch.equal(conv(changed)[:, :, :3], conv(x)[:, :, :3])  # frames 0..2 do not see frames 3..4
    assert not torch.allclose(conv(changed)[:, :, 3:], conv(x)[:, :, 3:])


def test_upsample_first_frame_in_space_only():
    torch.manual_seed(2)
    up = UpsampleCausal3D(2, (2, 2, 2))
    x = torch.randn(1, 2, 3, 4, 4)
    # independent computation of the input to the conv: frame 0 once, frames 1, 2 twice; every pixel 2x2
    frames = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
    frames = frames.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    torch.testing.assert_close(up(x), up.conv(frames))
    assert up(x).shape == (1, 2, 5, 8, 8)


def test_frame_count_arithmetic():
    assert [latent_num_frames(t) for t in (1, 5, 9, 17, 129)] == [1, 2, 3, 5, 33]
    assert [sample_num_frames(t) for t in (1, 2, 3, 5, 33)] == [1, 5, 9, 17, 129]
    for bad in (0, 2, 4, 16, 18):
        with pytest.raises(ValueError, match="4k\\+1"):
            check_num_frames(bad)


def test_frame_causal_mask():
    mask = frame_causal_mask(3, 2)
    expected = torch.tensor([[i // 2 >= j // 2 for j in range(6)] for i in range(6)])
    assert torch.equal(mask, expected)


def test_first_latent_sees_future_frames_only_through_groupnorm(pair):
    """Convolutions are causal, but GroupNorm statistics span all frames: latent 0 moves when frames 5..8
    change."""
    _, ours = pair
    x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1  # [-1, 1]
    changed = x.clone()
    changed[:, :, 5:] = torch.rand(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z, z2 = ours.encode(x).mean, ours.encode(changed).mean
        assert (z2[:, :, 0] - z[:, :, 0]).abs().max() > 1e-4

        def per_frame_norm(module, inputs, output):  # the same GroupNorm, statistics taken frame by frame
            (h,) = inputs
            frames = [
                F.group_norm(h[:, :, i], module.num_groups, module.weight, module.bias, module.eps)
                for i in range(h.shape[2])
            ]
            return torch.stack(frames, dim=2)

        hooks = [
            m.register_forward_hook(per_frame_norm)
            for m in ours.encoder.modules()
            if isinstance(m, torch.nn.GroupNorm)
        ]
        attentions = ours.encoder.mid_block.attentions
        ours.encoder.mid_block.attentions = None  # the attention's group_norm spans all tokens too
        try:
            a, b = ours.encode(x).mean, ours.encode(changed).mean
        finally:
            ours.encoder.mid_block.attentions = attentions
            for hook in hooks:
                hook.remove()
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], atol=1e-6, rtol=0)
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-4


def test_bad_inputs_raise_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="5 dimensions"):
        ours.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="3 channels"):
        ours.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="4k\\+1"):
        ours.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours.encode([[0.0]])
    with pytest.raises(ValueError, match="4 channels"):
        ours.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="norm_num_groups"):
        CausalVAE(**dict(CAUSAL_VAE_TINY, norm_num_groups=3))


def test_save_load_roundtrip_loads_in_diffusers(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    back = CausalVAE.from_pretrained(tmp_path / "vae")
    theirs = AutoencoderKLHunyuanVideo.from_pretrained(tmp_path / "vae").eval()
    theirs.use_framewise_decoding = False
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back.decode(z), ours.decode(z), atol=0, rtol=0)
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), atol=1e-5, rtol=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CausalVAE.from_pretrained(tmp_path / "missing")
    folder = tmp_path / "wrong"
    CausalVAE(**CAUSAL_VAE_TINY).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, layers_per_block=2)))
    with pytest.raises(ValueError, match="missing keys"):
        CausalVAE.from_pretrained(folder)
    assert not list(folder.glob("*.tmp"))


def test_committed_toy_weights_reconstruct_unseen_identities():
    """The committed toy VAE (anim_lab/assets/toy_causal_vae) reconstructs a clip of an unseen identity."""
    from anim_lab import toy

    vae = CausalVAE.from_pretrained(TOY_ASSET_DIR)
    assert vae.scaling_factor != 1.0  # measured by the training script
    ident = toy.identity_from_seed(toy.identity_split("test")[-1])
    clip = toy.images_to_tensor(toy.make_clip(ident, num_frames=9, size=64, seed=123).frames)[
        None
    ]  # (1, 3, 9, 64, 64)
    with torch.no_grad():
        rec = vae(clip)
    mse = ((rec.clamp(-1, 1) - clip) / 2).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > MIN_TOY_PSNR


# --- bad inputs at the public entry points ----------------------------------------------------------------
def test_dtypes_uint8_refused_float64_cast(pair):
    _, ours = pair
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with pytest.raises(TypeError, match="got torch.uint8; uint8 frames .*images_from_uint8"):
        ours.encode(((x + 1) * 127.5).round().to(torch.uint8))
    with pytest.raises(TypeError, match="floating-point"):
        ours.decode(torch.zeros(1, 4, 2, 2, 2, dtype=torch.int64))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x.double()).mean, ours.encode(x).mean, rtol=0, atol=0)
        z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(ours.decode(z.double()), ours.decode(z), rtol=0, atol=0)
        assert ours(x.double()).dtype == torch.float32


def test_out_of_range_clips_raise_and_legal_ones_pass(pair):
    _, ours = pair
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with pytest.raises(ValueError, match=r"look like \[0, 255\] pixels: use anim_lab.vae.images_from_uint8"):
        ours.encode((x + 1) * 127.5)  # a float clip in [0, 255]
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\], got values in \[-1.5"):
        ours.encode(x * 1.5)
    with torch.no_grad():
        ours.encode((x + 1) / 2)  # [0, 1]: legal [-1, 1] values, which no check can reject (documented)
        ours.encode(torch.full_like(x, 0.5))  # a bright clip is valid
        ours.encode(torch.full_like(x, 1.0))
        ours.encode(torch.full_like(x, -1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_raise_in_encode_and_decode(pair, bad):
    _, ours = pair
    x = torch.zeros(1, 3, 5, 16, 16)
    x[0, 1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="video contain 1 NaN or infinite values"):
        ours.encode(x)
    with pytest.raises(ValueError, match="video contain 1 NaN"):
        ours(x)
    z = torch.zeros(1, 4, 2, 2, 2)
    z[0, 0, 1, 1, 1] = bad
    with pytest.raises(ValueError, match="latents contain 1 NaN or infinite values"):
        ours.decode(z)


def test_tiling_must_be_tile_settings(pair):
    _, ours = pair
    with pytest.raises(TypeError, match="TileSettings"):
        ours.decode(torch.zeros(1, 4, 2, 2, 2), tiling={"tile_sample_min_height": 32})
