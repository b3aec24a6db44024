"""The motion module against the equations (a slow reference written here) and diffusers' AnimateDiff."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from einops import rearrange
from torch import nn

from anim_lab.motion import (
    MOTION_SD15,
    MOTION_TINY,
    MotionModule,
    TemporalAttnProcessor,
    motion_module_kwargs,
    sinusoidal_position_encoding,
)
from anim_lab.plain import randomize
from anim_lab.weights import motion_keys_to_diffusers

C, HEADS, GROUPS, MAX_LEN = 16, 4, 4, 32
B, F, H, W = 2, 5, 3, 4


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return randomize(MotionModule(C, num_attention_heads=HEADS, norm_num_groups=GROUPS)).eval()


@pytest.fixture(scope="module")
def video():
    return torch.randn(B * F, C, H, W, generator=torch.Generator().manual_seed(1))  # (B*F, C, H, W)


# --- the slow reference: loops and explicit formulas, no anim_lab or diffusers code ---------------
def slow_motion_module(m: MotionModule, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    tt = m.temporal_transformer
    block = tt.transformer_blocks[0]
    bf, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(bf):  # GroupNorm of each frame on its own: statistics over (C/G, H, W) of that frame
        for g in range(GROUPS):
            sl = slice(g * c // GROUPS, (g + 1) * c // GROUPS)
            chunk = x[i, sl]
            mean, var = chunk.mean(), chunk.var(unbiased=False)
            out[i, sl] = (chunk - mean) / torch.sqrt(var + 1e-6)
    out = out * tt.norm.weight[:, None, None] + tt.norm.bias[:, None, None]

    def layer_norm(v, ln):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias

    def linear(v, lin):
        return v @ lin.weight.T + (lin.bias if lin.bias is not None else 0)

    pe = torch.tensor(
        [
            [
                math.sin(p / 10000 ** (k / c)) if k % 2 == 0 else math.cos(p / 10000 ** ((k - 1) / c))
                for k in range(c)
            ]
            for p in range(num_frames)
        ]
    )  # (F, C): sin on even channels, cos on odd ones
    # (B*F, C, H, W) -> (B, H*W, F, C): for every pixel of every video, its F frames
    seq = torch.stack(
        [
            out[b * num_frames : (b + 1) * num_frames].flatten(2).permute(2, 0, 1)
            for b in range(bf // num_frames)
        ]
    )
    s = linear(seq, tt.proj_in)
    for attn, ln in zip(block.attention_blocks, block.norms, strict=True):
        n = layer_norm(s, ln) + pe  # PE after the LayerNorm; the residual stream s has none
        q, k, v = linear(n, attn.to_q), linear(n, attn.to_k), linear(n, attn.to_v)
        d = c // HEADS
        heads = []
        for hd in range(HEADS):
            qs, ks, vs = (t[..., hd * d : (hd + 1) * d] for t in (q, k, v))
            weights = torch.softmax(
                qs @ ks.transpose(-1, -2) / math.sqrt(d), dim=-1
            )  # (B, HW, F, F) over frames
            heads.append(weights @ vs)
        s = s + linear(torch.cat(heads, -1), attn.to_out[0])
    proj, down = block.ff.net[0].proj, block.ff.net[2]
    a, gate = linear(layer_norm(s, block.ff_norm), proj).chunk(2, dim=-1)
    s = s + linear(a * torch.nn.functional.gelu(gate), down)  # GEGLU
    delta = linear(s, tt.proj_out)  # (B, HW, F, C)
    result = x.clone()
    for b in range(bf // num_frames):
        result[b * num_frames : (b + 1) * num_frames] += (
            delta[b].permute(1, 2, 0).reshape(num_frames, c, h, w)
        )
    return result


def test_position_encoding_formula():
    pe = sinusoidal_position_encoding(6, 8)[0]  # (6, 8)
    for p in range(6):
        for i in range(4):
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 8)), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 8)), abs=1e-6)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_position_encoding(4, 7)


def test_motion_module_equals_slow_reference(module, video):
    with torch.no_grad():
        fast = module(video, num_frames=F)
        slow = slow_motion_module(module, video, F)
    assert (fast - video).abs().max() > 0.1  # the module does something
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_fresh_module_is_exactly_the_identity(video):
    m = MotionModule(C, num_attention_heads=HEADS, norm_num_groups=GROUPS)
    with torch.no_grad():
        assert torch.equal(m(video, num_frames=F), video)


class PerFrameGroupNorm(nn.Module):
    """diffusers' norm, made per frame: (B, C, F, H, W) -> GroupNorm on each frame -> (B, C, F, H, W)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        f = x.shape[2]
        y = self.norm(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(y, "(b f) c h w -> b c f h w", f=f)


def test_matches_diffusers_animatediff_block_only_with_per_frame_norm(module, video):
    ours = module.temporal_transformer.state_dict()
    theirs = AnimateDiffTransformer3D(
        num_attention_heads=HEADS,
        attention_head_dim=C // HEADS,
        in_channels=C,
        norm_num_groups=GROUPS,
        activation_fn="geglu",
        attention_bias=False,
        double_self_attention=True,
        positional_embeddings="sinusoidal",
        num_positional_embeddings=MAX_LEN,
    ).eval()
    theirs.load_state_dict(motion_keys_to_diffusers(ours), strict=True)
    with torch.no_grad():
        expected = module(video, num_frames=F)
        as_is = theirs(video, num_frames=F)
        theirs.norm = PerFrameGroupNorm(theirs.norm)
        per_frame = theirs(video, num_frames=F)
    # As is, diffusers' GroupNorm pools statistics over all F frames: same weights, another function.
    assert (as_is - expected).abs().max() > 1e-2
    torch.testing.assert_close(per_frame, expected, atol=1e-5, rtol=1e-5)


def test_frame_order_needs_the_position_encoding(video):
    """Attention is permutation-equivariant: without PE, shuffling frames shuffles the output the same way."""
    order = torch.tensor([3, 0, 4, 1, 2])
    perm = rearrange(rearrange(video, "(b f) c h w -> b f c h w", f=F)[:, order], "b f c h w -> (b f) c h w")
    for with_pe in (False, True):
        m = randomize(
            MotionModule(
                C, num_attention_heads=HEADS, norm_num_groups=GROUPS, temporal_position_encoding=with_pe
            )
        ).eval()
        with torch.no_grad():
            out = rearrange(m(video, F), "(b f) c h w -> b f c h w", f=F)[:, order]
            out_of_perm = rearrange(m(perm, F), "(b f) c h w -> b f c h w", f=F)
        equivariant = torch.allclose(out, out_of_perm, atol=1e-5)
        assert equivariant == (not with_pe)


def test_frames_of_different_videos_do_not_mix(module, video):
    other = video.clone()
    other[F:] = torch.randn_like(other[F:])  # change the second video only
    with torch.no_grad():
        assert torch.allclose(module(video, F)[:F], module(other, F)[:F], atol=1e-6)


def test_bad_inputs():
    m = MotionModule(
        C, num_attention_heads=HEADS, norm_num_groups=GROUPS, temporal_position_encoding_max_len=4
    )
    with pytest.raises(ValueError, match="max_len=4"):
        m(torch.randn(5, C, 2, 2), num_frames=5)
    with pytest.raises(ValueError, match="multiple of num_frames"):
        m(torch.randn(7, C, 2, 2), num_frames=2)
    with pytest.raises(ValueError, match=r"\(B\*F, C, H, W\)"):
        m(torch.randn(1, C, 2, 2, 2), num_frames=1)
    with pytest.raises(ValueError, match="heads"):
        MotionModule(18, num_attention_heads=4, norm_num_groups=2)
    with pytest.raises(ValueError, match="Temporal_Self"):
        MotionModule(C, num_attention_heads=HEADS, norm_num_groups=GROUPS, attention_block_types=("Spatial",))


def test_motion_presets():
    assert motion_module_kwargs(MOTION_SD15) == {
        "num_attention_heads": 8,
        "num_transformer_block": 1,
        "attention_block_types": ("Temporal_Self", "Temporal_Self"),
        "temporal_position_encoding": True,
        "temporal_position_encoding_max_len": 32,
        "norm_num_groups": 32,
        "zero_initialize": True,
    }
    assert MOTION_TINY["motion_module_resolutions"] == (1, 2, 4, 8)
    # 28 keys per module, as in motion_module.pth
    with torch.device("meta"):
        assert len(MotionModule(320, **motion_module_kwargs(MOTION_SD15)).state_dict()) == 28


def test_temporal_attention_is_a_plain_attention_with_a_processor(module, video):
    attn = module.temporal_transformer.transformer_blocks[0].attention_blocks[0]
    assert type(attn) is Attention and isinstance(attn.processor, TemporalAttnProcessor)
    names = [n for n, _ in attn.named_buffers()]
    assert names == ["pos_encoder.pe"]  # the checkpoints' key, attention_blocks.i.pos_encoder.pe
    seq = rearrange(video, "bf c h w -> bf (h w) c")  # (B*F, HW, C)
    # the processor equals diffusers' own processor run on (B*HW, F, C) sequences with the PE added
    frames = rearrange(seq, "(b f) d c -> (b d) f c", f=F) + sinusoidal_position_encoding(MAX_LEN, C)[:, :F]
    plain = AttnProcessor2_0()(attn, frames)
    torch.testing.assert_close(attn(seq, num_frames=F), rearrange(plain, "(b d) f c -> (b f) d c", b=B))
    with pytest.raises(ValueError, match=r"attn\(hidden_states, num_frames=F\)"):
        attn(seq)
