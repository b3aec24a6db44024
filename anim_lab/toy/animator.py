"""The toy animator: a tiny AnimateAnyone trained on the toy world (scripts/train_animator.py), shipped as a
standard diffusers pipeline folder in ``anim_lab/assets/toy_animator``.

    from anim_lab import toy
    pipe = toy.load_animator()            # a Pose2VideoPipeline, offline
"""

from __future__ import annotations

import os
from pathlib import Path

from anim_lab.errors import InputError

TOY_ANIMATOR_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_animator"
SCHEDULERS = ("scaled_linear", "linear")


def load_animator(folder: str | os.PathLike = TOY_ANIMATOR_DIR, scheduler: str = "scaled_linear"):
    """The toy animator as a :class:`~anim_lab.pipelines.Pose2VideoPipeline` (``Pose2VideoPipeline
    .from_pretrained(folder)``: the toy VAE and the frozen image encoder it was trained with travel in the
    folder, as the official checkpoints ship theirs), every network frozen.

    ``scheduler``: the DDIM betas, "scaled_linear" (what the training used, as saved in the folder) or
    "linear" (the official inference configs). A missing or mismatched file is named, with how to get it
    back."""
    from ..guidance import build_scheduler, check_prediction_type
    from ..pipelines import Pose2VideoPipeline

    if scheduler not in SCHEDULERS:
        raise InputError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    folder = Path(folder)
    hint = (
        f"; train it with scripts/train_animator.py (see {TOY_ANIMATOR_DIR.name}/COMMANDS.md) or restore the "
        "files from git"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"the toy animator folder {folder} does not exist{hint}")
    try:
        pipe = Pose2VideoPipeline.from_pretrained(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}{hint}") from None
    except ValueError as err:  # another pipeline, keys that do not fit a config, a truncated file: all named
        raise InputError(f"{err}{hint}") from None
    if scheduler == "linear":
        trained_for = pipe.scheduler.config.prediction_type  # what the denoiser outputs (v, at training)
        pipe.scheduler = build_scheduler("linear")
        check_prediction_type(pipe.scheduler, trained_for)  # the new betas must read the output as the same
    for module in pipe.components.values():
        if hasattr(module, "requires_grad_"):
            module.requires_grad_(False)
    return pipe
