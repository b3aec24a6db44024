"""Reference attention the way the reference code does it: Moore-AnimateAnyone's ``ReferenceAttentionControl``
(implementations.md §1.2), on diffusers' own attention processors and no anim_lab code.

The ReferenceNet's transformer blocks append their ``norm1`` output to per-block lists during its forward;
writers and readers are paired by a stable sort on the channel width; a reader repeats every bank entry over
the frames and concatenates it to the frame's own tokens; under classifier-free guidance the uncond rows
(first half) are computed with the reference and then recomputed without it.

What tests/test_reference.py checks ``anim_lab.reference`` against, and what
benchmarks/bench_reference_attention.py measures it against.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange


def torch_dfs(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Depth-first list of modules, the reference's helper."""
    result = [model]
    for child in model.children():
        result += torch_dfs(child)
    return result


class PlainWriter(AttnProcessor2_0):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.block.bank.append(hidden_states.clone())  # norm1's output, (B_ref, HW, C)
        return super().__call__(attn, hidden_states, *args, **kwargs)


class PlainReader(AttnProcessor2_0):
    def __init__(self, block, control):
        super().__init__()
        self.block, self.control = block, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        c = self.control
        if not self.block.bank:
            return super().__call__(attn, hidden_states)
        # every reference entry repeated for all frames, then concatenated along the tokens
        bank_fea = [
            rearrange(d.unsqueeze(1).repeat(1, c.video_length, 1, 1), "b t l c -> (b t) l c")
            for d in self.block.bank
        ]
        modify = torch.cat([hidden_states] + bank_fea, dim=1)  # (N*F, HW + HW, C)
        out = super().__call__(attn, hidden_states, encoder_hidden_states=modify)
        if c.do_classifier_free_guidance:  # the uncond rows (first half) again, without the reference
            rows = hidden_states.shape[0]
            uc_mask = torch.tensor([1] * (rows // 2) + [0] * (rows // 2), dtype=torch.bool)
            out[uc_mask] = super().__call__(
                attn, hidden_states[uc_mask], encoder_hidden_states=hidden_states[uc_mask]
            )
        return out


class PlainReferenceControl:
    """Reference attention as the reference code does it, on diffusers' own processors (no anim_lab code)."""

    def __init__(self, reference_unet, denoising_unet, video_length, do_classifier_free_guidance, dtype=None):
        self.video_length = video_length
        self.do_classifier_free_guidance = do_classifier_free_guidance
        self.dtype = dtype  # the reference's update() casts to float16 by default; None keeps the dtype
        self.writers = [m for m in torch_dfs(reference_unet) if isinstance(m, BasicTransformerBlock)]
        self.readers = [m for m in torch_dfs(denoising_unet) if isinstance(m, BasicTransformerBlock)]
        self.writers.sort(key=lambda m: -m.norm1.normalized_shape[0])  # stable: ties keep the DFS order
        self.readers.sort(key=lambda m: -m.norm1.normalized_shape[0])
        for w in self.writers:
            w.bank = []
            w.attn1.set_processor(PlainWriter(w))
        for r in self.readers:
            r.bank = []
            r.attn1.set_processor(PlainReader(r, self))

    def update(self):
        for r, w in zip(self.readers, self.writers, strict=True):
            r.bank = [v.clone().to(self.dtype or v.dtype) for v in w.bank]

    def clear(self):
        for m in self.readers + self.writers:
            m.bank = []
            m.attn1.set_processor(AttnProcessor2_0())
