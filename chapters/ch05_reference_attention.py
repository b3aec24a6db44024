# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["core"]
# # Chapter 05 — Reference attention: the ReferenceNet's bank
#
# *How AnimateAnyone keeps the reference portrait's appearance: a second UNet encodes the portrait once, and
# every spatial self-attention of the denoising UNet attends to its features as well as to its own frame.*
#
# - **You will build**: the bank of a ReferenceNet at SD1.5 size (meta), the writer↔reader pairing both ways
#   (the reference code's width sort and anim_lab's names), a reader re-derived by hand and checked against
#   the library, the unconditional rows under CFG, the proof that the ReferenceNet's output is never used,
#   the attention work the reference code wastes; then, on the trained toy animator, the share of each
#   reader's attention that goes to the bank during a real generation (measured by hooks, the reader
#   re-derived), generation with and without reference attention, the bank written at t = 0 vs t = 500,
#   and what the reference code's unused `attn_weight` would select
# - **Library modules**: `anim_lab.reference` (`reference_attention`, `ReferenceBank`, the writer/reader
#   processors), `anim_lab.unet` (`ReferenceUNet`, `VideoUNet`, `attn_processors`), `anim_lab.inspect`,
#   `anim_lab.toy` (`load_animator`), `anim_lab.pipelines.pose2video` (the switches
#   `use_reference_attention`, `reference_timestep`, `fusion_blocks`); `scripts/eval_animator.py` (held-out
#   cases, the identity probe)
# - **Questions answered**: Why run the ReferenceNet on clean reference latents (t = 0), and what is stored?
#   What does the bank hold at every block, and how much memory at 512² with CFG? Why does each writer pair
#   with exactly one reader, and does the reference code's sort by width pair them by name? Why does the
#   ReferenceNet need no `conv_out`? What do the unconditional rows see? How much attention work does the
#   reference code waste, and what does anim_lab save? In a trained model, how much of each block's attention
#   goes to the reference? What is lost without reference attention, in pictures and in errors against the
#   ground truth (whole frame and face)? What changes when the ReferenceNet sees a noised reference at
#   t = 500 instead of the clean one at t = 0? What is the reference code's `attn_weight` for?
# - **CPU runtime**: about 30 s (chapters/README.md)
#
# Full-size shapes and FLOPs come from the `meta` device; sections 1–7 run on the TINY preset with random
# weights; section 8 uses the trained toy animator shipped in `anim_lab/assets/toy_animator`.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: no stderr

import diffusers
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange, repeat

import anim_lab
from anim_lab import metrics
from anim_lab.configs import SD15, TINY
from anim_lab.inspect import count_flops, format_table, human
from anim_lab.landmarks import FACE_OVAL
from anim_lab.motion import MOTION_SD15, MOTION_TINY
from anim_lab.reference import pair_blocks, reference_attention
from anim_lab.toy import load_animator
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d
from anim_lab.vae import images_from_uint8
from anim_lab.viz import image_grid, save

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and steady on a busy machine
torch.set_grad_enabled(False)  # inference, except where a section turns gradients on
torch.set_printoptions(precision=3, sci_mode=False)
print(
    f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
    f"matplotlib {matplotlib.__version__}"
)

# %% [markdown] tags=["core"]
# ## 1. The idea in one formula
#
# - The ReferenceNet (`reference_unet`) is SD1.5's 2D UNet with its own weights. It runs **once per
#   generation** on the reference portrait's VAE latent at **t = 0**: the latent is clean, so the network is
#   asked "what is in this image", not "what noise is in it". Its prediction is thrown away; what is kept is
#   the input of every spatial self-attention (`attn1`, the `norm1` output), `x_ref` of shape `(1, HW, C)`.
# - In the denoising UNet, the same-named `attn1` lets each frame's tokens `x` (queries) attend to their own
#   tokens **and** the reference tokens, with the denoiser's own projection weights:
#
# $$\mathrm{attn1}(x) = \mathrm{softmax}\!\left(\frac{Q\,[K_x;K_r]^\top}{\sqrt d}\right)[V_x;V_r],\qquad
# Q = xW_q,\; K_x = xW_k,\; V_x = xW_v,\; K_r = x_{ref}W_k,\; V_r = x_{ref}W_v$$
#
# - So a pixel of frame f can copy appearance (face, clothes, background) from any pixel of the reference,
#   wherever the pose has moved it. With CFG, the unconditional rows use plain self-attention (section 5).
#
# anim_lab does it with attention processors and a bank keyed by module name:

# %% tags=["core"]
reference_unet = ReferenceUNet(TINY.unet).eval()
denoising_unet = VideoUNet(TINY.unet, MOTION_TINY).eval()
for module in (reference_unet, denoising_unet):  # random nonzero weights everywhere, as after training
    for p in module.parameters():
        if (p == p.flatten()[0]).all():  # zero-initialised motion proj_out, norm scales (1) and biases (0)
            p.add_(torch.randn_like(p) * 0.1)

B, F, S = 1, 4, 8  # one video of 4 frames, 8x8 latents (64x64 pixels)
D = TINY.unet["cross_attention_dim"]
latents = torch.randn(B, 4, F, S, S)  # (B, C, F, H, W)
ref_latents = torch.randn(B, 4, S, S)  # the reference portrait's latent (B, C, H, W)
clip_tokens = torch.randn(B, 1, D)  # one CLIP image token
with reference_attention(reference_unet, denoising_unet, fusion_blocks="full") as bank:
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)  # runs the ReferenceNet once
    with_reference = denoising_unet(latents, 500, clip_tokens)
without_reference = denoising_unet(latents, 500, clip_tokens)  # outside the block: processors restored
print("bank blocks:", len(bank.names), "| output", tuple(with_reference.shape))
print("the reference changes the prediction:", not torch.allclose(with_reference, without_reference))
print(
    "after the with block, the processors are back:",
    sorted({type(p).__name__ for p in denoising_unet.attn_processors.values()}),
)

# %% [markdown] tags=["core"]
# ## 2. What the bank holds, at SD1.5 size
#
# - One entry per spatial transformer block: 16 in SD1.5 (down 0–2 × 2, mid × 1, up 1–3 × 3), each
#   `(B, HW, C)` at that block's resolution and width. Built on the `meta` device: shapes, no memory.
# - 512×512 pixels → 64×64 latents → 4096 tokens at width 320, 1024 at 640, 256 at 1280 (64 in the mid block).

# %% tags=["core"]
with torch.device("meta"):
    ref_sd15 = ReferenceUNet(SD15.unet)
    den_sd15 = VideoUNet(SD15.unet, MOTION_SD15)
    with reference_attention(ref_sd15, den_sd15, do_classifier_free_guidance=True) as sd15_bank:
        sd15_bank.write(torch.empty(1, 4, 64, 64), 0, torch.empty(1, 1, 768))
        entries = {n: tuple(v.shape) for n, v in sd15_bank.entries.items()}
rows = [
    [n.removesuffix(".transformer_blocks.0.attn1"), str(s), human(2 * s[0] * s[1] * s[2], "B")]
    for n, s in entries.items()
]
print(format_table(rows, ["block", "entry (B, HW, C)", "fp16"]))
bank_bytes = sum(2 * s[0] * s[1] * s[2] for s in entries.values())  # fp16: 2 bytes per value
print(f"the whole bank, one reference, fp16: {human(bank_bytes, 'B')}")

# %% [markdown] tags=["core"]
# With CFG at 512² and a 16-frame window, what each way keeps and builds (fp16):
#
# - the reference code runs the ReferenceNet on the CFG-doubled batch (2 rows), keeps the writers' lists and
#   clones them into the readers (2 × 2 rows), and at every `attn1` call builds the bank **repeated for all
#   2 × 16 rows** and concatenated to the tokens, then projects that to K and V;
# - anim_lab keeps 1 row, and its projected K, V (1 row each), reused for all frames and steps.

# %% tags=["core"]
frames, cfg_rows = 16, 2
largest = max(entries.values(), key=lambda s: s[1] * s[2])  # the 320-wide blocks: 4096 tokens
per_call_ref = 2 * cfg_rows * frames * largest[1] * largest[2]  # the repeated bank, fp16
kept = {
    "reference code": 2 * cfg_rows * bank_bytes,  # writer lists + reader clones, 2 rows each
    "anim_lab": 3 * bank_bytes,  # bank + K_ref + V_ref, 1 row
}
for who, size in kept.items():
    print(f"{who:15s} kept for the whole generation: {human(size, 'B')}")
print(
    f"reference code, built again at each call of a 320-wide attn1: repeated bank {human(per_call_ref, 'B')}"
)

# %% [markdown] tags=["core"]
# ## 3. Why each writer pairs with exactly one reader
#
# - Both UNets are built from **the same SD1.5 config**: same blocks, same names, same widths. The
#   ReferenceNet's block `down_blocks.1.attentions.0.transformer_blocks.0` sees the reference at the same
#   resolution and width as the denoiser's block of the same name, so its tokens can be concatenated there.
# - anim_lab pairs by that name. The reference code does not use names: it lists the transformer blocks of
#   each UNet depth-first, **sorts each list by width (descending, stable)** and zips the two lists.
# - The reference's writer is diffusers' `UNet2DConditionModel`, whose modules are registered in the order
#   down_blocks, up_blocks, mid_block; its `UNet3DConditionModel` registers them in the same order.


# %% tags=["core"]
def transformer_blocks(unet, order=("down_blocks", "up_blocks", "mid_block")):
    """(name, width) of the BasicTransformerBlocks, depth-first over the parts in the given order."""
    return [
        (f"{part}.{n}" if n else part, m.norm1.normalized_shape[0])
        for part in order
        for n, m in getattr(unet, part).named_modules()
        if isinstance(m, BasicTransformerBlock)
    ]


def width_sort(blocks):
    return sorted(blocks, key=lambda b: -b[1])  # Python's sort is stable: ties keep the depth-first order


with torch.device("meta"):
    writer_2d = build_unet2d(SD15.unet)  # the reference code's ReferenceNet class
writers = width_sort(transformer_blocks(writer_2d))
readers = width_sort(transformer_blocks(den_sd15))
print(
    format_table(
        [[w, c, r] for (w, c), (r, _) in zip(writers, readers, strict=True)], ["writer", "width", "reader"]
    )
)
print(
    "the width sort pairs every block with its namesake:",
    all(w == r for (w, _), (r, _) in zip(writers, readers, strict=True)),
)
by_name = [n.removesuffix(".attn1") for n in pair_blocks(ref_sd15, den_sd15)]
print("and those are exactly anim_lab's name pairs:", sorted(by_name) == sorted(w for w, _ in writers))

# %% [markdown] tags=["core"]
# The sort works only because both UNets list their blocks in the same order. anim_lab's `VideoUNet`
# registers its parts down, **mid**, up; if the reference code's sort were applied to such a reader list
# against diffusers' writer order, the 1280-wide group would shift by one:

# %% tags=["core"]
readers_other_order = width_sort(transformer_blocks(den_sd15, ("down_blocks", "mid_block", "up_blocks")))
wrong = [(w, r) for (w, _), (r, _) in zip(writers, readers_other_order, strict=True) if w != r]
print(f"{len(wrong)} of 16 pairs wrong, e.g.:")
for w, r in wrong[:3]:
    print(f"  writer {w:38s} -> reader {r}")

# %% [markdown] tags=["core"]
# A wrong pair is not an error in the reference code: the shapes still match (same width), so the reader
# would silently attend to the features of another block at another depth (here, the mid block reads up
# block 1's). Pairing by name cannot go wrong this way, and a mismatch of names or widths is an error that
# names the blocks (`pair_blocks`).
#
# ## 4. The reader, by hand, on one block
#
# Capture one block's `attn1` input, the bank entry and the library's output, then recompute the output
# from the formula above with explicit heads and softmax.

# %% tags=["core"]
name = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"  # full resolution: 8x8 tokens
attn = denoising_unet.get_submodule(name)
seen = {}
hook = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
x_cfg = torch.cat([latents] * 2)  # CFG: [uncond ; cond]
tokens_cfg = torch.cat([torch.zeros_like(clip_tokens), clip_tokens])
with reference_attention(reference_unet, denoising_unet, do_classifier_free_guidance=True) as bank:
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)
    out_cfg = denoising_unet(x_cfg, 500, tokens_cfg)
    x_ref = bank.entries[name]  # (B, HW, C)
hook.remove()
x, library = seen["x"], seen["out"]  # (2*B*F, HW, C): uncond frames, then cond frames
print("attn1 input", tuple(x.shape), "| bank entry", tuple(x_ref.shape))

# %% tags=["core"]
heads = attn.heads


def attend(queries, keys_values):
    """softmax(Q K^T / sqrt(d)) V with explicit heads; returns the output and the attention weights."""
    q = rearrange(attn.to_q(queries), "n l (h d) -> n h l d", h=heads)
    k = rearrange(attn.to_k(keys_values), "n l (h d) -> n h l d", h=heads)
    v = rearrange(attn.to_v(keys_values), "n l (h d) -> n h l d", h=heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (n, h, L, L_kv)
    return attn.to_out[0](rearrange(weights @ v, "n h l d -> n l (h d)")), weights


x_uncond, x_cond = x[: B * F], x[B * F :]
ref_per_frame = repeat(x_ref, "b l c -> (b f) l c", f=F)  # every frame of video b sees reference b
by_hand_cond, w_cond = attend(x_cond, torch.cat([x_cond, ref_per_frame], dim=1))  # own ; reference tokens
by_hand_uncond, w_uncond = attend(x_uncond, x_uncond)  # unconditional rows: own tokens only
torch.testing.assert_close(torch.cat([by_hand_uncond, by_hand_cond]), library, atol=1e-5, rtol=1e-5)
print("reader re-derived by hand: matches the library")

# %% [markdown]
# ## 5. What the unconditional rows see
#
# - With CFG the denoiser runs `[uncond ; cond]` rows. The reference code marks the first half with `uc_mask`
#   and recomputes their `attn1` **without** the reference; they also get zero CLIP tokens. So the
#   unconditional prediction knows neither the reference's appearance nor its CLIP embedding, and the
#   guidance scale pushes towards both at once.
# - anim_lab: the bank's `do_classifier_free_guidance` says the first half of the videos is unconditional
#   (the layout of diffusers' pipelines); the number of frames comes from the call, never a hard-coded 16.

# %%
plain_zero_tokens = denoising_unet(latents, 500, torch.zeros_like(clip_tokens))  # no reference at all
print(
    "uncond rows == plain UNet with zero CLIP tokens:",
    torch.allclose(out_cfg[:B], plain_zero_tokens, atol=1e-5),
)
share = w_cond[..., x_cond.shape[1] :].sum(-1).mean().item()  # attention mass on the reference tokens
print(
    f"cond rows at {name.split('.transformer')[0]}: {share:.2f} of the attention goes to the reference tokens"
)

# %%
hw = x_cond.shape[1]
side = int(hw**0.5)
query = hw // 2 + side // 2  # a pixel in the middle of frame 0
maps = {
    "cond row: own frame": w_cond[0, :, query, :hw].mean(0),
    "cond row: reference": w_cond[0, :, query, hw:].mean(0),
    "uncond row: own frame": w_uncond[0, :, query].mean(0),
}
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
vmax = max(m.max().item() for m in maps.values())
for ax, (title, m) in zip(axes, maps.items(), strict=True):
    ax.imshow(m.reshape(side, side), cmap="magma", vmin=0, vmax=vmax)
    ax.plot(query % side, query // side, "c+", ms=12)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.suptitle(
    f"attention weights of one query pixel (+), {name.split('.transformer')[0]}, mean of {heads} heads; "
    "random weights",
    fontsize=9,
)
fig.tight_layout()
_ = save(fig, "ch05_attention_maps")
plt.show()

# %% [markdown]
# ## 6. Why the ReferenceNet needs no `conv_out`
#
# - The ReferenceNet's prediction is never used: only the writers' inputs are. Everything **after the last
#   writer** (the last block's `attn2`, feed-forward and `proj_out`, and SD's `conv_norm_out`/`conv_out`)
#   cannot change the result, so the reference code drops `conv_norm_out`/`conv_out` (and `reference_unet.pth`
#   has no such keys). Proof by perturbation, then by gradient:


# %%
def denoise_with(reference):
    with reference_attention(reference, denoising_unet) as bank:
        bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)
        return denoising_unet(latents, 500, clip_tokens)


last = reference_unet.up_blocks[-1].attentions[-1]  # holds the last writer
saved = {k: v.clone() for k, v in reference_unet.state_dict().items()}
for module in (last.transformer_blocks[0].attn2, last.transformer_blocks[0].ff, last.proj_out):
    for p in module.parameters():
        p.add_(torch.randn_like(p))  # scramble everything after the last writer
print(
    "after the last writer scrambled, identical output:",
    torch.equal(denoise_with(reference_unet), with_reference),
)
last.transformer_blocks[0].norm1.weight.add_(1.0)  # the last writer's own input
print(
    "the last writer's norm1 changed, identical output:  ",
    torch.equal(denoise_with(reference_unet), with_reference),
)
_ = reference_unet.load_state_dict(saved)

# %%
with torch.enable_grad():
    loss = denoise_with(reference_unet).square().mean()  # any loss on the denoiser's prediction
    loss.backward()
unused = [n for n, p in reference_unet.named_parameters() if p.grad is None or not p.grad.any()]
prefix = f"up_blocks.3.attentions.{len(reference_unet.up_blocks[-1].attentions) - 1}."  # last writer's
print(
    f"{len(unused)} ReferenceNet tensors get no gradient; all in {prefix[:-1]}:",
    all(n.startswith(prefix) for n in unused),
)
print(
    "  ", sorted({n.removeprefix(prefix).removeprefix("transformer_blocks.0.").split(".")[0] for n in unused})
)
block3 = {n: p.numel() for n, p in reference_unet.named_parameters() if n.startswith("up_blocks.3.")}
reached = sum(size for n, size in block3.items() if n not in unused)
print(f"up_blocks.3: {reached / sum(block3.values()):.0%} of its parameters get a gradient")
reference_unet.zero_grad(set_to_none=True)

# %% [markdown]
# A `conv_out` would only add FLOPs and weights that never receive a gradient, so the reference code drops
# it. The dead tensors listed above stay, and the reference's stage-1 script does not single them out: it
# freezes the ReferenceNet's **whole** `up_blocks.3` ("some top layer params don't need grad"), although
# most of that block does get a gradient (the share printed above; chapter 10 measures it on the trained toy
# model), because its resnets and first writers shape bank entries the denoiser reads. And it builds its
# accelerator with `find_unused_parameters=True`, the DDP setting for parameters without a gradient, which
# it needs anyway: on its unconditional steps (`uncond_ratio` 0.1) the ReferenceNet does not run at all.
# So the freeze is a choice that saves the backward pass through the largest block, not a consequence of
# the dead tail.
#
# ## 7. The attention work the reference code wastes
#
# Counted with FLOPs on the `meta` device (no timings), one denoising step of the SD1.5 UNet with motion
# modules, 16 frames of 32×32 latents (256² pixels), CFG. The reference code's reader, written here as it
# does it: bank repeated over frames, concatenated, projected with the own tokens, and the unconditional rows
# computed twice.


# %%
class ReferenceCodeReader(AttnProcessor2_0):
    """attn1 the way the reference code reads the bank (bank: 2 rows, the CFG-doubled ReferenceNet batch)."""

    def __init__(self, entry, frames):
        super().__init__()
        self.entry, self.frames = entry, frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        bank = repeat(self.entry, "b l c -> (b f) l c", f=self.frames)  # materialised for every frame
        out = super().__call__(attn, hidden_states, torch.cat([hidden_states, bank], dim=1))  # all rows
        half = hidden_states.shape[0] // 2  # uc_mask: the uncond rows, again without the reference
        out[:half] = super().__call__(attn, hidden_states[:half])
        return out


frames, size = 16, 32
with torch.device("meta"):
    x16 = torch.empty(2, 4, frames, size, size)  # [uncond ; cond]
    tok16 = torch.empty(2, 1, 768)
    plain_flops = count_flops(den_sd15, x16, 500, tok16)  # no reference attention
    with reference_attention(ref_sd15, den_sd15, do_classifier_free_guidance=True) as sd15_bank:
        sd15_bank.write(torch.empty(1, 4, size, size), 0, torch.empty(1, 1, 768))
        den_sd15(x16, 500, tok16)  # first step: projects the reference K/V once
        anim_lab_flops = count_flops(den_sd15, x16, 500, tok16)  # every later step
        doubled = {n: e.expand(2, -1, -1) for n, e in sd15_bank.entries.items()}
    saved_processors = den_sd15.attn_processors
    den_sd15.set_attn_processor({n: ReferenceCodeReader(e, frames) for n, e in doubled.items()})
    reference_code_flops = count_flops(den_sd15, x16, 500, tok16)
    den_sd15.set_attn_processor(saved_processors)
extra = {"reference code": reference_code_flops - plain_flops, "anim_lab": anim_lab_flops - plain_flops}
print(f"one step without reference attention: {human(plain_flops)}FLOPs")
for who, f in extra.items():
    print(f"{who:15s} reference attention adds {human(f)}FLOPs per step")
ratio_part = extra["reference code"] / extra["anim_lab"]
ratio_step = reference_code_flops / anim_lab_flops
print(f"the reference code does x{ratio_part:.2f} the reference-attention work, x{ratio_step:.2f} the step")

# %% [markdown]
# Where the difference comes from, per `attn1` of width C with L tokens, R = 2·16 rows (half unconditional):
#
# | | reference code | anim_lab |
# |---|---|---|
# | Q, K, V projections | $RL + 2 \cdot 2RL + 3 \cdot \frac{R}{2} L$ (Q; K, V; uncond again) | $3RL$ |
# | reference K, V | inside the line above, for every frame and every step | $2L$, once per generation |
# | attention | $R$ rows × $2L$ keys, then $R/2$ rows × $L$ again | $R/2$ × $2L$, $R/2$ × $L$ |
# | uncond rows | computed twice (with the reference, thrown away; then without) | once |
#
# The measured speed-up (same output, ≤ 1e-5) is in `benchmarks/bench_reference_attention.py`.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(list(extra), [f / 1e12 for f in extra.values()], color=["tab:gray", "tab:green"])
ax.set_ylabel("TFLOPs per step")
ax.set_title("reference attention's extra work, SD1.5, 16 frames 256², CFG", fontsize=9)
fig.tight_layout()
_ = save(fig, "ch05_reference_attention_work")
plt.show()

# %% [markdown]
# ## 8. The trained toy animator: where the attention goes
#
# Everything above used random weights. The toy animator (`anim_lab.toy.load_animator()`, trained by
# `scripts/train_animator.py` on the toy portrait world, 128×128 pixels, 16×16 latents) shows what a trained
# reader does with the bank. Held-out cases come from `scripts/eval_animator.py`: an identity never seen in
# training, a reference render in another pose, 8 driving pose images and the ground-truth frames.

# %%
E = anim_lab.load_script("eval_animator")  # scripts/eval_animator.py: cases, metrics, ablations

pipe = load_animator()
pipe.set_progress_bar_config(disable=True)
motion = pipe.denoising_unet.motion_kwargs
print("motion modules in the loaded denoiser:", "yes" if motion else "no (stage-1 weights)")
gallery = E.make_cases(num_cases=8, num_frames=8)  # 8 held-out identities x 8 frames
cases = gallery[:2]  # the two that are animated; all 8 serve as the identity gallery
print("reference", cases[0].reference.shape, "| poses", cases[0].poses.shape, "| truth", cases[0].truth.shape)
GEN = {"steps": 8, "cfg": 3.5, "seed": 42}  # few steps: enough on this toy world

# %% [markdown]
# **The share of attention on the reference, per block.** A forward hook on every reader `attn1` takes its
# input during a real generation (8 steps, CFG), recomputes the conditional rows' softmax over
# `[own tokens ; bank tokens]` with the block's own weights, and sums the weights that fall on the bank's
# keys. The own frame and the reference have the same number of tokens at every block, so a query that did
# not care would put half of its mass on each. To be sure the hook computes what the reader computes, it also
# rebuilds the reader's output and compares it with the library's.


# %%
def keep_entries(store, name):
    """A forward pre-hook on the ReferenceNet's writer ``name``: what its attn1 receives is the bank entry."""

    def hook(attn, args):
        store.setdefault("entries", {})[name] = args[0].detach()  # (1, L_ref, C): the reference, cond row

    return hook


def reference_share(attn, x_cond, x_ref):
    """x_cond (F, L, C) queries, x_ref (1, L_ref, C) bank entry -> output (F, L, C), share (F, heads, L)."""
    own_and_ref = torch.cat([x_cond, x_ref.expand(len(x_cond), -1, -1)], dim=1)  # (F, L + L_ref, C)
    q = rearrange(attn.to_q(x_cond), "n l (h d) -> n h l d", h=attn.heads)
    k = rearrange(attn.to_k(own_and_ref), "n l (h d) -> n h l d", h=attn.heads)
    v = rearrange(attn.to_v(own_and_ref), "n l (h d) -> n h l d", h=attn.heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (F, h, L, L + L_ref)
    out = attn.to_out[0](rearrange(weights @ v, "n h l d -> n l (h d)"))  # (F, L, C)
    return out, weights[..., x_cond.shape[1] :].sum(-1)  # mass on the bank's keys


readers = [n for n, m in pipe.denoising_unet.named_modules() if n.endswith(".attn1") and "motion" not in n]
state, shares, worst, tokens = {}, {}, [], {}  # shares[(step, block)]: mean over frames, heads, queries


def on_call(module, args):
    state["step"] = state.get("step", -1) + 1  # one denoiser call per step (one window, CFG batch)


def on_attn1(name):
    def hook(attn, args, output):
        x = args[0]  # (2F, L, C): [uncond frames ; cond frames]
        half = len(x) // 2
        entry = state["entries"][name][-1:]  # (1, L_ref, C): the conditional reference row
        by_hand, share = reference_share(attn, x[half:], entry)
        tokens[name] = entry.shape[1]
        worst.append((by_hand - output[half:]).abs().max().item())
        shares[(state["step"], name)] = share.mean().item()

    return hook


handles = [pipe.denoising_unet.register_forward_pre_hook(on_call)]
handles += [pipe.denoising_unet.get_submodule(n).register_forward_hook(on_attn1(n)) for n in readers]
handles += [
    pipe.reference_unet.get_submodule(n).register_forward_pre_hook(keep_entries(state, n)) for n in readers
]
videos = {"bank at t = 0": [E.generate(pipe, cases[0], **GEN)]}  # (F, H, W, 3) uint8
for h in handles:
    h.remove()
print(
    f"{len(readers)} readers x {state['step'] + 1} steps hooked; reader re-derived, max |diff| < 1e-4:",
    max(worst) < 1e-4,
)

# %%
steps = state["step"] + 1
rows = []
for n in readers:
    per_step = [shares[(s, n)] for s in range(steps)]
    rows.append(
        [
            n.removesuffix(".transformer_blocks.0.attn1"),
            pipe.denoising_unet.get_submodule(n).to_q.in_features,
            tokens[n],
            f"{per_step[0]:.2f}",
            f"{per_step[steps // 2]:.2f}",
            f"{per_step[-1]:.2f}",
        ]
    )
print(
    format_table(
        rows, ["block", "width", "tokens", "share step 1", f"step {steps // 2 + 1}", f"step {steps}"]
    )
)
mean_share = {n: np.mean([shares[(s, n)] for s in range(steps)]) for n in readers}
print(
    "a query that ignored content: 0.50 | blocks above it (mean over steps):",
    sum(v > 0.5 for v in mean_share.values()),
    "of",
    len(readers),
)

# %%
fig, ax = plt.subplots(figsize=(8, 3))
names = [n.removesuffix(".transformer_blocks.0.attn1").replace("attentions.", "a") for n in readers]
for s, colour in ((0, "tab:blue"), (steps - 1, "tab:orange")):
    ax.plot(names, [shares[(s, n)] for n in readers], "o-", color=colour, label=f"step {s + 1} of {steps}")
ax.axhline(0.5, color="grey", ls=":", label="a query that ignores content")
ax.set_ylabel("attention on the bank")
ax.set_ylim(0, 1)
ax.tick_params(axis="x", labelrotation=30, labelsize=7)
ax.legend(fontsize=8)
ax.set_title("trained toy animator: share of each reader's softmax on the reference tokens", fontsize=9)
fig.tight_layout()
_ = save(fig, "ch05_trained_reference_share")
plt.show()

# %% [markdown]
# - Read the table against 0.5: a block above it looks at the reference more than at its own frame, a block
#   below it less. The share is a property of the trained weights and of the step; the toy model has only
#   ten readers, SD1.5 sixteen.
# - The share says how much the reader *looks*, not how much the output *changes*: the values it copies may
#   be close to its own frame's. What the bank is worth shows only when it is taken away:

# %% [markdown]
# **With and without reading the bank.** The pipeline's switch `use_reference_attention=False` runs no
# ReferenceNet: every reader is plain self-attention. The second variant, `reference_timestep=500`, writes
# the bank from a **noised** reference at t = 500 instead of the clean latent at t = 0 — what the
# ReferenceNet would see if it shared the denoiser's timestep. Each generated frame is compared with its
# ground-truth render: PSNR and SSIM of the whole frame (`anim_lab.metrics`), and, inside the face oval of the
# ground-truth landmarks, the face PSNR and the face colour error (`metrics.colour_error`'s definition, the
# largest RGB error of the mean colour in 8-bit levels, restricted to the face). `id top-1 of 8` is the
# evaluation script's identity metric: the toy image encoder's embedding of each frame against the
# ground-truth frames (same index) of 8 held-out identities, the share whose nearest is its own (chance 1/8).


# %%
videos["bank at t = 0"].append(E.generate(pipe, cases[1], **GEN))
videos["no reference attention"] = [E.generate(pipe, c, use_reference_attention=False, **GEN) for c in cases]
noised = [E.generate(pipe, c, reference_timestep=500, **GEN) for c in cases]
videos["bank at t = 500 (noised)"] = noised
probe = E.IdentityProbe()


def identity_top1_among(videos, gallery):
    """Share of the frames of videos[i] whose nearest ground-truth frame (same index; cosine of the toy image
    encoder's embeddings), over every identity of the gallery, is identity i."""
    hits = []
    for f in range(len(gallery[0].truth)):
        keys = probe(np.stack([g.truth[f] for g in gallery]))  # (N, D) unit vectors
        queries = probe(np.stack([v[f] for v in videos]))  # (n, D)
        hits.append((queries @ keys.T).argmax(dim=1) == torch.arange(len(videos)))  # (n,)
    return torch.cat(hits).float().mean().item()


check = videos["no reference attention"]
print(
    "by hand == eval_animator.identity_top1 (gallery = the 2 cases):",
    abs(identity_top1_among(check, cases) - E.identity_top1(check, cases, probe)) < 1e-6,
)


def face_masks(case):
    """(F, 1, H, W) float: 1 inside the face oval of the ground-truth landmarks, 0 outside."""
    masks = []
    for points in case.landmarks[:, list(FACE_OVAL)]:  # (F, 36, 2) pixel (x, y)
        canvas = PIL.Image.new("L", case.truth.shape[2:0:-1])  # (W, H)
        PIL.ImageDraw.Draw(canvas).polygon([tuple(xy) for xy in points.tolist()], fill=1)
        masks.append(np.asarray(canvas))
    return torch.from_numpy(np.stack(masks)).float()[:, None]


def masked_colour_error(v, t, mask):
    """Per frame: max over RGB of |mean(v) - mean(t)| over the pixels in mask, in 8-bit levels."""
    mean = lambda x: (x * mask).sum((2, 3)) / mask.sum((2, 3))  # noqa: E731  (F, 3, H, W) -> (F, 3)
    return (mean(v) - mean(t)).abs().amax(1) * 127.5


def scores(video, case):
    v, t = images_from_uint8(video), images_from_uint8(case.truth)  # (F, 3, H, W) in [-1, 1]
    mask = face_masks(case)
    face_mse = ((v - t) ** 2 * mask).sum((1, 2, 3)) / (3 * mask.sum((1, 2, 3)))  # (F,)
    return {
        "PSNR dB": metrics.psnr(v, t).mean().item(),
        "SSIM": metrics.ssim(v, t).mean().item(),
        "face PSNR": (10 * torch.log10(2**2 / face_mse)).mean().item(),  # peak-to-peak 2 in [-1, 1]
        "face colour": masked_colour_error(v, t, mask).mean().item(),
    }


v, t = images_from_uint8(check[0]), images_from_uint8(cases[0].truth)
torch.testing.assert_close(masked_colour_error(v, t, torch.ones_like(v[:, :1])), metrics.colour_error(v, t))
print("masked colour error with the whole frame as mask == metrics.colour_error")
table = {}
for name, vs in {"copy the reference (baseline)": E.copy_reference(cases), **videos}.items():
    per_case = [scores(v, c) for v, c in zip(vs, cases, strict=True)]
    table[name] = {k: np.mean([s[k] for s in per_case]) for k in per_case[0]}
    table[name]["face colour per case"] = [round(s["face colour"], 1) for s in per_case]
    table[name]["id top-1 of 8"] = identity_top1_among(vs, gallery)
columns = ["PSNR dB", "SSIM", "face PSNR", "face colour", "id top-1 of 8"]
rows = [
    [name] + [f"{r[k]:.2f}" if k in ("SSIM", "id top-1 of 8") else f"{r[k]:.1f}" for k in columns]
    for name, r in table.items()
]
print(format_table(rows, ["variant (2 cases x 8 frames)"] + columns))
for name in ("bank at t = 0", "no reference attention"):
    print(f"face colour error per case, {name}: {table[name]['face colour per case']}")
change = {k: abs(table["bank at t = 500 (noised)"][k] - table["bank at t = 0"][k]) for k in columns[:4]}
print(
    f"|t = 500 - t = 0|: PSNR {change['PSNR dB']:.1f} dB, SSIM {change['SSIM']:.2f}, "
    f"face PSNR {change['face PSNR']:.1f} dB, face colour {change['face colour']:.1f} levels"
)

# %% [markdown]
# - The copy-the-reference row is the yardstick: the right identity in the wrong pose, what a still image
#   scores against the ground truth.
# - The identity metric hardly discriminates here: every row, the copy baseline included, scores 1.00 top-1
#   but the one without reference attention (0.75: the frames of the case whose face loses its colour)
#   (8 identities that differ in their colours are told apart even in the wrong pose). The other columns do.
# - Without reference attention the reference still reaches the denoiser through its CLIP token in every
#   `attn2`. Whole-frame PSNR and SSIM drop, and so does the face PSNR; the face colour error shows where:
#   in the second case the face loses its colour (see the picture below), in the first it keeps it. Two
#   cases show that the bank carries colour and detail, not how often the CLIP token alone would do.
# - Writing the bank from the noised reference at t = 500 (one noise draw) moves each column by the printed
#   amount: PSNR by a few tenths of a dB, SSIM and face PSNR by a tenth or less, the face colour by under a
#   level, far less than the gaps between the other rows (over 20 levels without the bank), although the
#   bank entries themselves change a lot (below). So this experiment does not show that the t = 0 choice
#   matters much for this toy model.

# %%
picks = [(0, 0), (0, 7), (1, 0), (1, 7)]  # (case, frame)
tiles, titles = [], []
for i, f in picks:
    c = cases[i]
    tiles += [c.reference, c.poses[f], c.truth[f]] + [vs[i][f] for vs in videos.values()]
    titles += ["reference", f"case {i + 1}, pose {f}", "ground truth"] + list(videos)
c = cases[0]
fig = image_grid(
    tiles,
    titles,
    ncols=6,
    figsize=(10.5, 7.4),
    suptitle="two held-out identities: the trained toy animator with and without the bank",
)
_ = save(fig, "ch05_trained_with_without_reference")
plt.show()

# %% [markdown]
# **What the ReferenceNet sees at t = 500.** The bank is written by the ReferenceNet outside the pipeline
# here, once from the clean latent at t = 0 and once from the noised one at t = 500; the change of each
# entry relative to its size, and the first three principal components of one block's tokens (fitted on the
# t = 0 entry, the same projection for both) as colours:

# %%
ref_pil = PIL.Image.fromarray(c.reference)
clip_tokens_c, ref_latents_c = pipe.encode_reference(
    ref_pil, 128, 128, torch.float32, "cpu"
)  # (1,1,D), (1,4,16,16)
noise = torch.randn(ref_latents_c.shape, generator=torch.Generator().manual_seed(0))
noisy_latents = pipe.scheduler.add_noise(ref_latents_c, noise, torch.tensor([500]))
bank_at = {}  # t -> the bank's entries
with reference_attention(pipe.reference_unet, pipe.denoising_unet) as bank:
    for t_ref, lat in ((0, ref_latents_c), (500, noisy_latents)):
        bank.write(lat, t=t_ref, encoder_hidden_states=clip_tokens_c)
        bank_at[t_ref] = dict(bank.entries)
for n in (readers[0], readers[len(readers) // 2], readers[-1]):
    change = ((bank_at[500][n] - bank_at[0][n]).norm() / bank_at[0][n].norm()).item()
    print(
        f"{n.removesuffix('.transformer_blocks.0.attn1'):28s} bank entry changed by {change:.2f} of its norm"
    )


# %% [markdown]
# - The noised latent (second picture) is what the ReferenceNet gets at t = 500: much of the face is gone.
#   The printed relative changes: the first writer's entry, one resnet from the input, changes by about four
#   fifths of its norm, the middle and the last by about three fifths.
# - AnimateAnyone writes the bank at t = 0 from the clean latent: the reference is an image to copy from, not
#   a sample to denoise, so nothing is gained by noising it. The table above shows how much this toy model's
#   output moves when the bank is written from t = 500 instead.


# %%
def pca_rgb(x, basis, mean):
    """(1, L, C) tokens -> (side, side, 3) image of three principal components, each scaled to [0, 1]."""
    proj = (x[0] - mean) @ basis  # (L, C) @ (C, 3) -> (L, 3)
    proj = (proj - proj.min(0).values) / (proj.max(0).values - proj.min(0).values)
    side = int(proj.shape[0] ** 0.5)
    return proj.reshape(side, side, 3).numpy()


seen = pipe.decode_latents(rearrange(noisy_latents, "b c h w -> b c 1 h w"), 1)  # (1, 3, 1, H, W) in [-1, 1]
tiles = [c.reference, ((rearrange(seen[0, :, 0], "c h w -> h w c") + 1) * 127.5).round().byte().numpy()]
titles = ["reference", "latent noised to t = 500"]
for n in (readers[0], readers[-1]):  # the first and the last writer, both 16x16 tokens
    mean = bank_at[0][n][0].mean(0)  # (C,)
    basis = torch.linalg.svd(bank_at[0][n][0] - mean, full_matrices=False).Vh[:3].T  # (C, 3), fitted at t = 0
    tiles += [pca_rgb(bank_at[t_ref][n], basis, mean) for t_ref in (0, 500)]
    titles += [f"{n.split('.attentions')[0]}, t = {t_ref}" for t_ref in (0, 500)]
fig = image_grid(tiles, titles, figsize=(12, 2.5), suptitle="bank entries: 3 principal components as colours")
_ = save(fig, "ch05_bank_t0_t500")
plt.show()

# %% [markdown]
# **What is the reference code's `attn_weight` for?** (a question of the seed notes)
# `ReferenceAttentionControl` gives every hooked block `attn_weight = i / n`, its rank in the list of blocks
# sorted by width (widest first), and never reads it. It is a leftover of the "reference-only" code in
# diffusers' community pipelines (`stable_diffusion_reference.py`,
# `stable_diffusion_controlnet_reference.py`): there a block reads the reference only if
# `attention_auto_machine_weight > attn_weight`, a dial from 0 (no block reads) to 1 (every block reads) that
# turns the widest, lowest-resolution blocks on first. MagicAnimate, whose file Moore-AnimateAnyone adapted,
# dropped that test and set the dial's default to infinity, which would admit every block anyway; so in
# AnimateAnyone every block reads, always. What the dial would do, on the toy animator (the blocks in the
# reference code's order: depth-first down, up, mid, then the width sort):


# %%
order = width_sort(transformer_blocks(pipe.denoising_unet))
attn_weight = {f"{n}.attn1": i / len(order) for i, (n, _) in enumerate(order)}
print(
    format_table(
        [[n, w, f"{i / len(order):.1f}"] for i, (n, w) in enumerate(order)], ["block", "width", "attn_weight"]
    )
)


def reference_only_dial(w):
    """reference-only's rule: the blocks whose attn_weight is below w read the bank (the pipeline's
    ``fusion_blocks``, given by name)."""
    return [n for n, a in attn_weight.items() if w > a]


coarse = [E.generate(pipe, c, fusion_blocks=reference_only_dial(0.7), **GEN) for c in cases]
per_case = [scores(v, c) for v, c in zip(coarse, cases, strict=True)]
dial_rows = {
    "0: no block (the row above)": table["no reference attention"],
    "0.7: the widest blocks": {k: np.mean([s[k] for s in per_case]) for k in per_case[0]},
    "1: every block (the row above)": table["bank at t = 0"],
}
counts = {"0": 0, "0.7": sum(a < 0.7 for a in attn_weight.values()), "1": len(attn_weight)}
rows = [
    [name, counts[name.split(":")[0]]]
    + [f"{r[k]:.2f}" if k == "SSIM" else f"{r[k]:.1f}" for k in columns[:4]]
    for name, r in dial_rows.items()
]
print(format_table(rows, ["attention_auto_machine_weight", "readers"] + columns[:4]))

# %% [markdown]
# On this toy model the dial's first seven readers, all the blocks below full resolution, give back little of
# what the bank adds: most of it needs the three full-resolution readers, which the dial switches on last.
# AnimateAnyone has no dial: its `attn_weight` is set and never read, and every block reads.

# %% [markdown] tags=["core"]
# ## Summary
# - The ReferenceNet runs once per generation at t = 0 on the clean reference latent; its blocks' `attn1`
#   inputs form the bank (16 entries at SD1.5; its size at 512² is printed in section 2). Its output is never
#   used, which is why it has no `conv_out`: nothing after the last writer gets a gradient.
# - The denoising UNet's `attn1` attends to its own tokens and to the same-named bank entry, with its own
#   weights. Pairing by name equals the reference code's stable width sort for SD1.5, but only because both
#   UNets list their blocks in the same order; names make the pairing independent of that.
# - Under CFG the unconditional rows read nothing and get zero CLIP tokens: CFG guides appearance and CLIP
#   together.
# - The reference K/V depend only on the bank and the weights: projected once, they serve every frame and
#   step; the unconditional rows need one plain `attn1`, not two.
# - In the trained toy animator, hooks on the readers measure how much of each block's softmax lands on the
#   bank; switching the readers off (`use_reference_attention=False`) shows what the bank adds beyond the CLIP
#   token (colour and detail, measured against the ground truth, in the face and around it); on this toy
#   model a bank written from a noised reference at t = 500 (`reference_timestep=500`) measures only a
#   little different from t = 0.
# - `attn_weight` is a leftover of reference-only's dial, which let only the widest blocks read; the
#   reference code sets it and never reads it, so every block reads.
#
# ## Exercises
# 1. With `fusion_blocks="midup"`, which blocks read the reference, and how large is the bank at 512²?
# 2. Write the bank at t = 999 instead of 0. How much do the entries of the first and the last block change
#    (relative to their size)? Through which layers does t reach them?
# 3. Use a reference latent of another size than the video (6×6 for 8×8 frames). Does reference attention
#    still run, and what shape do the keys have?
#
# ## Solutions

# %%
# 1. midup: the mid block and the 9 up-block transformers
with torch.device("meta"):
    midup = pair_blocks(ref_sd15, den_sd15, fusion_blocks="midup")
midup_bytes = sum(2 * s[0] * s[1] * s[2] for n, s in entries.items() if n in midup)
print(
    len(midup),
    "blocks:",
    sorted({n.split(".attentions")[0] for n in midup}),
    "| bank",
    human(midup_bytes, "B"),
)

# %%
# 2. t enters every resnet as a per-channel shift of the time embedding; the first writer already sits after
#    one resnet, so every entry changes -- and the ReferenceNet was trained only at t = 0.
with reference_attention(reference_unet, denoising_unet) as bank:
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)
    at0 = dict(bank.entries)
    bank.write(ref_latents, t=999, encoder_hidden_states=clip_tokens)
    at999 = dict(bank.entries)
for n in (bank.names[0], bank.names[-1]):
    change = ((at999[n] - at0[n]).norm() / at0[n].norm()).item()
    print(f"{n.split('.transformer')[0]:24s} relative change {change:.2f}")

# %%
# 3. a 6x6 reference for 8x8 frames: at full resolution 36 reference tokens next to 64 own tokens
small_ref = torch.randn(B, 4, 6, 6)
top = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
seen = {}
hook = denoising_unet.get_submodule(top).register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
with reference_attention(reference_unet, denoising_unet) as bank:
    bank.write(small_ref, t=0, encoder_hidden_states=clip_tokens)
    out = denoising_unet(latents, 500, clip_tokens)
    entry = bank.entries[top]
hook.remove()
print("entry", tuple(entry.shape), "| own tokens", tuple(seen["x"].shape), "| output", tuple(out.shape))
print("keys per query:", seen["x"].shape[1], "own +", entry.shape[1], "reference")

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import torch
from diffusers.models.attention_processor import Attention
from einops import rearrange, repeat

from anim_lab import inspect as lab_inspect
from anim_lab import reference as lab_reference
from anim_lab.configs import TINY as LAB_TINY

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): the reader's attention
# Write `my_reader_attention(attn, x, reference, num_frames)`: `x` `(B*F, HW, C)` holds the `attn1` inputs of
# B videos of F frames, `reference` `(B, HW_ref, C)` the bank entry of each video. Every frame's queries
# attend over its own tokens *and* its video's reference tokens (keys and values concatenated along the token
# axis; `attn.to_q`, `attn.to_k`, `attn.to_v`, `attn.heads` heads, softmax scaled by $1/\sqrt{d_{head}}$),
# then `attn.to_out[0]`. Return `(B*F, HW, C)`.


# %% nbgrader={"grade": false, "grade_id": "ch05_reader_attention", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_reader_attention(attn, x, reference, num_frames):
    ### BEGIN SOLUTION
    keys_values = torch.cat([x, repeat(reference, "b l c -> (b f) l c", f=num_frames)], dim=1)
    q = rearrange(attn.to_q(x), "n l (h d) -> n h l d", h=attn.heads)
    k = rearrange(attn.to_k(keys_values), "n l (h d) -> n h l d", h=attn.heads)
    v = rearrange(attn.to_v(keys_values), "n l (h d) -> n h l d", h=attn.heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.to_out[0](rearrange(weights @ v, "n h l d -> n l (h d)"))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch05_reader_attention_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
torch.manual_seed(5)
gen = torch.Generator().manual_seed(5)
for videos, frames, hw, hw_ref, dim, heads in [
    (1, 3, 16, 16, 32, 4),
    (2, 2, 9, 4, 16, 2),
    (1, 1, 5, 7, 8, 1),
]:
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads).eval()
    x = torch.randn(videos * frames, hw, dim, generator=gen)
    reference = torch.randn(videos, hw_ref, dim, generator=gen)
    with torch.no_grad():
        expected = lab_reference.ReferenceReaderProcessor._attend_with_reference(
            attn, x, attn.to_k(reference), attn.to_v(reference), frames
        )
        torch.testing.assert_close(
            my_reader_attention(attn, x, reference, frames), expected, atol=1e-5, rtol=1e-5
        )
print("my_reader_attention matches the library's reader on 3 shapes")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): which attentions read the bank
# Write `my_self_attention_names(unet, fusion_blocks)`: a dict from the name of every spatial self-attention
# of `unet` (a diffusers `Attention` whose name ends in `.attn1`, motion modules excluded: their names contain
# `motion_modules`) to its width (`to_q.in_features`), in module order. With `fusion_blocks="midup"` keep only
# those under `mid_block.` and `up_blocks.`; with `"full"` all of them.


# %% nbgrader={"grade": false, "grade_id": "ch05_self_attention_names", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_self_attention_names(unet, fusion_blocks="full"):
    ### BEGIN SOLUTION
    names = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and name.endswith(".attn1")) or "motion_modules" in name:
            continue
        if fusion_blocks == "midup" and not name.startswith(("mid_block.", "up_blocks.")):
            continue
        names[name] = module.to_q.in_features
    return names
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch05_self_attention_names_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_self_attention_names is not lab_reference.self_attention_names
for component in ("denoising_unet", "reference_unet"):
    unet = lab_inspect.build(LAB_TINY, component)  # meta device: names and shapes only
    for fusion in ("full", "midup"):
        mine = my_self_attention_names(unet, fusion)
        assert list(mine.items()) == list(lab_reference.self_attention_names(unet, fusion).items()), fusion
print("my_self_attention_names matches reference.self_attention_names on both TINY UNets, full and midup")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# Build `Attention(query_dim=32, heads=4, dim_head=8)` with `torch.manual_seed(0)` and one frame
# `x = torch.randn(1, 16, 32)` (same seed, drawn after the module). Let the reference be the frame itself
# (`reference = x`). What share of the attention weight, averaged over heads and queries, falls on the
# reference tokens? Store it, a float, in `self_copy_share`. (Why that value?)

# %% nbgrader={"grade": false, "grade_id": "ch05_self_copy_share", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
torch.manual_seed(0)
lab_attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
x_one = torch.randn(1, 16, 32)
with torch.no_grad():
    both = torch.cat([x_one, x_one], dim=1)  # own tokens ; reference tokens (the same)
    q = rearrange(lab_attn.to_q(x_one), "n l (h d) -> n h l d", h=4)
    k = rearrange(lab_attn.to_k(both), "n l (h d) -> n h l d", h=4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # (1, 4, 16, 32)
self_copy_share = float(weights[..., 16:].sum(-1).mean())
### END SOLUTION
print(f"share of attention on the reference tokens: {self_copy_share:.3f}")

# %% nbgrader={"grade": true, "grade_id": "ch05_self_copy_share_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(self_copy_share, float) and 0 <= self_copy_share <= 1
### BEGIN HIDDEN TESTS
assert abs(self_copy_share - 0.5) < 1e-3  # every key appears twice: own copy and reference copy
### END HIDDEN TESTS
print("self_copy_share is a share")
