"""Full-size models on the meta device: parameter counts against the published figures, shapes of a 512x512
request, and FLOP counts against counts worked out by hand."""

import pytest
import torch
from torch import nn

from anim_lab.configs import SD15, TINY
from anim_lab.inspect import build, count_flops, count_parameters, flops_by_module, trace_shapes, weight_bytes


@pytest.fixture(scope="module")
def sd15():
    return {c: build(SD15, c) for c in ("unet", "vae", "image_encoder", "pose_guider")}


def test_meta_models_hold_no_memory(sd15):
    assert all(p.device.type == "meta" for m in sd15.values() for p in m.parameters())


def test_parameter_counts_equal_the_published_figures(sd15):
    assert count_parameters(sd15["unet"]) == 859_520_964  # SD1.5 UNet
    assert count_parameters(sd15["vae"]) == 83_653_863  # SD VAE (kl-f8)
    assert count_parameters(sd15["image_encoder"]) == 303_966_208  # CLIP ViT-L/14 vision tower + projection
    assert count_parameters(sd15["pose_guider"]) == 1_086_480  # AnimateAnyone PoseGuider (16, 32, 96, 256)
    assert weight_bytes(sd15["unet"], torch.float16) == 2 * 859_520_964


def test_meta_forward_at_512_gives_the_documented_shapes(sd15):
    image = torch.empty(1, 3, 512, 512, device="meta")
    latents = sd15["vae"].encode(image).latent_dist.mean
    assert latents.shape == (1, 4, 64, 64)  # 8x smaller, 4 channels
    assert sd15["vae"].decode(latents).sample.shape == (1, 3, 512, 512)
    clip_in = torch.empty(1, 3, 224, 224, device="meta")
    out = sd15["image_encoder"](pixel_values=clip_in)
    assert out.image_embeds.shape == (1, 768)  # one token of width cross_attention_dim once unsqueezed
    assert out.last_hidden_state.shape == (1, 257, 1024)  # 16x16 patches + CLS
    pose = torch.empty(1, 3, 24, 512, 512, device="meta")
    assert sd15["pose_guider"](pose).shape == (1, 320, 24, 64, 64)
    noise_pred = sd15["unet"](
        latents, torch.tensor([999], device="meta"), encoder_hidden_states=out.image_embeds[:, None]
    ).sample
    assert noise_pred.shape == (1, 4, 64, 64)


def test_trace_shapes_follows_the_unet(sd15):
    x = torch.empty(1, 4, 64, 64, device="meta")
    e = torch.empty(1, 1, 768, device="meta")
    rows = trace_shapes(
        sd15["unet"],
        x,
        torch.tensor([1], device="meta"),
        encoder_hidden_states=e,
        include=lambda name, m: name.count(".") == 1 and name.split(".")[0] in ("down_blocks", "up_blocks"),
    )
    downs = {r.name: r.outputs[0] for r in rows if r.name.startswith("down")}
    assert downs == {
        "down_blocks.0": (1, 320, 32, 32),
        "down_blocks.1": (1, 640, 16, 16),
        "down_blocks.2": (1, 1280, 8, 8),
        "down_blocks.3": (1, 1280, 8, 8),
    }
    assert [r.outputs[0] for r in rows if r.name.startswith("up")] == [
        (1, 1280, 16, 16),
        (1, 1280, 32, 32),
        (1, 640, 64, 64),
        (1, 320, 64, 64),
    ]
    assert sum(r.params for r in rows) == sum(
        count_parameters(getattr(sd15["unet"], n)) for n in ("down_blocks", "up_blocks")
    )


def test_flops_of_a_conv_and_a_linear_match_the_formula():
    conv = nn.Conv2d(8, 16, 3, padding=1, device="meta")
    x = torch.empty(2, 8, 10, 12, device="meta")
    assert count_flops(conv, x) == 2 * (2 * 16 * 10 * 12) * (8 * 3 * 3)  # 2 x MACs
    lin = nn.Linear(32, 64, device="meta")
    assert count_flops(lin, torch.empty(5, 32, device="meta")) == 2 * 5 * 32 * 64


def test_flops_of_the_sd15_pose_guider_match_a_hand_count(sd15):
    # Each conv: 2 * H_out * W_out * C_out * C_in * 9 (per frame)
    convs = [
        (3, 16, 512),
        (16, 16, 512),
        (16, 32, 256),
        (32, 32, 256),
        (32, 96, 128),
        (96, 96, 128),
        (96, 256, 64),
        (256, 320, 64),
    ]
    expected = sum(2 * s * s * co * ci * 9 for ci, co, s in convs)
    assert count_flops(sd15["pose_guider"], torch.empty(1, 3, 1, 512, 512, device="meta")) == expected


def test_unet_flops_split_by_block_add_up():
    unet = build(TINY, "unet")
    args = (torch.empty(1, 4, 8, 8, device="meta"), torch.tensor([1], device="meta"))
    kw = dict(encoder_hidden_states=torch.empty(1, 1, 32, device="meta"))
    total = count_flops(unet, *args, **kw)
    parts = flops_by_module(unet, *args, **kw)
    assert total > 0 and sum(parts.values()) == total
    assert {"conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out"} <= set(parts)


def test_unknown_component_lists_the_known_ones():
    with pytest.raises(KeyError, match="image_encoder"):
        build(SD15, "text_encoder")


@pytest.mark.slow
def test_real_tensors_give_the_same_shapes_and_flops_as_meta():
    # Full-size VAE with random weights on the CPU (about 30 s): the meta trace must not differ from reality.
    meta_vae, real_vae = build(SD15, "vae"), build(SD15, "vae", device="cpu")
    x_meta, x = torch.empty(1, 3, 256, 256, device="meta"), torch.randn(1, 3, 256, 256)
    assert real_vae.encode(x).latent_dist.mean.shape == meta_vae.encode(x_meta).latent_dist.mean.shape
    # On the CPU, torch runs attention as one fused kernel that FlopCounterMode has no formula for, so the CPU
    # count misses exactly the mid-block attention: Q K^T and A V over 32x32 = 1024 tokens of width 512, one
    # head.
    tokens, width = (256 // 8) ** 2, 512
    attention = 2 * (2 * tokens * tokens * width)
    assert count_flops(meta_vae.encode, x_meta) - count_flops(real_vae.encode, x) == attention


@pytest.mark.gpu
def test_tiny_unet_in_fp16_on_cuda_matches_fp32_on_cpu():
    unet = build(TINY, "unet", device="cpu")
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)  # conv_out starts at zero in some configs; make every layer count
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 1, 32)
    ref = unet(x, t, encoder_hidden_states=e).sample
    out = unet.half().cuda()(x.half().cuda(), t.cuda(), encoder_hidden_states=e.half().cuda()).sample
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)
