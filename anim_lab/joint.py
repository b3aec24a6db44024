"""Joint diffusion: the two members of a pair (a portrait and its pose or depth image) denoised together.

Seed 002's joint model, rebuilt with diffusers attention processors instead of replaced ``forward``s. Every
transformer block's self-attention ``attn1`` gets two registered submodules,

    attn1.joint_attn    a copy of attn1 (same weights at creation), used as a *cross*-attention to the partner
    attn1.joint_conv    Conv1d(C, C, kernel 1) over the channels, weight and bias zero at creation

and its processor computes, on the block's normalised tokens x (R, L, C) (R rows: N samples x rows per
sample, sample-major as every UNet lays them out, e.g. (b f) frames):

    own     = attn1(x)                                       (R, L, C)  self-attention, as before
    partner = x with each sample's rows replaced by those of its pair's other member
    joint   = joint_attn(x, partner)                         (R, L, C)  Q from x, K/V from the partner
    out     = own + joint_conv(joint)                        (R, L, C)  -> the block adds it to its residual

so at creation (conv = 0) the UNet is exactly the UNet it was, and training opens the path. Which samples
form pairs is a mask ``is_x`` (N,): the k-th x sample pairs with the k-th y sample (the notes'
``joint[~mask] = x[mask]; joint[mask] = x[~mask]``). The notes leave the conv's kernel unsaid; kernel 1
makes it a per-token linear map, the "zero conv" of ControlNet.

**LoRA per sample.** The notes give the pair's members their own LoRA deltas: e.g. ``y`` on the UNet's own
attention for the y samples only (the base model keeps generating portraits, the LoRA makes it generate the
pose/depth image), and ``xy`` / ``yx`` on the joint copies. Each masked adapter has a mask (N,); in the
attentions these processors run, a layer's output is

    W x + b + sum over active adapters a of  mask_a[row] * (alpha_a / r_a) B_a A_a x

(an adapter without a mask applies to every row, as peft applies it). The processor computes the projections
from the peft layer's own parts (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``), so nothing of peft is
patched. (peft's ``adapter_names=`` mixed-batch forward selects *one* adapter per row; masks allow several.)
:func:`own_lora_targets` and :func:`joint_lora_targets` keep the two kinds of adapters apart.

Usage::

    add_joint_layers(unet)                                           # once, before any adapter
    unet.add_adapter(lora_config(4, target_modules=own_lora_targets()), "y")
    unet.add_adapter(lora_config(4, target_modules=joint_lora_targets()), "xy")
    unet.add_adapter(lora_config(4, target_modules=joint_lora_targets()), "yx")
    unet.set_adapters(["y", "xy", "yx"])
    with joint_attention(unet) as joint:             # installs the processors; restores them on exit
        joint.set_pairs(is_x=[1, 0], lora_masks={"y": [0, 1], "xy": [1, 0], "yx": [0, 1]})
        noise_pred = unet(torch.cat([x_latents, y_latents]), t, tokens)

Outside the ``with`` block the UNet's own processors are back: the joint layers sit idle (the UNet is the
plain UNet, its adapters applied to every sample, as peft applies them). Inside it, the processors run every
spatial attention (``attn1`` with its joint copy, and ``attn2``); a masked adapter found anywhere else (a
motion module, a feed-forward) is refused, since its mask could not be applied there.
Reference attention (``anim_lab.reference``) also uses ``attn1``'s processor: the two do not combine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .errors import InputError

__all__ = [
    "JOINT_ATTN",
    "JOINT_CONV",
    "add_joint_layers",
    "joint_attention_names",
    "own_lora_targets",
    "joint_lora_targets",
    "JointState",
    "JointAttnProcessor",
    "MaskedLoraAttnProcessor",
    "joint_attention",
]

JOINT_ATTN, JOINT_CONV = "joint_attn", "joint_conv"
_PROJECTIONS = r"(to_q|to_k|to_v|to_out\.0)"


def own_lora_targets() -> str:
    """peft ``target_modules`` (a regular expression on whole names): the q/k/v/out projections of the
    blocks' own attn1 and attn2, not the joint copies nor the motion modules."""
    return rf".*\.attn[12]\.{_PROJECTIONS}"


def joint_lora_targets() -> str:
    """peft ``target_modules``: the q/k/v/out projections of the joint copies only."""
    return rf".*\.attn1\.{JOINT_ATTN}\.{_PROJECTIONS}"


def joint_attention_names(unet: nn.Module) -> list[str]:
    """The spatial self-attentions (``...transformer_blocks.k.attn1``) of a UNet, in module order; the
    motion modules' temporal attentions are not among them."""
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, Attention) and n.endswith(".attn1") and "motion_modules" not in n
    ]


def _check_plain(name: str, attn: Attention) -> None:
    """The processors compute SD1.5's attention (AttnProcessor2_0's path without its options)."""
    extras = [
        f
        for f in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross")
        if getattr(attn, f, None) is not None
    ]
    if extras or attn.residual_connection or attn.rescale_output_factor != 1.0:
        raise InputError(
            f"{name}: joint attention supports plain attention layers (SD1.5's); this one has "
            f"{extras or 'a residual connection or an output rescale'}"
        )


def add_joint_layers(unet: nn.Module) -> list[str]:
    """Give every spatial ``attn1`` its joint cross-attention (a copy of itself) and a zero-initialised
    Conv1d; return the attn1 names. Call it before adding any adapter (the copy must be of the base
    weights), and before loading a joint model's weights (its state dict has these keys)."""
    names = joint_attention_names(unet)
    if not names:
        raise InputError(f"{type(unet).__name__} has no transformer block self-attention (attn1) to join")
    for name in names:
        attn = unet.get_submodule(name)
        _check_plain(name, attn)
        if hasattr(attn, JOINT_ATTN):
            raise InputError(f"{name} already has its joint layers (add_joint_layers was called before)")
        if any(hasattr(m, "base_layer") for m in attn.modules()):
            raise InputError(
                f"{name} holds LoRA adapters already: add the joint layers first, then the adapters "
                "(the joint attention starts as a copy of the base self-attention)"
            )
        joint = copy.deepcopy(attn)
        joint.set_processor(AttnProcessor2_0())
        channels = attn.to_out[0].out_features
        conv = nn.Conv1d(channels, channels, kernel_size=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        conv.to(attn.to_out[0].weight)  # the device and dtype of the block
        attn.add_module(JOINT_ATTN, joint)
        attn.add_module(JOINT_CONV, conv)
    return names


class JointState:
    """Which samples are x and which are y, and which rows each masked LoRA adapter applies to; read by the
    processors at every call. Made by :func:`joint_attention`; set with :meth:`set_pairs`."""

    def __init__(self, unet: nn.Module | None = None, covered: Sequence[str] = ()):
        self._unet, self._covered = unet, list(covered)  # to check that masked adapters sit where they apply
        self.enabled = True  # False: the joint path is skipped (the masked LoRAs still apply)
        self.is_x: torch.Tensor | None = None  # (N,) bool
        self.lora_masks: dict[str, torch.Tensor] = {}  # adapter name -> (N,) bool

    def set_pairs(self, is_x: Sequence | torch.Tensor, lora_masks: dict | None = None) -> None:
        """``is_x`` (N,): 1 for the x member of a pair, 0 for the y member; as many of each, the k-th x
        paired with the k-th y. ``lora_masks`` {adapter: (N,) 0/1}: the samples that adapter applies to."""
        is_x = torch.as_tensor(is_x).bool().flatten()
        count = int(is_x.sum())
        if count * 2 != is_x.numel():
            raise InputError(
                f"is_x must mark as many x samples as y samples (pairs), got {count} x and "
                f"{is_x.numel() - count} y in {is_x.int().tolist()}"
            )
        masks = {}
        for name, mask in (lora_masks or {}).items():
            masks[name] = torch.as_tensor(mask).bool().flatten()
            if masks[name].numel() != is_x.numel():
                raise InputError(
                    f"the LoRA mask of {name!r} has {masks[name].numel()} entries but is_x has {is_x.numel()}"
                )
        if self._unet is not None:
            _check_masked_adapters(self._unet, self._covered, list(masks))
        self.is_x, self.lora_masks = is_x, masks

    def _samples(self, rows: int) -> int:
        if self.is_x is None:
            raise RuntimeError("call joint.set_pairs(is_x, lora_masks) before running the UNet")
        n = self.is_x.numel()
        if rows % n:
            raise InputError(f"the attention sees {rows} rows, not a multiple of the {n} samples of is_x")
        return rows // n  # rows per sample (frames for a video UNet)

    def row_masks(self, rows: int, device) -> dict[str, torch.Tensor]:
        """{adapter: (rows, 1, 1) 0/1} for a (rows, L, C) tensor: each sample's mask over its rows."""
        per = self._samples(rows)
        return {n: m.repeat_interleave(per).to(device)[:, None, None] for n, m in self.lora_masks.items()}

    def partner(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, L, C) -> (R, L, C): every sample's rows replaced by its partner's rows."""
        per = self._samples(x.shape[0])
        xs, ys = torch.nonzero(self.is_x).flatten(), torch.nonzero(~self.is_x).flatten()
        other = torch.empty(self.is_x.numel(), dtype=torch.long)
        other[xs], other[ys] = ys, xs  # (N,): the k-th x <-> the k-th y
        x = rearrange(x, "(n p) l c -> n p l c", p=per)  # (R, L, C) -> (N, rows per sample, L, C)
        return rearrange(x[other.to(x.device)], "n p l c -> (n p) l c")


def _linear(layer: nn.Module, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``layer(x)``, with each masked LoRA adapter's delta kept on the rows its mask selects:
    W x + b + sum_a mask_a (alpha_a / r_a) B_a A_a x. A plain linear layer is just called."""
    if not hasattr(layer, "lora_A") or layer.disable_adapters or not any(a in masks for a in layer.lora_A):
        return layer(x)  # peft's own forward: no masked adapter here
    if layer.merged:
        raise InputError(
            "a masked LoRA adapter cannot be fused (fuse_lora) into the weights; unfuse it first"
        )
    result = layer.base_layer(x)  # (R, L, out) W x + b
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in layer.lora_variant:
            raise InputError(
                f"adapter {name!r} is a LoRA variant (e.g. DoRA); joint attention takes plain LoRA"
            )
        a, b = layer.lora_A[name], layer.lora_B[name]
        delta = b(a(layer.lora_dropout[name](x.to(a.weight.dtype)))) * layer.scaling[name]  # (R, L, out)
        result = result + (delta * masks[name] if name in masks else delta).to(result.dtype)
    return result


def _attention(attn: Attention, x: torch.Tensor, context: torch.Tensor, masks: dict) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V with Q = x W_q, K = context W_k, V = context W_v, then W_out: what
    AttnProcessor2_0 computes for SD1.5's attention layers, with the masked LoRA projections."""
    q = _linear(attn.to_q, x, masks)  # (R, L, C)
    k, v = _linear(attn.to_k, context, masks), _linear(attn.to_v, context, masks)  # (R, S, C)
    q, k, v = (rearrange(t, "r l (h d) -> r h l d", h=attn.heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (R, heads, L, d)
    out = rearrange(out, "r h l d -> r l (h d)")  # (R, L, C)
    return attn.to_out[1](_linear(attn.to_out[0], out, masks))  # output projection, dropout


class MaskedLoraAttnProcessor:
    """Attention (self or cross) whose LoRA adapters follow the state's per-sample masks: for ``attn2`` and
    the joint copies."""

    def __init__(self, state: JointState, name: str):
        self.state, self.name = state, name

    def _masks(self, hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.state.row_masks(hidden_states.shape[0], hidden_states.device)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or hidden_states.ndim != 3:
            raise InputError(f"{self.name}: joint attention takes tokens (R, L, C) and no attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (R, S, C')
        return _attention(attn, hidden_states, context, self._masks(hidden_states))


class JointAttnProcessor(MaskedLoraAttnProcessor):
    """attn1's processor: its self-attention plus the zero-conv'd cross-attention to the pair's partner."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise InputError(f"{self.name}: joint attention runs in self-attention on tokens (R, L, C)")
        x = hidden_states  # (R, L, C): norm1's output, R = N samples x rows per sample
        own = _attention(attn, x, x, self._masks(x))  # (R, L, C)
        if not self.state.enabled:
            return own
        joint = getattr(attn, JOINT_ATTN)(x, encoder_hidden_states=self.state.partner(x))  # (R, L, C)
        conv = getattr(attn, JOINT_CONV)
        joint = rearrange(conv(rearrange(joint, "r l c -> r c l")), "r c l -> r l c")  # per token: C -> C
        return own + joint


def _check_masked_adapters(unet: nn.Module, covered: list[str], names: Sequence[str]) -> None:
    """Every layer holding a masked adapter must sit inside an attention these processors run."""
    prefixes = tuple(f"{n}." for n in covered)
    outside = [
        n
        for n, m in unet.named_modules()
        if hasattr(m, "lora_A") and any(a in m.lora_A for a in names) and not n.startswith(prefixes)
    ]
    if outside:
        raise InputError(
            f"masked LoRA adapters {sorted(names)} sit in layers the joint processors do not run, where "
            f"no mask could apply: {outside[:4]}{' ...' if len(outside) > 4 else ''}; add them with "
            "target_modules=own_lora_targets() or joint_lora_targets()"
        )


@contextmanager
def joint_attention(unet: nn.Module, is_x=None, lora_masks: dict | None = None) -> Iterator[JointState]:
    """Install the joint processors (attn1 + its copy, attn2) on a UNet given :func:`add_joint_layers`;
    yield the :class:`JointState` (pairs set if ``is_x`` is given); restore the processors on exit.
    The masked adapters (``lora_masks`` here or in later ``set_pairs`` calls) must sit in these attentions
    only; ``set_pairs`` checks it."""
    attn1 = joint_attention_names(unet)
    missing = [n for n in attn1 if not hasattr(unet.get_submodule(n), JOINT_ATTN)]
    if missing or not attn1:
        raise InputError(
            f"{missing[:3] or type(unet).__name__} has no joint layers: call anim_lab.joint.add_joint_layers "
            "first"
        )
    blocks = [n.removesuffix(".attn1") for n in attn1]
    attn2 = [
        f"{b}.attn2" for b in blocks if isinstance(getattr(unet.get_submodule(b), "attn2", None), Attention)
    ]
    state = JointState(unet, [*attn1, *attn2])
    if is_x is not None:
        state.set_pairs(is_x, lora_masks)  # checks that the masked adapters sit in these attentions
    processors = {n: JointAttnProcessor(state, n) for n in attn1}
    processors |= {f"{n}.{JOINT_ATTN}": MaskedLoraAttnProcessor(state, f"{n}.{JOINT_ATTN}") for n in attn1}
    processors |= {n: MaskedLoraAttnProcessor(state, n) for n in attn2}
    modules = {n: unet.get_submodule(n) for n in processors}
    for name, module in modules.items():
        _check_plain(name, module)
    saved = {n: m.processor for n, m in modules.items()}
    for name, module in modules.items():
        module.set_processor(processors[name])
    try:
        yield state
    finally:
        for name, module in modules.items():
            module.set_processor(saved[name])
