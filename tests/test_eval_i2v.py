"""scripts/eval_i2v.py: its ceiling row (ground-truth clips through a given causal VAE and back) and baseline
row (frame 0 copied), every metric in the written table, and bad input refused before any work."""

import json

import numpy as np
import pytest
import torch

import anim_lab
from anim_lab import metrics as M
from anim_lab import toy
from anim_lab.causal_vae import CAUSAL_VAE_TINY, CausalVAE
from anim_lab.plain import randomize


@pytest.fixture(scope="module")
def E():
    return anim_lab.load_script("eval_i2v")


def test_reconstruct_equals_encoding_and_decoding_each_clip_alone(E):
    torch.manual_seed(0)
    vae = randomize(CausalVAE(**CAUSAL_VAE_TINY)).double().eval()  # fp64: batching cannot hide in rounding
    clips = torch.rand(3, 3, 5, 16, 16, dtype=torch.float64) * 2 - 1  # (N, 3, F, H, W) in [-1, 1]
    batched = E.reconstruct(vae, clips, batch=2)  # batches of 2 and 1
    with torch.no_grad():
        alone = [vae.decode(vae.encode(c[None]).mode()).clamp(-1, 1) for c in clips]
    assert batched.shape == clips.shape
    torch.testing.assert_close(batched, torch.cat(alone), rtol=0, atol=1e-12)
    assert batched.abs().max() <= 1 and not torch.allclose(batched, clips, atol=1e-2)


def test_clips_are_the_ones_the_models_trained_on(E):
    seeds = [3, 11]
    frames, landmarks = E.render_clips(seeds, 32)
    train = anim_lab.load_script("train_toy_i2v")
    assert np.array_equal(frames, np.stack([train.render_clip(s, 32) for s in seeds]))
    assert frames.shape == (2, 17, 32, 32, 3) and landmarks.shape == (2, 17, 478, 2)
    none, no_landmarks = E.render_clips([], 32)  # --n >= the gallery: no further identity to render
    assert none.shape == (0, 17, 32, 32, 3) and no_landmarks.shape == (0, 17, 478, 2)


def test_copy_first_frame(E):
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    copied = E.copy_first_frame(frames)
    assert copied.shape == frames.shape
    assert all(np.array_equal(copied[:, t], frames[:, 0]) for t in range(5))


def test_the_vae_alone_gives_ceiling_and_baseline_rows_with_every_metric(E, tmp_path):
    torch.manual_seed(0)
    vae = randomize(CausalVAE(**CAUSAL_VAE_TINY)).eval()
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "eval.json"
    E.main(
        ["--vae", str(tmp_path / "vae"), "--size", "32", "--n", "2", "--kinds", "--recon-sizes", ""]
        + ["--json", str(out)]
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["ground truth", E.CEILING, E.BASELINE]
    assert result["gallery_identities"] == 32 and result["size"] == 32
    assert all(set(r) == set(E.METRICS) for r in rows.values())
    # the ceiling row is this VAE's reconstruction, scored as uint8 frames: recompute its PSNR and motion
    frames, _ = E.render_clips(result_seeds(result), 32)
    truth = E.to_video(frames)
    rec = E.to_video(E.to_u8(E.reconstruct(CausalVAE.from_pretrained(tmp_path / "vae"), truth)))
    assert rows[E.CEILING]["psnr"] == pytest.approx(float(M.psnr(rec, truth).mean()), abs=1e-4)
    gt_motion = float(M.frame_changes(truth).mean() * 255)
    assert rows["ground truth"]["motion"] == pytest.approx(gt_motion, abs=1e-4)
    assert rows[E.CEILING]["motion_ratio"] == pytest.approx(
        float(M.frame_changes(rec).mean() * 255) / gt_motion, abs=1e-3
    )
    assert rows[E.CEILING]["psnr"] < 20  # a random VAE is far from the truth
    # the baseline: frame 0 copied, so no motion, and its flicker is minus the ground truth's
    base = rows[E.BASELINE]
    assert base["motion"] == 0 and base["motion_ratio"] == 0
    assert base["flicker"] == pytest.approx(-gt_motion / 255, abs=1e-4)
    assert rows["ground truth"]["psnr"] is None and rows["ground truth"]["motion_ratio"] == 1


def result_seeds(result):
    return list(toy.identity_split("test"))[: result["n_identities"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recon-sizes", "96,big"], "--recon-sizes must be a comma list of sizes"),
        (["--size", "60"], "--size and --recon-sizes must be multiples of 8"),
        (["--n", "0"], "--n and --recon-n must be >= 1"),
        (["--vae", "/nonexistent/vae"], "/nonexistent/vae must be a folder holding config.json"),
        (["--kinds", "pixel_concat"], "pixel_concat"),
    ],
)
def test_bad_input_is_named_before_any_work(E, tmp_path, capsys, args, message):
    with pytest.raises((SystemExit, ValueError)) as info:
        E.main([*args, "--json", str(tmp_path / "eval.json")])
    text = capsys.readouterr().err + str(info.value)
    assert message in text
    assert not (tmp_path / "eval.json").exists()
