"""Joint diffusion through attention processors (anim_lab.joint, issue 28 §4), against a plain implementation
written here from seed 002's notes: the notes' way, every BasicTransformerBlock's forward replaced and the
LoRA layers computed per sample from a mask, all from the weights."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn import functional as F

from anim_lab.configs import TINY
from anim_lab.errors import InputError
from anim_lab.joint import (
    JointAttnProcessor,
    add_joint_layers,
    joint_attention,
    joint_lora_targets,
    own_lora_targets,
)
from anim_lab.lora import LORA_TARGETS, lora_config
from anim_lab.plain import randomize
from anim_lab.unet import VideoUNet, build_unet2d

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on adapter 2+

IS_X = torch.tensor([1, 0, 0, 1]).bool()  # two pairs: sample 0 (x) with 1 (y), sample 3 (x) with 2 (y)
MASKS = {"y": ~IS_X, "xy": IS_X, "yx": ~IS_X}  # the notes' set_patch_lora_mask(unet, name, mask)


def joint_unet(seed: int = 0, adapters: bool = True):
    """diffusers' 2D UNet at TINY size with joint layers and the three masked adapters; every weight random
    and nonzero (the "zero-initialised" conv and the LoRA B matrices too)."""
    torch.manual_seed(seed)
    unet = build_unet2d(TINY.unet)
    add_joint_layers(unet)
    if adapters:
        unet.add_adapter(lora_config(2, 3, target_modules=own_lora_targets()), adapter_name="y")
        unet.add_adapter(lora_config(4, 2, target_modules=joint_lora_targets()), adapter_name="xy")
        unet.add_adapter(lora_config(2, 2, target_modules=joint_lora_targets()), adapter_name="yx")
        unet.set_adapters(["y", "xy", "yx"])
    return randomize(unet, seed).eval().requires_grad_(False)


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(n, 4, 8, 8, generator=g),
        torch.tensor([5, 5, 900, 900]),  # a timestep per pair
        torch.randn(n, 2, TINY.unet["cross_attention_dim"], generator=g),
    )


# --- the plain implementation (the notes: a replaced block forward and hacked LoRA layers) -----------------
def plain_linear(layer, x, masks):
    """W x + b + sum_a mask_a (alpha_a / r_a) B_a A_a x, from the weights; x (N, L, in)."""
    base = getattr(layer, "base_layer", layer)
    out = x @ base.weight.T + (0 if base.bias is None else base.bias)  # SD1.5's q/k/v have no bias
    for name in getattr(layer, "lora_A", {}):
        scale = layer.lora_alpha[name] / layer.r[name]
        delta = scale * (x @ layer.lora_A[name].weight.T) @ layer.lora_B[name].weight.T
        out = out + masks[name].float()[:, None, None] * delta
    return out


def plain_attention(attn, x, context, masks):
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    q, k, v = (plain_linear(attn.to_q, x, masks), plain_linear(attn.to_k, context, masks),
               plain_linear(attn.to_v, context, masks))  # fmt: skip
    n, length, channels = q.shape
    d = channels // attn.heads
    q, k, v = (t.reshape(n, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))  # (N, heads, L, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, length, channels)
    return plain_linear(attn.to_out[0], out, masks)


def plain_block(block, is_x, masks, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
    """BasicTransformerBlock.forward (SD1.5's layer_norm type) with the notes' joint attention."""
    norm = F.layer_norm(hidden_states, hidden_states.shape[-1:], block.norm1.weight, block.norm1.bias)
    attn_output = plain_attention(block.attn1, norm, norm, masks)
    joint_encoder_hidden_states = torch.empty_like(norm)  # the notes' swap within each pair
    joint_encoder_hidden_states[~is_x] = norm[is_x]
    joint_encoder_hidden_states[is_x] = norm[~is_x]
    attn_output1n = plain_attention(block.attn1.joint_attn, norm, joint_encoder_hidden_states, masks)
    conv = block.attn1.joint_conv  # Conv1d(C, C, 1) over (N, C, L)
    attn_output1n = F.conv1d(attn_output1n.transpose(1, 2), conv.weight, conv.bias).transpose(1, 2)
    hidden_states = attn_output + attn_output1n + hidden_states
    norm = F.layer_norm(hidden_states, hidden_states.shape[-1:], block.norm2.weight, block.norm2.bias)
    hidden_states = plain_attention(block.attn2, norm, encoder_hidden_states, masks) + hidden_states
    norm = F.layer_norm(hidden_states, hidden_states.shape[-1:], block.norm3.weight, block.norm3.bias)
    proj = block.ff.net[0].proj  # GEGLU: (h, gate) = proj(x); h * gelu(gate)
    h, gate = (norm @ proj.weight.T + proj.bias).chunk(2, dim=-1)
    return (h * F.gelu(gate)) @ block.ff.net[2].weight.T + block.ff.net[2].bias + hidden_states


def test_joint_attention_matches_the_notes_plain_implementation(monkeypatch):
    unet = joint_unet()
    conv = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.joint_conv")
    layer = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.joint_attn.to_q")
    assert conv.weight.abs().min() > 0 and layer.lora_B["xy"].weight.abs().min() > 0  # nothing vacuous
    sample, t, tokens = inputs()
    with torch.no_grad(), joint_attention(unet, IS_X, MASKS) as joint:
        out = unet(sample, t, tokens).sample
        joint.enabled = False
        without = unet(sample, t, tokens).sample
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())  # restored on exit

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 10  # 3 down + 1 mid + 6 up transformer blocks
    for block in blocks:  # the notes' way: each block's forward replaced
        monkeypatch.setattr(
            block, "forward", lambda *a, block=block, **k: plain_block(block, IS_X, MASKS, *a, **k)
        )
    with torch.no_grad():
        plain = unet(sample, t, tokens).sample
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert (out - without).abs().max() > 1e-2  # the joint path counts


def test_with_the_conv_at_zero_it_is_the_plain_unet_and_each_sample_gets_its_own_lora():
    unet = joint_unet()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("joint_conv"):
                module.weight.zero_(), module.bias.zero_()
    sample, t, tokens = inputs()
    with torch.no_grad(), joint_attention(unet, IS_X, MASKS):
        out = unet(sample, t, tokens).sample
    with torch.no_grad():
        unet.disable_adapters()
        base = unet(sample, t, tokens).sample  # diffusers' own forward and processors, no LoRA
        unet.enable_adapters()
        unet.set_adapters("y")
        with_y = unet(sample, t, tokens).sample  # peft's own forward: "y" on every sample
    torch.testing.assert_close(out[IS_X], base[IS_X], rtol=0, atol=1e-6)  # x: the base model
    torch.testing.assert_close(out[~IS_X], with_y[~IS_X], rtol=0, atol=1e-6)  # y: the base model + LoRA y
    assert (with_y - base).abs().max() > 1e-2

    plain = randomize(build_unet2d(TINY.unet), 0).eval()  # a UNet that never had joint layers
    joint = joint_unet(adapters=False)
    with torch.no_grad():
        for name, module in joint.named_modules():
            if name.endswith("joint_conv"):
                module.weight.zero_(), module.bias.zero_()
        plain.load_state_dict({k: v for k, v in joint.state_dict().items() if ".joint_" not in k})
        with joint_attention(joint, IS_X):
            torch.testing.assert_close(
                joint(sample, t, tokens).sample, plain(sample, t, tokens).sample, rtol=0, atol=1e-6
            )


def test_a_video_unet_pairs_videos_frame_by_frame():
    """VideoUNet rows are (b f): a y video reads its own x video's frames, no other pair's."""
    torch.manual_seed(0)
    unet = VideoUNet(TINY.unet)  # stage 1: no motion modules
    add_joint_layers(unet)
    randomize(unet, 1).eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 4, 2, 8, 8, generator=g)  # (N, 4, F, h, w)
    tokens = torch.randn(4, 1, TINY.unet["cross_attention_dim"], generator=g)
    other = sample.clone()
    other[3] += 1  # change the x member of the second pair
    with torch.no_grad(), joint_attention(unet, IS_X):
        a, b = unet(sample, 5, tokens), unet(other, 5, tokens)
    assert torch.equal(a[:2], b[:2])  # the first pair does not see it
    assert (a[2] - b[2]).abs().max() > 1e-3  # the partner does


def test_joint_attention_refuses_what_it_cannot_do():
    unet = joint_unet(adapters=False)
    with pytest.raises(InputError, match="already has its joint layers"):
        add_joint_layers(unet)
    fresh = build_unet2d(TINY.unet)
    fresh.add_adapter(lora_config(2, target_modules=LORA_TARGETS))
    with pytest.raises(InputError, match="add the joint layers first, then the adapters"):
        add_joint_layers(fresh)
    with pytest.raises(InputError, match="call anim_lab.joint.add_joint_layers first"):
        joint_attention(build_unet2d(TINY.unet)).__enter__()
    with pytest.raises(InputError, match=r"as many x samples as y samples .*1 x and 2 y"):
        joint_attention(unet, [1, 0, 0]).__enter__()
    sample, t, tokens = inputs()
    with joint_attention(unet), pytest.raises(RuntimeError, match="set_pairs"):
        unet(sample, t, tokens)
    assert not any(isinstance(p, JointAttnProcessor) for p in unet.attn_processors.values())
    # a masked adapter in a feed-forward layer: no processor could apply its mask there
    unet.add_adapter(lora_config(2, target_modules=["ff.net.2"]), adapter_name="ff")
    with pytest.raises(InputError, match=r"masked LoRA adapters \['ff'\] sit in layers .*ff\.net\.2"):
        joint_attention(unet, IS_X, {"ff": IS_X}).__enter__()
