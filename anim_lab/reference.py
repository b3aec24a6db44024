"""Reference attention: the ReferenceNet's bank, read by the denoising UNet through attention processors.

AnimateAnyone's central idea: the ReferenceNet (``reference_unet``) encodes the reference portrait once, and
every spatial self-attention (``attn1``) of the denoising UNet attends to it as well as to its own frame:

    writer (ReferenceNet block n):   bank[n] = x_ref                      the input of attn1, i.e. norm1's
                                                                          output (B, HW, C); then plain attn1
    reader (denoising block n):      attn1(x) with queries x and keys/values [x ; bank[n]] along the tokens,
                                     the same attn1 weights:
        out = softmax(Q K^T / sqrt(d)) V,   Q = x W_q,   K = [x ; x_ref] W_k,   V = [x ; x_ref] W_v
                                     x (B*F, HW, C): every frame of video b reads bank row b

Writers and readers are paired **by module name** (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``
of one UNet with the same name in the other). The reference code pairs them by a stable sort on width; for
the SD1.5 layout the two pairings are the same (tests/test_reference.py, chapter 05).

Usage (what a pipeline does; the context installs the processors and removes them on exit)::

    with reference_attention(reference_unet, denoising_unet, fusion_blocks="full",
                             do_classifier_free_guidance=True) as bank:
        bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)   # runs the ReferenceNet once
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2)                # [uncond videos ; cond videos]
            noise_pred = denoising_unet(latent_model_input, t, torch.cat([uncond_tokens, clip_tokens]),
                                        pose_cond_fea=torch.cat([pose_fea] * 2))

**Which rows are unconditional (CFG).** Per call, the context's forward pre-hook on the denoising UNet reads
the number of videos N and frames F from ``sample`` (N, C, F, H, W): the one place that knows them; never a
hard-coded 16, and nothing passes through ``cross_attention_kwargs`` (which every attn2 would also receive).
With ``bank.do_classifier_free_guidance`` True (set by the context, changeable between calls), the first
half of the N videos is unconditional, the layout of diffusers' pipelines and of the reference's ``uc_mask``
(``[1] * B * F + [0] * B * F``). Those rows read nothing: plain self-attention, as in the reference. The
bank holds B rows (one reference per conditional video) or 2B (the reference code runs the ReferenceNet on
the CFG-doubled batch; then the second, conditional half is used, which is what its conditional rows read).

**Work saved against the reference code** (benchmarks/bench_reference_attention.py):
- the reference keys/values ``bank[n] W_k``, ``bank[n] W_v`` are projected once per write and block (the
  bank and the weights are fixed during a generation), not again for every frame at every step; the bank
  is not repeated over frames and the projected tokens are concatenated frame by frame into K/V only;
- the unconditional rows run attn1 once, without the reference; the reference code runs it twice (with
  the reference, thrown away, then without).

``faithful=True`` rounds the bank to float16, as the reference's ``update(dtype=torch.float16)`` does even
in float32 runs; by default the bank keeps the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .unet import AUDIO_KEY, MOTION_KEY, ReferenceUNet, VideoUNet

__all__ = [
    "FUSION_BLOCKS",
    "ReferenceBank",
    "ReferenceWriterProcessor",
    "ReferenceReaderProcessor",
    "reference_attention",
    "self_attention_names",
    "pair_blocks",
]

FUSION_BLOCKS = ("full", "midup")


def _in_extra_module(name: str) -> bool:
    """A motion module's temporal attention or a Hallo audio module's self-attention: not a reader/writer."""
    return MOTION_KEY in name or AUDIO_KEY in name


def self_attention_names(unet: nn.Module, fusion_blocks="full") -> dict[str, int]:
    """The spatial self-attentions (``...transformer_blocks.k.attn1``) of a UNet -> their width C, in module
    order. ``fusion_blocks="full"``: all of them (what AnimateAnyone trains and runs); ``"midup"``: those of
    ``mid_block`` and ``up_blocks`` only; a collection of ``attn1`` module names: those (an experiment, e.g.
    reference-only's ``attn_weight`` dial in chapter 05). Motion modules' temporal attentions are never
    included, nor the self-attentions of Hallo's audio modules (``...audio_modules.i...attn1``)."""
    chosen = None
    if not isinstance(fusion_blocks, str):
        chosen = set(fusion_blocks)
        if not chosen:
            raise InputError("fusion_blocks names no block; to switch reference attention off, leave it out")
    elif fusion_blocks not in FUSION_BLOCKS:
        raise InputError(
            f"fusion_blocks must be one of {FUSION_BLOCKS} or a collection of attn1 names, "
            f"got {fusion_blocks!r}"
        )
    names = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and name.endswith(".attn1")) or _in_extra_module(name):
            continue
        if fusion_blocks == "midup" and not name.startswith(("mid_block.", "up_blocks.")):
            continue
        if chosen is not None and name not in chosen:
            continue
        names[name] = module.to_q.in_features
    if chosen is not None and chosen - set(names):
        unknown = sorted(chosen - set(names))
        raise InputError(
            f"fusion_blocks names {unknown[:3]}, which are not spatial attn1 modules of this UNet "
            "(see reference.self_attention_names(unet))"
        )
    return names


def pair_blocks(reference_unet: nn.Module, denoising_unet: nn.Module, fusion_blocks="full") -> list[str]:
    """The names shared by the ReferenceNet's writers and the denoising UNet's readers, in module order.

    Every writer must have its reader under the same name and width, and the reverse; otherwise the error
    names the blocks that differ (e.g. a ReferenceNet of another size or layout)."""
    writers = self_attention_names(reference_unet, fusion_blocks)
    readers = self_attention_names(denoising_unet, fusion_blocks)
    only_ref = [n for n in writers if n not in readers]
    only_den = [n for n in readers if n not in writers]
    widths = [
        f"{n} ({writers[n]} vs {readers[n]})" for n in writers if n in readers and writers[n] != readers[n]
    ]
    if only_ref or only_den or widths:
        raise InputError(
            "the ReferenceNet and the denoising UNet must have the same transformer blocks (same names and "
            f"widths) to pair writers with readers; only in the ReferenceNet: {only_ref}; only in the "
            f"denoising UNet: {only_den}; widths differ (reference vs denoising): {widths}. Build both from "
            "the same UNet config."
        )
    if not writers:
        raise InputError("no spatial self-attention (transformer_blocks.k.attn1) found to pair")
    return list(writers)


class ReferenceBank:
    """Module name -> the ReferenceNet's attn1 input (B_ref, HW, C), plus the readers' per-call state.

    Made by ``reference_attention``; ``write`` fills it, the denoising UNet's readers read it. ``enabled``
    False makes every reader plain self-attention (the denoising UNet's own forward, bit for bit)."""

    def __init__(
        self,
        reference_unet: ReferenceUNet,
        names: list[str],
        do_classifier_free_guidance: bool = False,
        faithful: bool = False,
    ):
        self.reference_unet = reference_unet
        self.names = list(names)
        self.do_classifier_free_guidance = do_classifier_free_guidance
        self.faithful = faithful
        self.enabled = True
        self.entries: dict[str, torch.Tensor] = {}
        self.writes = 0  # how many times the ReferenceNet has run (once per generation)
        self.projections = 0  # reference K/V projections computed (once per write and block)
        self._writing = False
        self._pending: dict[str, torch.Tensor] = {}
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (K_ref, V_ref) (B, HW, C)
        self._call: tuple[int, int] | None = None  # (videos N, frames F) of the denoising UNet's call

    # --- writing -----------------------------------------------------------------------------------
    def write(
        self, ref_latents: torch.Tensor, t=0, encoder_hidden_states: torch.Tensor | None = None
    ) -> None:
        """Run the ReferenceNet once on ``ref_latents`` (B_ref, 4, H, W) at timestep ``t`` (0: the clean
        reference, as AnimateAnyone does) with its CLIP tokens (B_ref, N, D); keep every writer's attn1 input.

        B_ref is B (one reference per conditional video) or, as the reference code does under CFG, 2B.
        The previous content is replaced only once the ReferenceNet has run; on an error nothing changes."""
        if encoder_hidden_states is None:
            raise InputError("bank.write needs the ReferenceNet's encoder_hidden_states (B_ref, N, D)")
        self._pending = {}
        self._writing = True
        try:
            self.reference_unet(ref_latents, t, encoder_hidden_states)  # output unused: only the bank counts
        finally:
            self._writing = False
        pending, self._pending = self._pending, {}
        missing = [n for n in self.names if n not in pending]
        if missing:
            raise RuntimeError(f"the ReferenceNet ran without reaching the writers {missing}")
        if self.faithful:  # the reference code's update(dtype=torch.float16): rounded even in float32 runs
            pending = {n: v.to(torch.float16).to(v.dtype) for n, v in pending.items()}
        self.entries = pending
        self._kv = {}
        self.writes += 1

    def load(self, entries: dict[str, torch.Tensor]) -> None:
        """Fill the bank with entries kept from an earlier ``write`` (e.g. reused across context windows)."""
        missing = [n for n in self.names if n not in entries]
        if missing:
            raise InputError(f"the entries lack the blocks {missing}; keep a whole bank.entries from a write")
        self.entries = {n: entries[n] for n in self.names}
        self._kv = {}

    def _store(self, name: str, hidden_states: torch.Tensor) -> None:
        if self._writing:
            self._pending[name] = hidden_states  # (B_ref, HW, C), the norm1 output; attn1 does not modify it

    def clear(self) -> None:
        """Forget the reference (what the reference code's ``clear()`` does after a generation)."""
        self.entries, self._kv, self._call = {}, {}, None

    # --- reading -----------------------------------------------------------------------------------
    def _begin_call(self, sample: torch.Tensor) -> None:
        """Called before each denoising-UNet forward with its sample (N, C, F, H, W)."""
        self._call = None
        if not self.enabled:
            return
        if not self.entries:
            raise RuntimeError(
                "reference attention is enabled but the bank is empty: call bank.write(ref_latents, t=0, "
                "encoder_hidden_states=...) before the denoising UNet, or set bank.enabled = False"
            )
        if sample.ndim != 5:
            return  # the UNet raises its own error about the shape
        videos, frames = sample.shape[0], sample.shape[2]
        cond = videos // 2 if self.do_classifier_free_guidance else videos
        if self.do_classifier_free_guidance and videos % 2:
            raise InputError(
                f"with do_classifier_free_guidance the denoising UNet takes [uncond ; cond] videos, an even "
                f"number; got {videos}"
            )
        rows = next(iter(self.entries.values())).shape[0]
        allowed = (cond, 2 * cond) if self.do_classifier_free_guidance else (cond,)
        if rows not in allowed:
            how = f"CFG: {cond} conditional" if self.do_classifier_free_guidance else "no CFG"
            also = f" (or 2B = {2 * cond}, the CFG-doubled batch)" if self.do_classifier_free_guidance else ""
            raise InputError(
                f"the bank holds {rows} reference rows but the denoising UNet runs {videos} videos ({how}); "
                f"write the ReferenceNet with B = {cond} rows{also}"
            )
        self._call = (videos, frames)

    def reference_kv(self, name: str, attn: Attention, videos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K_ref, V_ref (B, HW, C) of block ``name``: projected at the first read after a write, then reused
        for every frame and every denoising step."""
        if name not in self._kv:
            ref = self.entries[name]  # (B or 2B, HW, C)
            ref = ref[ref.shape[0] - videos :]  # 2B rows (CFG-doubled): the conditional second half
            self._kv[name] = (attn.to_k(ref), attn.to_v(ref))  # (B, HW, C) each
            self.projections += 1
        return self._kv[name]


class ReferenceWriterProcessor:
    """attn1 processor of the ReferenceNet: stores its input in the bank, then plain self-attention."""

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank, self.name = bank, name
        self.attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.bank._store(self.name, hidden_states)  # (B_ref, HW, C)
        return self.attention(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceReaderProcessor:
    """attn1 processor of the denoising UNet: own tokens + the same-named bank entry as keys/values."""

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank, self.name = bank, name
        self.attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bank = self.bank
        if not bank.enabled:
            return self.attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        if bank._call is None:
            raise RuntimeError(
                f"{self.name}: reference attention reads only inside the denoising UNet's forward, which "
                "tells the bank its videos and frames"
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise InputError(f"{self.name}: reference attention reads in self-attention (attn1) only")
        videos, frames = bank._call
        rows, _, width = hidden_states.shape  # (N*F, HW, C)
        ref_width = bank.entries[self.name].shape[-1]
        if ref_width != width or rows != videos * frames:
            raise InputError(
                f"{self.name}: the bank entry has width {ref_width} (shape "
                f"{tuple(bank.entries[self.name].shape)}) but this block works on {width} channels and "
                f"{videos} videos x {frames} frames = {videos * frames} rows, got {rows}: the bank was "
                "filled by a ReferenceNet of another size; write it with the ReferenceNet paired to this UNet"
            )
        cond_videos = videos // 2 if bank.do_classifier_free_guidance else videos
        split = (videos - cond_videos) * frames  # rows [0, split): unconditional videos, all their frames
        x_uncond, x_cond = hidden_states[:split], hidden_states[split:]  # (N_u*F, HW, C), (B*F, HW, C)
        k_ref, v_ref = bank.reference_kv(self.name, attn, cond_videos)  # (B, HW, C) each, projected once
        out_cond = self._attend_with_reference(attn, x_cond, k_ref, v_ref, frames)
        if not split:
            return out_cond
        out_uncond = self.attention(attn, x_uncond)  # plain self-attention: the uncond rows read nothing
        return torch.cat([out_uncond, out_cond])  # (N*F, HW, C), rows in the input's order

    @staticmethod
    def _attend_with_reference(
        attn: Attention, x: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, frames: int
    ) -> torch.Tensor:
        """x (B*F, HW, C) attends to [x ; ref of its video]: K/V of the reference broadcast over frames."""
        heads = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B*F, HW, C) each

        def joint(own: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            own = rearrange(own, "(b f) l c -> b f l c", f=frames)  # (B*F, HW, C) -> (B, F, HW, C)
            ref = ref[:, None].expand(-1, frames, -1, -1)  # (B, HW_ref, C) -> (B, F, HW_ref, C): a view
            both = torch.cat([own, ref], dim=2)  # (B, F, HW + HW_ref, C): the one buffer built
            return rearrange(both, "b f l (h d) -> (b f) h l d", h=heads)

        q = rearrange(q, "n l (h d) -> n h l d", h=heads)  # (B*F, heads, HW, d)
        out = F.scaled_dot_product_attention(q, joint(k, k_ref), joint(v, v_ref))  # (B*F, heads, HW, d)
        out = rearrange(out, "n h l d -> n l (h d)")  # (B*F, HW, C)
        return attn.to_out[1](attn.to_out[0](out))  # output projection, dropout


@contextmanager
def reference_attention(
    reference_unet: ReferenceUNet,
    denoising_unet: VideoUNet,
    fusion_blocks="full",
    do_classifier_free_guidance: bool = False,
    faithful: bool = False,
) -> Iterator[ReferenceBank]:
    """Install writers on the ReferenceNet and readers on the denoising UNet; yield the bank; on exit
    restore both UNets' processors and remove the hook, so nothing survives the ``with`` block."""
    names = pair_blocks(reference_unet, denoising_unet, fusion_blocks)
    for unet, role in ((reference_unet, "ReferenceNet"), (denoising_unet, "denoising UNet")):
        busy = [
            n
            for n, p in unet.attn_processors.items()
            if isinstance(p, ReferenceWriterProcessor | ReferenceReaderProcessor)
        ]
        if busy:
            raise RuntimeError(
                f"reference attention is already enabled on this {role} ({busy[0]} ...): leave the first "
                "`with reference_attention(...)` block before entering another"
            )
    bank = ReferenceBank(reference_unet, names, do_classifier_free_guidance, faithful)
    saved_ref, saved_den = reference_unet.attn_processors, denoising_unet.attn_processors
    reference_unet.set_attn_processor({n: ReferenceWriterProcessor(bank, n) for n in names})
    denoising_unet.set_attn_processor({n: ReferenceReaderProcessor(bank, n) for n in names})

    def before_call(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        bank._begin_call(sample)

    hook = denoising_unet.register_forward_pre_hook(before_call, with_kwargs=True)
    try:
        yield bank
    finally:
        hook.remove()
        reference_unet.set_attn_processor(saved_ref)
        denoising_unet.set_attn_processor(saved_den)
        bank.clear()
