"""Context windows (anim_lab.context) against the reference's scheduler and denoising loop, written out here
from implementations.md §1.6/§1.7, with a random motion module (cross-frame attention) as the denoiser."""

import math

import numpy as np
import pytest
import torch
from einops import rearrange

from anim_lab.context import (
    batch_windows,
    context_windows,
    gather_windows,
    predict_in_windows,
    window_counter,
)
from anim_lab.guidance import cfg_batch
from anim_lab.motion import MotionModule
from anim_lab.plain import randomize


# --- the reference's scheduler, written out from §1.6 -------------------------------------------------------
def _ordered_halving(value: int) -> float:
    """The 64-bit binary digits of value, reversed, read as a fraction (0 -> 0.0, 1 -> 0.5, 2 -> 0.25...)."""
    return int(f"{value:064b}"[::-1], 2) / 2**64


def _reference_uniform(step, num_frames, context_size, context_stride, context_overlap, closed_loop=True):
    if num_frames <= context_size:
        yield list(range(num_frames))
        return
    context_stride = min(context_stride, int(np.ceil(np.log2(num_frames / context_size))) + 1)
    for context_step in 1 << np.arange(context_stride):
        pad = int(round(num_frames * _ordered_halving(step)))
        start = int(_ordered_halving(step) * context_step) + pad
        stop = num_frames + pad + (0 if closed_loop else -context_overlap)
        for j in range(start, stop, context_size * context_step - context_overlap):
            yield [e % num_frames for e in range(j, j + context_size * context_step, context_step)]


# implementations.md §1.6 [verified]: (first frame, last frame) of each window
SECTION_1_6 = [
    (25, 24, [(0, 23), (20, 18)]),
    (48, 24, [(0, 23), (20, 43), (40, 15)]),
    (64, 24, [(0, 23), (20, 43), (40, 63), (60, 19)]),
    (64, 16, [(0, 15), (12, 27), (24, 39), (36, 51), (48, 63), (60, 11)]),
]


@pytest.mark.parametrize("num_frames, context_frames, ends", SECTION_1_6)
def test_windows_equal_section_1_6(num_frames, context_frames, ends):
    windows = context_windows(num_frames, context_frames, 4)
    assert [(w[0], w[-1]) for w in windows] == ends
    for w in windows:  # consecutive frames modulo the video length
        assert w == [(w[0] + k) % num_frames for k in range(context_frames)]


def test_windows_100_frames_at_24_4():
    windows = context_windows(100, 24, 4)
    assert len(windows) == 5 and (windows[-1][0], windows[-1][-1]) == (80, 3)


@pytest.mark.parametrize("num_frames", [1, 5, 23, 24, 25, 31, 48, 64, 99, 100, 129, 600])
@pytest.mark.parametrize("context_frames, context_overlap", [(24, 4), (16, 4), (16, 0), (8, 7), (32, 8)])
def test_windows_equal_the_reference_scheduler(num_frames, context_frames, context_overlap):
    expected = list(_reference_uniform(0, num_frames, context_frames, 1, context_overlap))
    assert context_windows(num_frames, context_frames, context_overlap) == expected


@pytest.mark.parametrize("num_frames", [1, 7, 24])
def test_a_video_shorter_than_a_window_is_one_window(num_frames):
    assert context_windows(num_frames, 24, 4) == [list(range(num_frames))]


def test_counter_and_batches():
    windows = context_windows(64, 24, 4)
    counter = window_counter(windows, 64)
    expected = torch.zeros(64, dtype=torch.long)
    for w in windows:
        expected[w] += 1
    assert torch.equal(counter, expected)
    assert (
        counter[:24].tolist() == [2] * 24 and counter[24:40].tolist() == [1] * 16
    )  # wrap-around doubles 0-19
    assert batch_windows(windows, 3) == [windows[:3], windows[3:]]
    assert batch_windows(windows, 10) == [windows]


# --- the denoising loop -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def motion():
    """A motion module with every weight random and nonzero (proj_out re-initialised), so each window's
    prediction depends on all of its frames."""
    return randomize(MotionModule(8, num_attention_heads=2, norm_num_groups=4).eval())


def _video_model(motion, x):
    """(N, C, f, H, W) -> (N, C, f, H, W): the motion module on each f-frame video."""
    f = x.shape[2]
    h = motion(rearrange(x, "n c f h w -> (n f) c h w"), f)
    return rearrange(h, "(n f) c h w -> n c f h w", f=f)


def _cfg_model(motion, x):
    """The CFG batch: uncond rows = model(x), cond rows = model(x) + 0.5 x (a stand-in for the condition)."""
    rows = cfg_batch(x)  # (2N, C, f, H, W): [x; x]
    out = _video_model(motion, rows)
    half = x.shape[0]
    return torch.cat([out[:half], out[half:] + 0.5 * x])


def _reference_loop(model, latents, windows, do_cfg):
    """§1.7 step 7 with context_batch_size = 1: sum each window's prediction into its frames, count, and
    divide by the counter only inside the CFG branch."""
    B, C, F, H, W = latents.shape
    noise_pred = torch.zeros(2 * B if do_cfg else B, C, F, H, W)
    counter = torch.zeros(1, 1, F, 1, 1)
    for c in windows:
        pred = model(latents[:, :, c])
        noise_pred[:, :, c] = noise_pred[:, :, c] + pred
        counter[:, :, c] = counter[:, :, c] + 1
    return noise_pred / counter if do_cfg else noise_pred


def _predictor(motion, do_cfg, calls=None):
    def predict(x, batch):
        if calls is not None:
            calls.append((x.shape[0], [list(w) for w in batch]))
        return _cfg_model(motion, x) if do_cfg else _video_model(motion, x)

    return predict


@pytest.mark.parametrize("do_cfg", [False, True])
def test_faithful_equals_the_reference_loop(motion, do_cfg):
    latents = torch.randn(1, 8, 48, 4, 4)
    windows = context_windows(48, 24, 4)
    model = (lambda x: _cfg_model(motion, x)) if do_cfg else (lambda x: _video_model(motion, x))
    with torch.no_grad():
        expected = _reference_loop(model, latents, windows, do_cfg)
        ours = predict_in_windows(_predictor(motion, do_cfg), latents, windows, 1, do_cfg, faithful=True)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("do_cfg", [False, True])
def test_default_averages_with_and_without_cfg(motion, do_cfg):
    B, F = 2, 64
    latents = torch.randn(B, 8, F, 4, 4)
    windows = context_windows(F, 16, 4)
    with torch.no_grad():
        ours = predict_in_windows(_predictor(motion, do_cfg), latents, windows, 1, do_cfg)
        # the mean over the windows covering each frame, frame by frame, from separate window predictions
        per_window = [
            (w, _cfg_model(motion, latents[:, :, w]) if do_cfg else _video_model(motion, latents[:, :, w]))
            for w in windows
        ]
    for frame in range(F):
        preds = [pred[:, :, w.index(frame)] for w, pred in per_window if frame in w]
        torch.testing.assert_close(ours[:, :, frame], torch.stack(preds).mean(0))


def test_the_no_cfg_sum_bug_only_behind_faithful(motion):
    latents = torch.randn(1, 8, 64, 4, 4)
    windows = context_windows(64, 24, 4)
    counter = window_counter(windows, 64)
    with torch.no_grad():
        mean = predict_in_windows(_predictor(motion, False), latents, windows)
        summed = predict_in_windows(_predictor(motion, False), latents, windows, faithful=True)
        mean_cfg = predict_in_windows(
            _predictor(motion, True), latents, windows, do_classifier_free_guidance=True
        )
        faithful_cfg = predict_in_windows(
            _predictor(motion, True), latents, windows, do_classifier_free_guidance=True, faithful=True
        )
    once, twice = counter == 1, counter == 2
    torch.testing.assert_close(summed[:, :, once], mean[:, :, once])  # frames in one window agree
    torch.testing.assert_close(summed[:, :, twice], 2 * mean[:, :, twice])  # shared frames: twice the scale
    assert not torch.allclose(summed, mean)
    torch.testing.assert_close(faithful_cfg, mean_cfg)  # with CFG the reference divides too


@pytest.mark.parametrize("do_cfg", [False, True])
def test_any_batch_size_equals_batch_size_one(motion, do_cfg):
    B, F = 2, 100
    latents = torch.randn(B, 8, F, 4, 4)
    windows = context_windows(F, 24, 4)  # 5 windows
    with torch.no_grad():
        one = predict_in_windows(_predictor(motion, do_cfg), latents, windows, 1, do_cfg)
        for size in (2, 3, 5, 8):
            calls = []
            batched = predict_in_windows(_predictor(motion, do_cfg, calls), latents, windows, size, do_cfg)
            torch.testing.assert_close(batched, one)
            assert [n for n, _ in calls] == [B * len(b) for b in batch_windows(windows, size)]
            assert [w for _, b in calls for w in b] == windows
    assert len(calls) == math.ceil(len(windows) / 8)


def test_predict_sees_each_windows_latents_window_major():
    latents = torch.randn(2, 3, 30, 2, 2)
    windows = context_windows(30, 8, 2)
    seen = []

    def predict(x, batch):
        seen.append(x.clone())
        return x

    out = predict_in_windows(predict, latents, windows, context_batch_size=2)
    torch.testing.assert_close(
        seen[0], gather_windows(latents, windows[:2])
    )  # the same layout for conditions
    torch.testing.assert_close(out, latents)  # identity per window averages back to the latents
    first = seen[0]  # windows 0 and 1: rows (window 0, b 0), (window 0, b 1), (window 1, b 0), ...
    torch.testing.assert_close(first[0], latents[0, :, windows[0]])
    torch.testing.assert_close(first[1], latents[1, :, windows[0]])
    torch.testing.assert_close(first[2], latents[0, :, windows[1]])


def test_gather_windows_slices_each_window_per_video():
    pose = torch.randn(2, 5, 40, 3, 3)  # per-frame conditions (B, C, F, H, W)
    batch = context_windows(40, 16, 4)[1:3]  # windows 1 and 2 (the second wraps around)
    gathered = gather_windows(pose, batch)
    assert gathered.shape == (4, 5, 16, 3, 3)
    for i, w in enumerate(batch):
        for b in range(2):
            torch.testing.assert_close(gathered[i * 2 + b], torch.stack([pose[b, :, f] for f in w], dim=1))


def test_one_window_equals_the_whole_video(motion):
    latents = torch.randn(1, 8, 10, 4, 4)
    windows = context_windows(10, 24, 4)
    with torch.no_grad():
        ours = predict_in_windows(_predictor(motion, False), latents, windows)
        torch.testing.assert_close(ours, _video_model(motion, latents))


# --- bad input ----------------------------------------------------------------------------------------------
def test_window_longer_than_the_position_encoding(motion):
    with pytest.raises(ValueError, match=r"longer than the motion module's position encoding \(max_len=32"):
        context_windows(100, 40, 4)
    assert len(context_windows(100, 40, 4, max_len=None)[0]) == 40  # no check asked for
    with pytest.raises(ValueError, match="max_len=32"):  # the module itself would fail later, mid-loop
        motion(torch.randn(40, 8, 2, 2), 40)


@pytest.mark.parametrize("overlap", [24, 30, -1])
def test_bad_overlap(overlap):
    with pytest.raises(ValueError, match=r"context_overlap must be in \[0, context_frames\)"):
        context_windows(64, 24, overlap)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        context_windows(0, 24, 4)
    with pytest.raises(ValueError, match="context_frames must be >= 1"):
        context_windows(10, 0, 0)
    with pytest.raises(ValueError, match="context_batch_size must be >= 1"):
        batch_windows([[0]], 0)


def test_bad_windows():
    with pytest.raises(ValueError, match=r"frames \[3\] are in no window"):
        window_counter([[0, 1], [1, 2]], 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        window_counter([[0, 1, 2, 4]], 4)
    with pytest.raises(ValueError, match="non-empty"):
        window_counter([], 4)
    with pytest.raises(ValueError, match=r"expected a video \(B, C, F, H, W\)"):
        gather_windows(torch.randn(2, 5, 3, 3), [[0, 1]])
    with pytest.raises(ValueError, match="one length"):
        predict_in_windows(
            lambda x, b: x, torch.randn(1, 2, 4, 2, 2), [[0, 1, 2], [3, 0]], context_batch_size=2
        )


def test_bad_latents_and_predictions():
    windows = context_windows(30, 8, 2)
    with pytest.raises(ValueError, match=r"latents must be a video \(B, C, F, H, W\)"):
        predict_in_windows(lambda x, b: x, torch.randn(2, 30, 4, 4), windows)
    with pytest.raises(ValueError, match=r"predict returned \(2, 3, 8, 2, 2\) .* expected \(4, 3, 8, 2, 2\)"):
        predict_in_windows(
            lambda x, b: x, torch.randn(2, 3, 30, 2, 2), windows, do_classifier_free_guidance=True
        )
