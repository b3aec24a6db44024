"""Context windows: denoise a video longer than the motion module's window, in overlapping pieces.

The motion module attends over at most ``temporal_position_encoding_max_len`` frames (32 in the official
checkpoints) and was trained on windows of 16-24 frames. A longer video is denoised, at every step, window by
window, and the predictions of frames that several windows cover are averaged:

    windows = context_windows(F, context_frames=24, context_overlap=4)      # list of lists of frame indices
    for each batch of windows:
        pred = denoising_unet(latents[:, :, window], ...)                   # per window
        noise_pred[:, :, window] += pred;  counter[window] += 1
    noise_pred = noise_pred / counter                                        # every frame: the mean

- **The windows** (:func:`context_windows`) are the reference's ``uniform`` scheduler as its pipelines call
  it (step 0, stride 1, closed loop): windows start every ``context_frames - context_overlap`` frames from 0
  up to the last frame, and **wrap around** modulo the video length, so the last window mixes the end of the
  video with its start (64 frames at 24/4: 0-23, 20-43, 40-63, 60-63 + 0-19). The windows never shift from
  one step to the next. A video no longer than one window is one window of all its frames.
- **Averaging** (:func:`predict_in_windows`) divides by the counter with or without CFG. The reference divides
  only inside its CFG branch, so without CFG the frames covered twice get the *sum* of two predictions;
  ``faithful=True`` reproduces that.
- **Batching**: ``context_batch_size`` windows go through the UNet in one call. The reference adds the whole
  batch's prediction to each window of the batch, which is wrong for a batch size above 1; here each window
  gets its own rows, so every batch size gives the result of batch size 1.
- A window longer than the position encoding is an error here, before any UNet runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange

from .errors import InputError

__all__ = ["context_windows", "window_counter", "batch_windows", "gather_windows", "predict_in_windows"]


def context_windows(
    num_frames: int, context_frames: int = 24, context_overlap: int = 4, max_len: int | None = 32
) -> list[list[int]]:
    """The reference's uniform, wrap-around windows: a list of windows, each a list of frame indices.

    ``max_len`` is the motion module's position-encoding length (``temporal_position_encoding_max_len``, 32
    in the official checkpoints); ``None`` skips that check. Defaults: Moore-AnimateAnyone's 24/4
    (AniPortrait uses 16/4).
    """
    for name, value in (("num_frames", num_frames), ("context_frames", context_frames)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if not 0 <= context_overlap < context_frames:
        raise InputError(
            f"context_overlap must be in [0, context_frames) so that windows advance; got "
            f"context_overlap={context_overlap} with context_frames={context_frames}"
        )
    if max_len is not None and context_frames > max_len:
        raise InputError(
            f"context_frames={context_frames} is longer than the motion module's position encoding "
            f"(max_len={max_len} frames): use context_frames <= {max_len} (the official configs use 16 or 24)"
        )
    if num_frames <= context_frames:
        return [list(range(num_frames))]  # one window covers the whole video
    step = context_frames - context_overlap
    return [[(start + k) % num_frames for k in range(context_frames)] for start in range(0, num_frames, step)]


def window_counter(windows: list[list[int]], num_frames: int) -> torch.Tensor:
    """(F,) how many windows cover each frame; raises if a window names a frame outside [0, F) or a frame is
    in no window (its average would divide by zero)."""
    if not windows or any(len(w) == 0 for w in windows):
        raise InputError("windows must be a non-empty list of non-empty lists of frame indices")
    flat = torch.tensor([f for w in windows for f in w], dtype=torch.long)
    if int(flat.min()) < 0 or int(flat.max()) >= num_frames:
        raise InputError(
            f"window frame indices must lie in [0, {num_frames}); got {flat.min()}..{flat.max()}"
        )
    counter = torch.bincount(flat, minlength=num_frames)  # (F,)
    missing = (counter == 0).nonzero().flatten().tolist()
    if missing:
        raise InputError(f"frames {missing} are in no window; every frame needs at least one")
    return counter


def batch_windows(windows: list[list[int]], context_batch_size: int = 1) -> list[list[list[int]]]:
    """Consecutive groups of ``context_batch_size`` windows (the last group may be shorter)."""
    if context_batch_size < 1:
        raise InputError(f"context_batch_size must be >= 1, got {context_batch_size}")
    return [windows[i : i + context_batch_size] for i in range(0, len(windows), context_batch_size)]


def gather_windows(video: torch.Tensor, batch: list[list[int]]) -> torch.Tensor:
    """The frames of n windows as a batch of n short videos: (B, C, F, H, W) -> (n*B, C, f, H, W), in
    window-major order ``(n b)``. What :func:`predict_in_windows` hands its callable; use it on anything else
    per frame (pose features) to get the same layout."""
    if video.ndim != 5:
        raise InputError(f"expected a video (B, C, F, H, W), got shape {tuple(video.shape)}")
    if len({len(w) for w in batch}) != 1:
        raise InputError(f"windows batched together must have one length, got {[len(w) for w in batch]}")
    index = torch.tensor(batch, device=video.device).flatten()  # (n*f,) the frame of each window position
    # (B, C, n*f, H, W) -> (n*B, C, f, H, W): each window becomes B rows of an f-frame video
    return rearrange(video[:, :, index], "b c (n f) h w -> (n b) c f h w", n=len(batch))


def predict_in_windows(
    predict: Callable[[torch.Tensor, list[list[int]]], torch.Tensor],
    latents: torch.Tensor,
    windows: list[list[int]],
    context_batch_size: int = 1,
    do_classifier_free_guidance: bool = False,
    faithful: bool = False,
) -> torch.Tensor:
    """Run ``predict`` over the windows in batches and average each frame's predictions.

    ``latents`` (B, C, F, H, W). For each batch of n windows of f frames, ``predict(x, batch)`` gets
    ``x`` = the latents of those windows, (n*B, C, f, H, W) in window-major order ``(n b)``
    (:func:`gather_windows`), and the windows themselves (``gather_windows(pose_features, batch)`` slices
    per-frame conditions the same way). It returns the prediction for those rows: (n*B, C, f, H, W) without
    CFG; with CFG (G = 2) the CFG batch (2*n*B, C, f, H, W) laid out ``(g n b)`` -- every window's
    unconditional rows first, then every window's conditional rows, as the reference's
    ``torch.cat(windows).repeat(2)``.

    Returns the per-frame mean, (G*B, C, F, H, W) (uncond rows first under CFG; combine them with
    ``anim_lab.guidance.cfg_combine``). ``faithful=True`` without CFG returns the reference's sum instead.
    """
    if latents.ndim != 5:
        raise InputError(f"latents must be a video (B, C, F, H, W), got shape {tuple(latents.shape)}")
    B, C, F, H, W = latents.shape
    counter = window_counter(windows, F).to(latents.device)  # (F,)
    groups = 2 if do_classifier_free_guidance else 1
    noise_pred = latents.new_zeros(groups * B, C, F, H, W)
    for batch in batch_windows(windows, context_batch_size):
        x = gather_windows(latents, batch)  # (B, C, F, H, W) -> (n*B, C, f, H, W)
        n, f = len(batch), len(batch[0])
        pred = predict(x, batch)
        expected = (groups * n * B, C, f, H, W)
        if tuple(pred.shape) != expected:
            raise InputError(
                f"predict returned {tuple(pred.shape)} for {n} window(s) of {f} frames; expected {expected}"
                + (" (the CFG batch: uncond rows of every window first)" if groups == 2 else "")
            )
        # (G*n*B, C, f, H, W) -> (G*B, C, n*f, H, W): window i's rows go back to window i's frames
        pred = rearrange(pred.to(noise_pred.dtype), "(g n b) c f h w -> (g b) c (n f) h w", g=groups, n=n)
        index = torch.tensor(batch, device=latents.device).flatten()  # (n*f,) the frame of each position
        noise_pred.index_add_(2, index, pred)  # sums the frames several windows share
    if faithful and not do_classifier_free_guidance:
        return noise_pred  # the reference: summed, never divided, without CFG
    return noise_pred / counter.to(noise_pred.dtype).reshape(1, 1, F, 1, 1)  # (G*B, C, F, H, W)
