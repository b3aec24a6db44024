"""`anim-lab demo` on the embedded toy animator, its bad input, and scripts/eval_animator.py's metrics and
ablation switches against independent computations."""

import json
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import anim_lab
from anim_lab import cli
from anim_lab.context import context_windows
from anim_lab.toy import load_animator

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    return anim_lab.load_script(name)


@pytest.fixture(scope="module")
def E():
    return _load("eval_animator")


@pytest.fixture(scope="module")
def tiny_weights(tiny_animator_weights):
    """A tiny animator with motion modules, every weight random and nonzero (tests/conftest.py)."""
    return tiny_animator_weights


# --- the demo -------------------------------------------------------------------------------------------
def test_demo_writes_video_gif_and_strip(tiny_weights, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--weights", str(tiny_weights), "--out-dir", str(out), "--frames", "4", "--steps", "2"]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["demo.gif", "demo.mp4", "strip.png"]
    strip = np.asarray(PIL.Image.open(out / "strip.png"))
    assert strip.shape == (4 * 128, 4 * 128, 3)  # 4 frames x (reference | pose | generated | truth)
    assert "strip.png" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left
    umask = os.umask(0o022)  # the folder gets what mkdir would give it, not mkdtemp's 0700
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_demo_on_the_committed_toy_animator(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out-dir", str(out), "--frames", "2", "--steps", "1", "--no-progress"]) == 0
    assert (out / "demo.mp4").stat().st_size > 0


@pytest.mark.parametrize("case", ["missing", "no_encoder", "mismatched", "unwritable"])
def test_demo_bad_input_fails_clearly_and_writes_nothing(tiny_weights, tmp_path, capsys, case):
    import shutil

    weights, out = tmp_path / "weights", tmp_path / "demo"
    shutil.copytree(tiny_weights, weights)
    if case == "missing":
        (weights / "pose_guider" / "diffusion_pytorch_model.safetensors").unlink()
        message = r"pose_guider/diffusion_pytorch_model.safetensors is missing"
    elif case == "no_encoder":  # the frozen image encoder travels with the weights
        shutil.rmtree(weights / "image_encoder")
        message = r"incomplete saved pipeline: missing image_encoder/config.json.*; train it"
    elif case == "mismatched":  # the config says wider blocks than the weights have: keys named
        config = weights / "denoising_unet" / "config.json"
        config.write_text(config.read_text().replace("16", "24"))
        message = r"(?s)\(against denoising_unet/config.json\).*down_blocks\.1"
    else:
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "demo"
        message = r"cannot write .*a_file/demo: .*a_file is a file, not a folder; choose another --out-dir"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--weights", str(weights), "--out-dir", str(out), "--frames", "2", "--steps", "1"])
    assert exit_info.value.code == 2

    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- the eval script's metrics --------------------------------------------------------------------------
def test_flicker_and_seam_error_against_loops(E):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    diff = lambda v: np.mean([np.abs(v[t + 1] / 255.0 - v[t] / 255.0).mean() for t in range(len(v) - 1)])  # noqa: E731
    assert E.flicker(video, truth) == pytest.approx(diff(video) - diff(truth), abs=1e-6)
    windows = context_windows(12, 4, 0, max_len=None)  # 0-3, 4-7, 8-11: seams at 4 and 8
    jump = lambda v, s: np.abs(v[s] / 255.0 - v[s - 1] / 255.0).mean()  # noqa: E731
    expected = np.mean([jump(video, s) - jump(truth, s) for s in (4, 8)])
    assert E.seam_error(video, truth, windows) == pytest.approx(expected, abs=1e-6)
    assert E.seam_error(truth, truth, windows) == 0.0


def test_metrics_of_the_ground_truth_itself(E):
    """Ground truth against itself: infinite PSNR aside, SSIM 1, identity 100%, mediapipe finds every face
    within a few pixels (toy-world-findings §7: 1.77 px on renders), no extra flicker."""
    cases = E.make_cases(2, 3)
    truths = [c.truth for c in cases]
    probe = E.IdentityProbe()
    assert E.identity_top1(truths, cases, probe) == 1.0
    np.testing.assert_allclose(E.frame_ssim(truths[0], truths[0]), 1.0)
    with E.FaceLandmarker() as landmarker:
        errors = E.pose_errors(truths[0], cases[0].landmarks, landmarker)
    assert all(e is not None and e < 4.0 for e in errors)
    assert E.flicker(truths[0], truths[0]) == 0.0
    noisy = np.clip(truths[0].astype(int) + 8, 0, 255).astype(np.uint8)
    mse = ((noisy / 127.5 - truths[0] / 127.5) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(E.frame_psnr(noisy, truths[0]), 10 * np.log10(4 / mse), rtol=1e-5)


# --- the ablation switches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tiny_weights):
    pipe = load_animator(tiny_weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def case(E):
    return E.make_cases(1, 3)[0]


def _gen(E, pipe, case):
    return E.generate(pipe, case, steps=2, cfg=2.0)


def test_no_pose_guider_equals_a_guider_with_zero_output(E, tiny_pipe, case):
    with E.without_pose_guider(tiny_pipe):
        ablated = _gen(E, tiny_pipe, case)
    conv_out = tiny_pipe.pose_guider.conv_out
    saved = conv_out.weight.clone(), conv_out.bias.clone()
    with torch.no_grad():
        conv_out.weight.zero_(), conv_out.bias.zero_()
    try:
        zeroed = _gen(E, tiny_pipe, case)
    finally:
        with torch.no_grad():
            conv_out.weight.copy_(saved[0]), conv_out.bias.copy_(saved[1])
    np.testing.assert_array_equal(ablated, zeroed)
    assert not np.array_equal(ablated, _gen(E, tiny_pipe, case))  # the guider matters otherwise


def test_no_motion_modules_equals_motion_modules_at_identity(E, tiny_pipe, case):
    with E.without_motion_modules(tiny_pipe):
        ablated = _gen(E, tiny_pipe, case)
    saved = {k: v.clone() for k, v in tiny_pipe.denoising_unet.state_dict().items() if "proj_out" in k}
    with torch.no_grad():  # AnimateDiff's zero proj_out: a motion module that adds nothing
        for _, module in tiny_pipe.denoising_unet.motion_modules():
            module.temporal_transformer.proj_out.weight.zero_()
            module.temporal_transformer.proj_out.bias.zero_()
    try:
        identity = _gen(E, tiny_pipe, case)
    finally:
        tiny_pipe.denoising_unet.load_state_dict(saved, strict=False)
    np.testing.assert_allclose(ablated.astype(int), identity.astype(int), atol=1)
    assert not np.array_equal(ablated, _gen(E, tiny_pipe, case))


def test_no_reference_attention_ignores_the_referencenet(E, tiny_pipe, case):
    with E.without_reference_attention():
        ablated = _gen(E, tiny_pipe, case)
    ref = tiny_pipe.reference_unet
    saved = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():  # another ReferenceNet: ignored under the ablation, read without it
        for p in ref.parameters():
            p.mul_(-1.5)
    try:
        with E.without_reference_attention():
            ablated_other = _gen(E, tiny_pipe, case)
        other = _gen(E, tiny_pipe, case)
    finally:
        ref.load_state_dict(saved)
    np.testing.assert_array_equal(ablated, ablated_other)
    assert not np.array_equal(other, _gen(E, tiny_pipe, case))


def test_eval_script_names_missing_weights(E, tmp_path, capsys):
    assert E.main(["--weights", str(tmp_path / "nowhere"), "--cases", "1"]) == 2
    assert re.search(r"toy animator folder .*nowhere does not exist; train it", capsys.readouterr().err)


def test_eval_script_writes_its_table_as_json(E, tiny_weights, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [
        "--weights",
        str(tiny_weights),
        "--cases",
        "1",
        "--frames",
        "2",
        "--steps",
        "1",
        "--json",
        str(out),
    ]
    assert E.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["cases"] == 1 and set(record["rows"]) == {"copy reference (baseline)", "toy animator"}
    # the baseline's PSNR from the formula: the reference image shown for every ground-truth frame
    case = E.make_cases(1, 2)[0]
    mse = ((case.truth.astype(np.float64) - case.reference[None].astype(np.float64)) ** 2).mean(
        axis=(1, 2, 3)
    )
    expected = np.mean(10 * np.log10(255.0**2 / mse))
    assert record["rows"]["copy reference (baseline)"]["psnr"] == pytest.approx(expected, abs=1e-3)
    printed = capsys.readouterr().out
    assert f"{record['rows']['toy animator']['psnr']:.3f}" in printed  # the file holds what was printed
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left


def test_eval_script_refuses_an_unwritable_json_path(E, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert E.main(["--cases", "1", "--json", str(tmp_path / "a_file" / "eval.json")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_sweeps_take_the_generation_settings_and_vary_one(E, tiny_pipe):
    cases = E.make_cases(1, 2)
    gen = {"steps": 1, "cfg": 3.5}  # what main passes to every variant
    by_steps = E.sweep_steps(tiny_pipe, cases, counts=(1, 2), **gen)
    by_cfg = E.sweep_cfg(tiny_pipe, cases, scales=(1.0, 3.5), **gen)
    assert sorted(by_steps) == [1, 2] and sorted(by_cfg) == [1.0, 3.5]
    # the same settings give the same row, whichever sweep made it
    assert by_steps[1]["psnr"] == pytest.approx(by_cfg[3.5]["psnr"], abs=1e-9)
    assert by_steps[1]["psnr"] != pytest.approx(by_steps[2]["psnr"], abs=1e-6)


def test_eval_script_case_seed_and_cfg_scales(E, tiny_weights, tmp_path, capsys):
    """--case-seed draws other held-out cases (a validation set); --cfg-scales sets the cfg sweep."""
    out = tmp_path / "val.json"
    argv = ["--weights", str(tiny_weights), "--cases", "1", "--frames", "2", "--steps", "1"]
    argv += ["--case-seed", "7", "--ablations", "cfg", "--cfg-scales", "1,2.5", "--json", str(out)]
    assert E.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["case_seed"] == 7
    assert set(record["rows"]) == {"copy reference (baseline)", "toy animator", "cfg 1", "cfg 2.5"}
    val, default = E.make_cases(1, 2, seed=7)[0], E.make_cases(1, 2)[0]
    assert not np.array_equal(val.truth, default.truth)
    mse = ((val.truth.astype(np.float64) - val.reference[None].astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    baseline = np.mean(10 * np.log10(255.0**2 / mse))  # the baseline was scored on the seed-7 case
    assert record["rows"]["copy reference (baseline)"]["psnr"] == pytest.approx(baseline, abs=1e-3)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        E.main(["--cfg-scales", "1,two", "--json", str(tmp_path / "bad.json")])
    assert "--cfg-scales must be a comma list of numbers" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
