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


# --- the eval script's metrics (anim_lab.metrics has their own tests) ----------------------------------
def test_metrics_of_the_ground_truth_itself(E):
    """Ground truth against itself: infinite PSNR aside, SSIM 1, identity 100%, mediapipe finds every face
    within a few pixels (toy-world-findings §7: 1.77 px on renders), no extra flicker."""
    cases = E.make_cases(2, 3)
    truths = [c.truth for c in cases]
    probe = E.IdentityProbe()
    assert E.identity_top1(truths, cases, probe) == 1.0
    gallery = E.make_cases(4, 3)  # the two cases and two more identities
    assert [g.identity for g in gallery[:2]] == [c.identity for c in cases]
    assert E.identity_top1(truths, cases, probe, gallery) == 1.0
    swapped = [truths[1], truths[0]]  # each video shows the other identity: no hit
    assert E.identity_top1(swapped, cases, probe, gallery) == 0.0
    with E.FaceLandmarker() as landmarker:
        errors = E.pose_errors(truths[0], cases[0].landmarks, landmarker)
    assert all(e is not None and e < 4.0 for e in errors)
    row = E.score(truths, cases, probe)
    assert row["ssim"] == pytest.approx(1.0) and row["flicker"] == 0.0 and row["detect"] == 1.0
    noisy = np.clip(truths[0].astype(int) + 8, 0, 255).astype(np.uint8)  # (3, H, W, 3)
    mse = ((noisy / 127.5 - truths[0] / 127.5) ** 2).reshape(3, -1).mean(1)  # per frame, [-1, 1] units
    row = E.score([noisy], cases[:1], probe)
    assert row["psnr"] == pytest.approx(np.mean(10 * np.log10(4 / mse)), rel=1e-5)


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


def test_eval_ablations_are_the_pipeline_switches(E, tiny_pipe, case):
    runs = {}
    for name, switch in E.ABLATIONS.items():
        runs[name] = E.generate(tiny_pipe, case, steps=2, cfg=2.0, **switch)
        explicit = tiny_pipe(
            case.reference,
            list(case.poses),
            num_inference_steps=2,
            guidance_scale=2.0,
            generator=torch.Generator("cpu").manual_seed(42),
            output_type="np",
            context_frames=16,
            context_overlap=4,
            **switch,
        ).frames[0]
        np.testing.assert_array_equal(runs[name], (explicit * 255).round().astype(np.uint8))
    assert set(E.ABLATIONS) == {"no reference attention", "no pose guider", "no motion modules"}
    full = _gen(E, tiny_pipe, case)
    assert all(not np.array_equal(video, full) for video in runs.values())


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
    rows = {"VAE reconstruction (ceiling)", "copy reference (baseline)", "toy animator"}
    assert record["cases"] == 1 and set(record["rows"]) == rows
    assert record["environment"]["cpu_count"] >= 1 and "torch" in record["environment"]["versions"]
    # the baseline's PSNR from the formula: the reference image shown for every ground-truth frame
    case = E.make_cases(1, 2)[0]
    mse = ((case.truth.astype(np.float64) - case.reference[None].astype(np.float64)) ** 2).mean(
        axis=(1, 2, 3)
    )
    expected = np.mean(10 * np.log10(255.0**2 / mse))
    assert record["rows"]["copy reference (baseline)"]["psnr"] == pytest.approx(expected, abs=1e-3)
    printed = capsys.readouterr().out
    assert f"{record['rows']['toy animator']['psnr']:.2f}" in printed  # the file holds what was printed
    # the ceiling: the ground truth through the animator's VAE, by hand (posterior mean, scaled, decoded)
    vae = load_animator(tiny_weights).vae
    with torch.no_grad():
        x = torch.from_numpy(case.truth).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        y = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    rec = ((y + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    mse = ((rec - case.truth.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    ceiling = record["rows"]["VAE reconstruction (ceiling)"]["psnr"]
    assert ceiling == pytest.approx(np.mean(10 * np.log10(255.0**2 / mse)), abs=1e-3)
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
    assert set(record["rows"]) - {"VAE reconstruction (ceiling)", "copy reference (baseline)"} == {
        "toy animator",
        "cfg 1",
        "cfg 2.5",
    }
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


def test_bf16_cost_is_the_pipeline_under_autocast_against_fp32(E, tiny_pipe, case):
    """The bf16 row's videos are the pipeline's call under torch.autocast(bfloat16); its distance to fp32 is
    the PSNR between the two videos (finite: bf16 changes the numbers; not tiny: it is not fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = tiny_pipe(
            case.reference,
            list(case.poses),
            num_inference_steps=2,
            guidance_scale=2.0,
            generator=torch.Generator("cpu").manual_seed(42),
            output_type="np",
            context_frames=16,
            context_overlap=4,
        ).frames[0]
    bf16 = E.generate(tiny_pipe, case, steps=2, cfg=2.0, autocast=torch.bfloat16)
    np.testing.assert_array_equal(bf16, (explicit * 255).round().astype(np.uint8))
    fp32 = _gen(E, tiny_pipe, case)
    assert not np.array_equal(bf16, fp32)
    row, against = E.bf16_cost(tiny_pipe, [case], steps=2, cfg=2.0)
    expected = E.M.psnr(E.M.video_from_uint8(bf16), E.M.video_from_uint8(fp32)).mean().item()
    assert against["psnr"] == pytest.approx(expected) and 10 < against["psnr"] < 100
    assert set(row) >= {"psnr", "sharpness", "kid", "id_top1"}
