# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 05 — Reference attention: the ReferenceNet's bank
#
# *How AnimateAnyone keeps the reference portrait's appearance: a second UNet encodes the portrait once, and
# every spatial self-attention of the denoising UNet attends to its features as well as to its own frame.*
#
# - **You will build**: the bank of a ReferenceNet at SD1.5 size (meta), the writer↔reader pairing both ways
#   (the reference code's width sort and anim_lab's names), a reader re-derived by hand and checked against
#   the library, the unconditional rows under CFG, the proof that the ReferenceNet's output is never used,
#   and the attention work the reference code wastes
# - **Library modules**: `anim_lab.reference` (`reference_attention`, `ReferenceBank`, the writer/reader
#   processors), `anim_lab.unet` (`ReferenceUNet`, `VideoUNet`, `attn_processors`), `anim_lab.inspect`
# - **Questions answered**: Why run the ReferenceNet on clean reference latents (t = 0), and what is stored?
#   What does the bank hold at every block, and how much memory at 512² with CFG? Why does each writer pair
#   with exactly one reader, and does the reference code's sort by width pair them by name? Why does the
#   ReferenceNet need no `conv_out`? What do the unconditional rows see? How much attention work does the
#   reference code waste, and what does anim_lab save?
# - **CPU runtime**: about 45 s
#
# Full-size shapes and FLOPs come from the `meta` device; every numerical experiment runs on the TINY preset
# with random weights (nothing here needs a trained animator).

# %%
# NBVAL_IGNORE_OUTPUT
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: no stderr

import diffusers
import matplotlib
import matplotlib.pyplot as plt
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange, repeat

import anim_lab
from anim_lab.configs import SD15, TINY
from anim_lab.inspect import count_flops, format_table, human
from anim_lab.motion import MOTION_SD15, MOTION_TINY
from anim_lab.reference import pair_blocks, reference_attention
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d
from anim_lab.viz import save

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference, except where a section turns gradients on
torch.set_printoptions(precision=3, sci_mode=False)
print(
    f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
    f"matplotlib {matplotlib.__version__}"
)

# %% [markdown]
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

# %%
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

# %% [markdown]
# ## 2. What the bank holds, at SD1.5 size
#
# - One entry per spatial transformer block: 16 in SD1.5 (down 0–2 × 2, mid × 1, up 1–3 × 3), each
#   `(B, HW, C)` at that block's resolution and width. Built on the `meta` device: shapes, no memory.
# - 512×512 pixels → 64×64 latents → 4096 tokens at width 320, 1024 at 640, 256 at 1280 (64 in the mid block).

# %%
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

# %% [markdown]
# With CFG at 512² and a 16-frame window, what each way keeps and builds (fp16):
#
# - the reference code runs the ReferenceNet on the CFG-doubled batch (2 rows), keeps the writers' lists and
#   clones them into the readers (2 × 2 rows), and at every `attn1` call builds the bank **repeated for all
#   2 × 16 rows** and concatenated to the tokens, then projects that to K and V;
# - anim_lab keeps 1 row, and its projected K, V (1 row each), reused for all frames and steps.

# %%
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

# %% [markdown]
# ## 3. Why each writer pairs with exactly one reader
#
# - Both UNets are built from **the same SD1.5 config**: same blocks, same names, same widths. The
#   ReferenceNet's block `down_blocks.1.attentions.0.transformer_blocks.0` sees the reference at the same
#   resolution and width as the denoiser's block of the same name, so its tokens can be concatenated there.
# - anim_lab pairs by that name. The reference code does not use names: it lists the transformer blocks of
#   each UNet depth-first, **sorts each list by width (descending, stable)** and zips the two lists.
# - The reference's writer is diffusers' `UNet2DConditionModel`, whose modules are registered in the order
#   down_blocks, up_blocks, mid_block; its `UNet3DConditionModel` registers them in the same order.


# %%
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

# %% [markdown]
# The sort works only because both UNets list their blocks in the same order. anim_lab's `VideoUNet`
# registers its parts down, **mid**, up; if the reference code's sort were applied to such a reader list
# against diffusers' writer order, the 1280-wide group would shift by one:

# %%
readers_other_order = width_sort(transformer_blocks(den_sd15, ("down_blocks", "mid_block", "up_blocks")))
wrong = [(w, r) for (w, _), (r, _) in zip(writers, readers_other_order, strict=True) if w != r]
print(f"{len(wrong)} of 16 pairs wrong, e.g.:")
for w, r in wrong[:3]:
    print(f"  writer {w:38s} -> reader {r}")

# %% [markdown]
# A wrong pair is not an error in the reference code: the shapes still match (same width), so the reader
# would silently attend to the features of another block at another depth (here, the mid block reads up
# block 1's). Pairing by name cannot go wrong this way, and a mismatch of names or widths is an error that
# names the blocks (`pair_blocks`).
#
# ## 4. The reader, by hand, on one block
#
# Capture one block's `attn1` input, the bank entry and the library's output, then recompute the output
# from the formula above with explicit heads and softmax.

# %%
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

# %%
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
reference_unet.zero_grad(set_to_none=True)

# %% [markdown]
# A `conv_out` would only add FLOPs and weights that never receive a gradient — and in distributed
# training, parameters without a gradient make DDP fail unless `find_unused_parameters=True`. In stage-1
# training the tensors above are frozen or dropped for the same reason.
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
