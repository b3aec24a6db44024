"""Hallo's parts against plain re-implementations of the reference code's semantics (written here, not by
calling anim_lab.hallo), on random nonzero weights; net.pth's layout; masks on a toy face."""

import math

import cv2
import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from torch.nn import functional as F

from anim_lab import toy
from anim_lab.configs import SD15, TINY
from anim_lab.errors import InputError
from anim_lab.hallo import (
    AUDIO_MODULES_SD15,
    LIP_IDS,
    SILHOUETTE_IDS,
    AudioModule,
    AudioProjModel,
    FaceRegionMasks,
    HalloNet,
    ImageProjModel,
    face_region_masks,
    gaussian_blur,
    reference_unet_tokens,
    segments,
    split_motion_bank,
)
from anim_lab.motion import MOTION_SD15, MOTION_TINY
from anim_lab.reference import pair_blocks, self_attention_names
from anim_lab.unet import AUDIO_KEY, ReferenceUNet, VideoUNet
from anim_lab.weights import KeyMismatchError, load_official_hallo
from tests.keylists import CHECKPOINT_KEYS, read_key_list

torch.set_num_threads(1)
TOL = dict(atol=1e-5, rtol=1e-5)
AUDIO_TINY = dict(audio_attention_dim=8, zero_initialize=True)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random nonzero values for every parameter (zero-initialised convs included), norms' scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return module


# --- plain building blocks (float64, from the reference's definitions) ----------------------------------
def lin(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def group_norm(x, gn):  # (N, C, H, W)
    n, c, h, w = x.shape
    g = x.reshape(n, gn.num_groups, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    g = ((g - mu) / torch.sqrt(var + gn.eps)).reshape(n, c, h, w)
    return g * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def conv1x1(x, conv):  # (N, C, H, W): a per-pixel linear map
    return torch.einsum("nchw,oc->nohw", x, conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]


def attention(x, ctx, attn):  # diffusers Attention: q from x, k/v from ctx, heads split in the channels
    heads = attn.heads
    q, k, v = lin(x, attn.to_q), lin(ctx, attn.to_k), lin(ctx, attn.to_v)
    n, lq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(n, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(n, lq, c)
    return lin(out, attn.to_out[0])


def geglu_ff(x, ff):
    hidden, gate = lin(x, ff.net[0].proj).chunk(2, dim=-1)
    return lin(hidden * F.gelu(gate), ff.net[2])


def plain_audio_module(hidden_states, audio_tokens, full_mask, face_mask, lip_mask, motion_scale, mod):
    """Hallo's Transformer3DModel(use_audio_module=True) + AudioTemporalBasicTransformerBlock on one level:
    hidden_states (bf, c, h, w), audio_tokens (bf, T, D), masks (bf, h*w) as Hallo's mask[level]."""
    batch, _, height, width = hidden_states.shape
    residual = hidden_states
    x = conv1x1(group_norm(hidden_states, mod.norm), mod.proj_in)
    inner = x.shape[1]
    x = x.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
    blk = mod.transformer_blocks[0]
    x = attention(layer_norm(x, blk.norm1), layer_norm(x, blk.norm1), blk.attn1) + x
    n = layer_norm(x, blk.norm2)
    outs = []
    for attn, conv, mask in (
        (blk.attn2_0, blk.zero_conv_full, full_mask),
        (blk.attn2_1, blk.zero_conv_face, face_mask),
        (blk.attn2_2, blk.zero_conv_lip, lip_mask),
    ):
        y = attention(n, audio_tokens, attn) * mask[:, :, None]
        y = y.reshape(batch, height, width, inner).permute(0, 3, 1, 2)
        outs.append(conv1x1(y, conv).permute(0, 2, 3, 1).reshape(batch, -1, inner))
    x = motion_scale[0] * outs[0] + motion_scale[1] * outs[1] + motion_scale[2] * outs[2] + x
    x = geglu_ff(layer_norm(x, blk.norm3), blk.ff) + x
    x = x.reshape(batch, height, width, inner).permute(0, 3, 1, 2)
    return conv1x1(x, mod.proj_out) + residual


# --- 1. tokens ---------------------------------------------------------------------------------------------
def test_audio_proj_equals_plain_and_uncond_is_zeros():
    model = randomize(AudioProjModel(seq_len=5, blocks=3, channels=4, intermediate_dim=16, output_dim=8,
                                     context_tokens=6)).double()  # fmt: skip
    window = torch.randn(2, 3, 5, 3, 4, dtype=torch.float64)  # (B, F, 5, L, C)
    out = model(window)
    assert out.shape == (2, 3, 6, 8)
    x = window.reshape(6, -1)  # Hallo: view(batch, window * blocks * channels)
    x = torch.relu(lin(x, model.proj1))
    x = torch.relu(lin(x, model.proj2))
    x = layer_norm(lin(x, model.proj3).reshape(6, 6, 8), model.norm).reshape(2, 3, 6, 8)
    torch.testing.assert_close(out, x, **TOL)
    uncond = AudioProjModel.uncond(out)
    assert uncond.shape == out.shape and not uncond.any()
    with pytest.raises(InputError, match="audio windows"):
        model(window[:, :, :4])


def test_image_proj_equals_plain_and_uncond_is_the_projected_zeros():
    model = randomize(
        ImageProjModel(cross_attention_dim=8, clip_embeddings_dim=12, clip_extra_context_tokens=4)
    )
    model = model.double()
    emb = torch.randn(3, 12, dtype=torch.float64)
    out = model(emb)
    torch.testing.assert_close(out, layer_norm(lin(emb, model.proj).reshape(3, 4, 8), model.norm), **TOL)
    uncond = model.uncond(2)
    expected = layer_norm(model.proj.bias.reshape(1, 4, 8), model.norm).expand(2, 4, 8)
    torch.testing.assert_close(uncond, expected, **TOL)
    assert uncond.abs().sum() > 0  # not zero tokens


# --- 2. the audio module -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(4, 4), (3, 5)])
def test_audio_module_equals_plain(size):
    h, w = size
    mod = randomize(
        AudioModule(16, 8, num_attention_heads=2, cross_attention_dim=6, norm_num_groups=4)
    ).double()
    assert all(conv.weight.abs().sum() > 0 for conv in mod.transformer_blocks[0].zero_convs)
    x = torch.randn(5, 16, h, w, dtype=torch.float64)
    tokens = torch.randn(5, 7, 6, dtype=torch.float64)
    masks = [torch.rand(5, h * w, dtype=torch.float64) for _ in range(3)]
    scale = (0.7, 1.3, 2.0)
    out = mod(x, tokens, tuple(m[:, :, None] for m in masks), scale)
    torch.testing.assert_close(out, plain_audio_module(x, tokens, *masks, scale, mod), **TOL)


def test_new_audio_module_ignores_the_audio():
    """Zero-initialised 1x1 convs: a fresh module's output does not depend on the tokens or masks."""
    mod = AudioModule(16, 16, num_attention_heads=2, cross_attention_dim=6, norm_num_groups=4)
    x = torch.randn(2, 16, 4, 4)
    a = mod(x, torch.randn(2, 3, 6), tuple(torch.rand(2, 16, 1) for _ in range(3)))
    b = mod(x, torch.zeros(2, 3, 6), tuple(torch.zeros(2, 16, 1) for _ in range(3)))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- 3. the denoising UNet with audio modules and motion frames ---------------------------------------------
def hallo_unet_kwargs(layers: int = 1) -> dict:
    """TINY's UNet with SD1.5's widening pattern (down blocks 1 and 2 widen, 3 does not)."""
    return dict(TINY.unet, layers_per_block=layers, block_out_channels=(16, 32, 64, 64))


@pytest.fixture(scope="module")
def tiny_hallo_unet():
    torch.manual_seed(0)
    return randomize(VideoUNet(hallo_unet_kwargs(), MOTION_TINY, audio_kwargs=AUDIO_TINY), seed=1).double()


def plain_hallo_unet(model, sample, t, ehs, audio_emb, masks, motion_scale, motion_fea, faithful):
    """Hallo's UNet3DConditionModel.forward in its own layout (b c f h w): the blocks' training branch
    (gradient checkpointing on, as its inference runs) when faithful, else the same with every motion module
    run; resnets, spatial transformers, motion modules and samplers as black boxes; the audio modules plain.
    masks: {"full"|"face"|"lip": [per depth (h, w)]}; motion_fea: {attn1 name: (b, n, h*w, c)}."""
    b, _, f, _, _ = sample.shape

    def per_frame(x5):
        return rearrange(x5, "b c f h w -> (b f) c h w")

    def video(x4, frames=f):
        return rearrange(x4, "(b f) c h w -> b c f h w", f=frames)

    temb = model.time_embedding(model.time_proj(torch.full((b * f,), t)).to(sample.dtype))
    ehs_f = ehs.repeat_interleave(f, dim=0)  # "b n c -> (b f) n c"
    audio = rearrange(audio_emb, "b f t d -> (b f) t d")  # "bs f margin dim -> (bs f) margin dim"

    def mask_at(name, depth):  # Hallo: mask (1, HW) repeated over the frames
        return masks[name][depth].reshape(1, -1).repeat(b * f, 1)

    def attn_audio_motion(block, i, h5, depth, attn_name):
        h5 = video(block.attentions[i](per_frame(h5), encoder_hidden_states=ehs_f, return_dict=False)[0])
        h5 = video(
            plain_audio_module(
                per_frame(h5), audio, mask_at("full", depth), mask_at("face", depth), mask_at("lip", depth),
                motion_scale, block.audio_modules[i],
            )
        )  # fmt: skip
        mm = block.motion_modules[i]
        if motion_fea is None:
            return video(mm(per_frame(h5), f))
        mf = rearrange(motion_fea[attn_name + ".transformer_blocks.0.attn1"], "b f (d1 d2) c -> b c f d1 d2",
                       d1=h5.size(-1))  # fmt: skip
        n = mf.size(2)
        cat = torch.cat([mf, h5], dim=2)
        return video(mm(per_frame(cat), n + f), n + f)[:, :, n:]

    h = video(model.conv_in(per_frame(sample)))
    skips = [h]
    for i, block in enumerate(model.down_blocks):
        for j, resnet in enumerate(block.resnets):
            h = video(resnet(per_frame(h), temb))
            if hasattr(block, "attentions") and block.attentions is not None:
                h = attn_audio_motion(block, j, h, i, f"down_blocks.{i}.attentions.{j}")
            elif not faithful:  # DownBlock3D: its checkpointed branch runs the resnets only
                h = video(block.motion_modules[j](per_frame(h), f))
            skips.append(h)
        if block.downsamplers is not None:
            h = video(block.downsamplers[0](per_frame(h)))
            skips.append(h)
    mid = model.mid_block
    h = video(mid.resnets[0](per_frame(h), temb))
    h = attn_audio_motion(mid, 0, h, 3, "mid_block.attentions.0")
    h = video(mid.resnets[1](per_frame(h), temb))
    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            h = torch.cat([h, skips.pop()], dim=1)
            h = video(resnet(per_frame(h), temb))
            if hasattr(block, "attentions") and block.attentions is not None:
                h = attn_audio_motion(block, j, h, 3 - i, f"up_blocks.{i}.attentions.{j}")
            elif not faithful:
                h = video(block.motion_modules[j](per_frame(h), f))
        if block.upsamplers is not None:
            h = video(block.upsamplers[0](per_frame(h), skips[-1].shape[-2:]))
    h = model.conv_out(model.conv_act(model.conv_norm_out(per_frame(h))))
    return video(h)


def random_masks(g, sizes):
    return {
        r: [torch.rand(s, s, generator=g, dtype=torch.float64) for s in sizes]
        for r in ("full", "face", "lip")
    }


def motion_features(model, g, videos, n):
    feats = {}
    for name in self_attention_names(model):
        attn = model.get_submodule(name)
        block = model.get_submodule(name.split(".transformer_blocks")[0])
        size = {"down_blocks.0": 8, "down_blocks.1": 4, "down_blocks.2": 2, "mid_block": 1, "up_blocks.1": 2,
                "up_blocks.2": 4, "up_blocks.3": 8}[name.rsplit(".attentions", 1)[0]]  # fmt: skip
        assert block.norm.num_channels == attn.to_q.in_features
        feats[name] = torch.randn(
            videos, n, size * size, attn.to_q.in_features, generator=g, dtype=torch.float64
        )
    return feats


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("with_motion_frames", [False, True])
def test_hallo_unet_equals_plain(tiny_hallo_unet, faithful, with_motion_frames):
    model = tiny_hallo_unet
    g = torch.Generator().manual_seed(2)
    b, f = 2, 3
    sample = torch.randn(b, 4, f, 8, 8, generator=g, dtype=torch.float64)
    ehs = torch.randn(b, 2, TINY.unet["cross_attention_dim"], generator=g, dtype=torch.float64)
    audio = torch.randn(b, f, 5, 8, generator=g, dtype=torch.float64)
    masks = random_masks(g, (8, 4, 2, 1))
    scale = (0.5, 1.5, 2.0)
    feats = motion_features(model, g, b, 2) if with_motion_frames else None
    with torch.no_grad():
        out = model(sample, 7, ehs, audio_tokens=audio, audio_masks=masks, motion_scale=scale,
                    motion_frame_features=feats, faithful=faithful)  # fmt: skip
        plain = plain_hallo_unet(model, sample, 7, ehs, audio, masks, scale, feats, faithful)
    torch.testing.assert_close(out, plain, **TOL)


def test_every_hallo_input_matters(tiny_hallo_unet):
    model = tiny_hallo_unet
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.float64)
    ehs = torch.randn(1, 2, 32, generator=g, dtype=torch.float64)
    audio = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    masks = random_masks(g, (8, 4, 2, 1))
    feats = motion_features(model, g, 1, 2)
    kw = dict(audio_tokens=audio, audio_masks=masks, motion_frame_features=feats)
    no_lips = dict(masks, lip=[m * 0 for m in masks["lip"]])
    with torch.no_grad():
        base = model(sample, 5, ehs, **kw)
        changed = {
            "audio": model(sample, 5, ehs, **dict(kw, audio_tokens=torch.zeros_like(audio))),
            "lip mask": model(sample, 5, ehs, **dict(kw, audio_masks=no_lips)),
            "scale": model(sample, 5, ehs, **kw, motion_scale=(1.0, 1.0, 0.0)),
            "motion frames": model(sample, 5, ehs, **dict(kw, motion_frame_features=None)),
            "faithful": model(sample, 5, ehs, **kw, faithful=True),
        }  # fmt: skip
    for what, out in changed.items():
        assert (out - base).abs().max() > 1e-4, what


def test_audio_modules_placed_and_sized_as_in_hallo():
    model = VideoUNet(hallo_unet_kwargs(2), MOTION_TINY, audio_kwargs=AUDIO_TINY)
    places = {n: len(m) for n, m in model.named_modules() if n.endswith(AUDIO_KEY)}
    assert places == {
        "down_blocks.0.audio_modules": 2, "down_blocks.1.audio_modules": 2, "down_blocks.2.audio_modules": 2,
        "mid_block.audio_modules": 1,
        "up_blocks.1.audio_modules": 3, "up_blocks.2.audio_modules": 3, "up_blocks.3.audio_modules": 3,
    }  # fmt: skip
    bo = hallo_unet_kwargs()["block_out_channels"]  # (16, 32, 64, 64): down 1 widens 16 -> 32
    proj_in = {
        n: tuple(p.shape[:2]) for n, p in model.state_dict().items() if AUDIO_KEY in n and "proj_in.w" in n
    }
    assert proj_in["down_blocks.1.audio_modules.0.proj_in.weight"] == (bo[0], bo[1])  # inner = input width
    assert proj_in["down_blocks.1.audio_modules.1.proj_in.weight"] == (bo[1], bo[1])
    assert proj_in["up_blocks.3.audio_modules.0.proj_in.weight"] == (bo[0], bo[0])
    assert proj_in["up_blocks.1.audio_modules.2.proj_in.weight"] == (bo[1], bo[2])  # the skip width inside
    # Without audio_kwargs: no audio key at all (AnimateAnyone's checkpoints unchanged)
    plain = VideoUNet(hallo_unet_kwargs(2), MOTION_TINY)
    assert not any(AUDIO_KEY in k for k in plain.state_dict())
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        k for k in model.state_dict() if AUDIO_KEY in k
    }


def test_fresh_audio_unet_ignores_the_audio_and_masks():
    torch.manual_seed(0)
    model = VideoUNet(hallo_unet_kwargs(), MOTION_TINY, audio_kwargs=AUDIO_TINY)
    sample, ehs = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 2, 32)
    one = {r: [torch.ones(s, s) for s in (8, 4, 2, 1)] for r in ("full", "face", "lip")}
    with torch.no_grad():
        a = model(sample, 3, ehs, audio_tokens=torch.randn(1, 2, 5, 8), audio_masks=one)
        b = model(sample, 3, ehs, audio_tokens=torch.zeros(1, 2, 5, 8), audio_masks=one)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_hallo_inputs_are_checked(tiny_hallo_unet):
    sample, ehs = torch.randn(1, 4, 2, 8, 8).double(), torch.randn(1, 2, 32).double()
    masks = random_masks(torch.Generator().manual_seed(0), (8, 4, 2, 1))
    with pytest.raises(InputError, match="audio_tokens"):
        tiny_hallo_unet(sample, 1, ehs)
    with pytest.raises(InputError, match="level 1"):
        tiny_hallo_unet(sample, 1, ehs, audio_tokens=torch.randn(1, 2, 5, 8).double(),
                        audio_masks={r: [m[0], m[0], m[2], m[3]] for r, m in masks.items()})  # fmt: skip
    with pytest.raises(InputError, match="motion_frame_features"):
        tiny_hallo_unet(sample, 1, ehs, audio_tokens=torch.randn(1, 2, 5, 8).double(), audio_masks=masks,
                        motion_frame_features={})  # fmt: skip
    aa = VideoUNet(TINY.unet, MOTION_TINY)
    with pytest.raises(InputError, match="audio_kwargs"):
        aa(torch.randn(1, 4, 2, 8, 8), 1, torch.randn(1, 2, 32), audio_tokens=torch.randn(1, 2, 5, 8))


def test_reference_attention_pairs_the_audio_unet_without_its_audio_modules():
    ref = ReferenceUNet(TINY.unet)
    den = VideoUNet(TINY.unet, MOTION_TINY, audio_kwargs=AUDIO_TINY)
    names = pair_blocks(ref, den)
    assert names and not any(AUDIO_KEY in n for n in names)
    assert any(AUDIO_KEY in n for n in den.attn_processors)  # the audio attentions are processors too


# --- 4. motion frames --------------------------------------------------------------------------------------
def test_reference_unet_tokens_correct_and_the_token_repeat_quirk():
    u, c = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    tokens = torch.cat([u, c])  # CFG: [uncond ; cond]
    correct = reference_unet_tokens(tokens, 3).flatten().tolist()
    faithful = reference_unet_tokens(tokens, 3, faithful=True).flatten().tolist()
    assert correct == [0, 0, 0, 1, 1, 1]  # [r, m1, m2] of the uncond video, then of the cond video
    assert faithful == [0, 1, 0, 1, 0, 1]  # the reference's tokens.repeat(3, 1, 1)
    assert faithful == tokens.repeat(3, 1, 1).flatten().tolist()
    one = torch.randn(1, 4, 8)  # one video without CFG: the same either way
    assert torch.equal(reference_unet_tokens(one, 3), reference_unet_tokens(one, 3, faithful=True))


def test_split_motion_bank():
    entries = {"a": torch.arange(6.0)[:, None, None].expand(6, 4, 2)}  # rows [v0: r m1 m2, v1: r m1 m2]
    ref, motion = split_motion_bank(entries, 3)
    assert ref["a"][:, 0, 0].tolist() == [0, 3]
    assert motion["a"].shape == (2, 2, 4, 2) and motion["a"][:, :, 0, 0].tolist() == [[1, 2], [4, 5]]
    with pytest.raises(InputError, match="multiple of 4"):
        split_motion_bank(entries, 4)


def test_segments_bookkeeping():
    segs = segments(48, clip_length=16, n_motion_frames=2)
    assert [s.frames for s in segs] == [range(0, 16), range(16, 32), range(32, 48)]
    assert [s.motion_frames for s in segs] == [(-1, -1), (14, 15), (30, 31)]
    assert len(segments(47)) == 2  # Hallo: audio_len // clip_length (the audio is padded beforehand)
    with pytest.raises(InputError):
        segments(16, clip_length=4, n_motion_frames=5)


# --- 5. face-region masks ----------------------------------------------------------------------------------
def hallo_box(landmarks_edges, ids, ratio, height, width):
    """Hallo's get_lip_mask / get_face_mask (its expand_region re-typed), as float."""
    pts = np.take(landmarks_edges, ids, 0)
    lo, hi = np.round(np.min(pts, 0)), np.round(np.max(pts, 0))
    min_x, max_x, min_y, max_y = lo[0], hi[0], lo[1], hi[1]
    mid_x, mid_y = (max_x + min_x) // 2, (max_y + min_y) // 2
    side_x, side_y = (max_x - min_x) * ratio, (max_y - min_y) * ratio
    min_x, max_x, min_y, max_y = (
        mid_x - side_x // 2,
        mid_x + side_x // 2,
        mid_y - side_y // 2,
        mid_y + side_y // 2,
    )
    if min_x < 0:
        max_x -= min_x
        min_x = 0
    if max_x > width:
        min_x -= max_x - width
        max_x = width
    if min_y < 0:
        max_y -= min_y
        min_y = 0
    if max_y > height:
        min_y -= max_y - height
        max_y = height
    mask = np.zeros((height, width), np.float32)
    mask[round(min_y) : round(max_y), round(min_x) : round(max_x)] = 1.0
    return mask


@pytest.fixture(scope="module")
def toy_face():
    ident = toy.sample_identity(np.random.default_rng(3))
    _, lmk = toy.render(ident, toy.HeadPose(yaw=10), toy.Expression(mouth_open=0.6), size=512)
    return lmk


def test_face_region_masks_equal_hallos_get_mask_on_a_toy_face(toy_face):
    masks = face_region_masks(toy_face, 512, 512)
    edges = toy_face.astype(np.float64) + 0.5  # Hallo's landmarks: x * width (pixel edges)
    face_box = hallo_box(edges, SILHOUETTE_IDS, 1.2, 512, 512)
    lip_box = hallo_box(edges, LIP_IDS, 2.0, 512, 512)
    np.testing.assert_array_equal(masks.box.numpy(), face_box)

    def blur(box, k):  # get_blur_mask in float: resize 64x64, GaussianBlur(k, 0), normalize MINMAX
        x = cv2.GaussianBlur(cv2.resize(box, (64, 64)), (k, k), 0)
        return cv2.normalize(x, None, 0, 1, cv2.NORM_MINMAX)

    face_blur, lip = blur(face_box, 51), blur(lip_box, 31)
    want = {"full": 1.0 - face_blur, "face": np.maximum(face_blur - lip, 0), "lip": lip}
    for name, m in want.items():
        got = getattr(masks, name)
        assert [tuple(x.shape) for x in got] == [(64, 64), (32, 32), (16, 16), (8, 8)]
        for level, size in enumerate((64, 32, 16, 8)):  # ToTensor(Resize((size, size))(PIL image))
            ref = np.asarray(
                Image.fromarray(m.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
            )
            np.testing.assert_allclose(got[level].numpy(), ref, atol=1e-5, rtol=0)
    # what the maps mean on the toy face
    lip_pts = toy_face[list(LIP_IDS)] / 8  # in latent pixels
    y, x = np.unravel_index(masks.lip[0].argmax().item(), (64, 64))
    assert lip_pts[:, 0].min() - 1 <= x <= lip_pts[:, 0].max() + 1
    assert lip_pts[:, 1].min() - 1 <= y <= lip_pts[:, 1].max() + 1
    assert masks.full[0][0, 0] > 0.99 and masks.full[0][y, x] < 0.1  # background outside, not on the lips
    assert masks.face[0][y, x] == 0  # the face map excludes the lips
    fy, fx = np.unravel_index(masks.face[0].argmax().item(), (64, 64))  # the face map's peak: on the face,
    assert masks.lip[0][fy, fx] < 0.2 and masks.full[0][fy, fx] < 0.2  # away from the lips
    for m in (masks.full, masks.face, masks.lip):
        assert all(float(t.min()) >= 0 and float(t.max()) <= 1 for t in m)


def test_face_region_masks_follow_the_latent_size(toy_face):
    lmk = toy_face * (128 / 512)
    masks = face_region_masks(lmk, 128, 128)
    assert isinstance(masks, FaceRegionMasks) and masks.num_levels == 4
    wide = face_region_masks(np.asarray(lmk) + [16, 0], 128, 160)
    assert [tuple(t.shape) for t in wide.lip] == [(16, 20), (8, 10), (4, 5), (2, 3)]
    with pytest.raises(InputError):
        face_region_masks(lmk[:100], 128, 128)


def test_gaussian_blur_equals_opencv():
    x = np.random.default_rng(0).random((40, 37)).astype(np.float32)
    # k = 9 left out: OpenCV 5 tabulates it (4/256, 13/256, ...); OpenCV 4, which Hallo ran, and anim_lab use
    # the sigma formula from 9 on
    for k in ((7, 7), (5, 3), (1, 3), (11, 13), (31, 31), (51, 35)):
        ref = cv2.GaussianBlur(x, k, 0)
        np.testing.assert_allclose(gaussian_blur(torch.from_numpy(x), k).numpy(), ref, atol=1e-5, rtol=0)


# --- 6. net.pth ---------------------------------------------------------------------------------------------
NET_KEYS = read_key_list(CHECKPOINT_KEYS / "hallo" / "net.txt")
TINY_NET = dict(
    unet_kwargs=hallo_unet_kwargs(2),  # SD1.5's layout (2 layers per block): net.pth's key names
    motion_kwargs=MOTION_TINY,
    audio_kwargs=AUDIO_TINY,
    face_locator_kwargs=dict(conditioning_channels=3, block_out_channels=(4, 8, 8, 16),
                             conditioning_embedding_channels=32),
    image_proj_kwargs=dict(cross_attention_dim=32, clip_embeddings_dim=12, clip_extra_context_tokens=4),
    audio_proj_kwargs=dict(
        seq_len=5, blocks=3, channels=4, intermediate_dim=16, output_dim=8, context_tokens=5
    ),
)  # fmt: skip


def test_load_official_hallo_tiny_checkpoint_strictly(tmp_path):
    k = TINY_NET
    with torch.device("meta"):
        shapes = HalloNet(k["unet_kwargs"], k["motion_kwargs"], k["audio_kwargs"], k["face_locator_kwargs"],
                          k["image_proj_kwargs"], k["audio_proj_kwargs"]).state_dict()  # fmt: skip
    assert set(shapes) == set(NET_KEYS)  # the same 2656 names at tiny sizes
    g = torch.Generator().manual_seed(0)
    written = {name: torch.randn(shapes[name].shape, generator=g) for name in NET_KEYS}  # net.txt's order
    torch.save(written, tmp_path / "net.pth")
    net = load_official_hallo(tmp_path / "net.pth", **TINY_NET)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[n], written[n]) for n in NET_KEYS)
    assert not net.training
    # the face locator alone, from the same file (load_official_pose_guider with a prefix)
    from anim_lab.weights import load_official_pose_guider

    locator = load_official_pose_guider(
        tmp_path / "net.pth", prefix="face_locator.", **k["face_locator_kwargs"]
    )
    assert all(torch.equal(v, written[f"face_locator.{n}"]) for n, v in locator.state_dict().items())

    dropped = dict(written)
    del dropped["denoising_unet.mid_block.audio_modules.0.transformer_blocks.0.attn2_2.to_k.weight"]
    torch.save(dropped, tmp_path / "missing.pth")
    with pytest.raises(KeyMismatchError, match="attn2_2.to_k.weight"):
        load_official_hallo(tmp_path / "missing.pth", **TINY_NET)
    torch.save(dict(written, **{"audioproj.proj4.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(KeyMismatchError, match="proj4"):
        load_official_hallo(tmp_path / "extra.pth", **TINY_NET)


def test_full_size_hallo_has_net_pth_keys_shapes_and_parameter_counts():
    with torch.device("meta"):
        net = HalloNet(SD15.unet, MOTION_SD15, AUDIO_MODULES_SD15)
    have = {n: tuple(t.shape) for n, t in net.state_dict().items()}
    assert len(have) == len(NET_KEYS) == 2656
    assert have == NET_KEYS

    def count(shapes, prefix, part=""):
        sel = [s for n, s in shapes.items() if n.startswith(prefix) and part in n]
        return len(sel), sum(math.prod(s) for s in sel)

    published = {  # implementations.md §3.2: keys, parameters (M, one decimal / two for the small ones)
        ("reference_unet.", ""): (682, 859.5),
        ("denoising_unet.", ""): (1946, 1526.7),
        ("denoising_unet.", "motion_modules"): (588, 454.4),
        ("denoising_unet.", "audio_modules"): (672, 212.8),
        ("face_locator.", ""): (16, 0.51),
        ("imageproj.", ""): (4, 1.58),
        ("audioproj.", ""): (8, 36.5),
    }
    for (prefix, part), (keys, millions) in published.items():
        n_ref, p_ref = count(NET_KEYS, prefix, part)  # from net.txt's shapes
        n_have, p_have = count(have, prefix, part)  # from the built model
        assert (n_have, p_have) == (n_ref, p_ref), (prefix, part)
        digits = 2 if millions < 2 else 1
        assert n_ref == keys and round(p_ref / 1e6, digits) == millions, (prefix, part, p_ref)


# --- 7. motion frames through the ReferenceNet's bank ----------------------------------------------------
def test_motion_frames_from_the_reference_bank_and_the_token_quirk():
    """The bank written on [ref, m1, m2] per video splits into what writing each image alone with its tokens
    gives; faithful tokens encode the CFG videos' motion frames with the other video's tokens."""
    from anim_lab.reference import reference_attention

    torch.manual_seed(0)
    ref_unet = randomize(ReferenceUNet(TINY.unet), seed=4).double()
    den_unet = randomize(VideoUNet(TINY.unet, MOTION_TINY, audio_kwargs=AUDIO_TINY), seed=5).double()
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)  # 2 videos (CFG) x [r, m1, m2]
    tokens = torch.randn(2, 2, 32, generator=g, dtype=torch.float64)  # [uncond ; cond]

    def entries_alone(bank, latent, token):  # one image, its own tokens
        bank.write(latent[None], 0, token[None])
        return dict(bank.entries)

    with reference_attention(ref_unet, den_unet, do_classifier_free_guidance=True) as bank:
        alone = {(v, s): entries_alone(bank, images[v, s], tokens[v]) for v in range(2) for s in range(3)}
        other = {(v, s): entries_alone(bank, images[v, s], tokens[1 - v]) for v in range(2) for s in range(3)}
        for faithful in (False, True):
            bank.write(
                rearrange(images, "v s c h w -> (v s) c h w"), 0, reference_unet_tokens(tokens, 3, faithful)
            )
            reference, motion = split_motion_bank(bank.entries, 3)
            for name in bank.names:
                for v in range(2):
                    torch.testing.assert_close(reference[name][v], alone[(v, 0)][name][0], **TOL)  # both ways
                    for s in (1, 2):
                        # faithful: row v*3+s gets tokens[row % 2]: video 0's m1 the cond tokens, video
                        # 1's m1 the uncond ones; the references (rows 0 and 3) get their own either way
                        row = v * 3 + s
                        quirk = faithful and row % 2 != v
                        want = (other if quirk else alone)[(v, s)][name][0]
                        torch.testing.assert_close(motion[name][v, s - 1], want, **TOL)
        # the denoising UNet reads the references and takes the motion frames
        bank.load(reference)
        masks = {
            r: [torch.rand(s, s, dtype=torch.float64) for s in (8, 4, 2, 1)] for r in ("full", "face", "lip")
        }
        sample = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
        audio = torch.randn(2, 3, 5, 8, dtype=torch.float64)
        with torch.no_grad():
            out = den_unet(
                sample, 9, tokens, audio_tokens=audio, audio_masks=masks, motion_frame_features=motion
            )
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_audio_unet_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize(VideoUNet(TINY.unet, MOTION_TINY, audio_kwargs=AUDIO_TINY), seed=7)
    model.save_pretrained(tmp_path / "unet")
    again = VideoUNet.from_pretrained(tmp_path / "unet")
    assert again.has_audio_modules and again.audio_kwargs == AUDIO_TINY
    loaded = again.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
