"""Plain re-implementations, written from the reference code's semantics, for tests, benchmarks and readers
who compare.

Each module here does one thing the way the official code does it, step by step and independently of the
anim_lab module it checks, so that an equality between the two means something:

- ``anim_lab.plain.reference``: Moore-AnimateAnyone's ``ReferenceAttentionControl`` (writers, readers, banks)
  on diffusers' own attention processors; checks ``anim_lab.reference``.
- ``anim_lab.plain.pose2video``: Moore-AnimateAnyone's ``pipeline_pose2vid_long.py`` loop (hacked block
  forwards, the ``uniform`` context scheduler, one UNet call per window, one VAE decode per frame); checks
  ``anim_lab.pipelines.Pose2VideoPipeline``.

And the weights such comparisons need, :func:`randomize`: every parameter random and nonzero. A comparison
on freshly built models is weak: zero-initialised layers (a motion module's ``proj_out``, a pose guider's
``conv_out``) switch whole paths off, and constant norm scales and biases hide a mistake that scales or shifts
a tensor, so the two sides agree even where one of them is wrong.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize"]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter of ``module`` random values, in place (no all-zero or constant tensor left), and
    return the module.

    The values depend only on the architecture and ``seed`` (a generator of their own, not the global RNG):
    two models built alike and randomised with one seed are equal, whatever their initialisation.

    - weights of 2 or more dimensions: N(0, 1 / fan_in), with fan_in = ``w[0].numel()`` (in_features, or
      in_channels x kernel), so that activations stay O(1) through deep stacks;
    - 1-dimensional weights (the scales of GroupNorm, LayerNorm, BatchNorm, RMSNorm): 1 + 0.2 N(0, 1);
    - every other parameter (biases, 1-dimensional embeddings): 0.2 N(0, 1);
    - BatchNorm statistics: ``running_mean`` 0.3 N(0, 1), ``running_var`` U(0.5, 1.5) and
      ``num_batches_tracked`` 7 (not 0, so that a test can count the updates); every other buffer (positional
      encodings, position ids) is kept.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # one generator, drawn in state-dict order (each module's parameters, then its buffers; a tied weight
        # once per name, the last draw kept); non-persistent buffers are not in the state dict and are kept
        params = {id(p) for p in module.parameters()}
        for name, t in module.state_dict(keep_vars=True).items():
            leaf = name.rsplit(".", 1)[-1]
            if id(t) not in params:  # a buffer
                if leaf == "running_mean":
                    t.copy_(0.3 * torch.randn(t.shape, generator=g))
                elif leaf == "running_var":
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif leaf == "num_batches_tracked":
                    t.fill_(7)
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif leaf == "weight":
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return module
