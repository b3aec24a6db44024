"""scripts/train_animator.py: the loss against a written-out v-prediction / min-SNR loss, accelerate on two
processes against one process on the combined batch, resume against an uninterrupted run, bad input."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anim_lab import configs
from anim_lab.landmarks import draw_pose_image
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.plain import randomize

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_animator.py"

# A tiny animator: two UNet levels, a pose guider 8x down (as the VAE), motion modules at both levels.
TINY = {
    "unet": dict(
        configs.TOY.get("unet"),
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[8, 16],
        attention_head_dim=2,
        norm_num_groups=4,
    ),
    "pose_guider": dict(
        conditioning_channels=3, block_out_channels=[4, 8, 8, 8], conditioning_embedding_channels=8
    ),
    "motion": dict(
        configs.TOY.get("motion"), num_attention_heads=2, norm_num_groups=4, motion_module_resolutions=[1, 2]
    ),
}


@pytest.fixture(scope="module")
def T():
    spec = importlib.util.spec_from_file_location("train_animator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory, T):
    """The tiny model config and a pre-encoded cache of 4 clips x 2 frames (stage 1's fps)."""
    folder = tmp_path_factory.mktemp("train_animator")
    (folder / "tiny.json").write_text(json.dumps(TINY))
    T.build_cache(folder / "cache.safetensors", num_items=4, num_frames=2, fps=2.0, seed=0)
    return folder


@pytest.fixture(scope="module")
def runs(T, files, tmp_path_factory):
    """Stage-1 runs of 2 steps (with its step-2 checkpoint) and of 4 steps, made once: the tests that start
    from them or compare with them take a copy (``shutil.copytree(runs / "steps2", ...)``)."""
    root = tmp_path_factory.mktemp("runs")
    for steps in (2, 4):
        assert T.main(_args(files, root / f"steps{steps}", steps)) == 0
    return root


def _args(files, out, steps, *extra):
    return [
        "--stage", "1", "--out", str(out), "--model-config", str(files / "tiny.json"), "--cache",
        str(files / "cache.safetensors"), "--num-items", "4", "--num-frames", "2", "--max-steps", str(steps),
        "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "2", "--no-progress", *extra,
    ]  # fmt: skip


def _state(folder: Path) -> dict:
    return {
        f"{name}.{k}": v
        for name in ("reference_unet", "denoising_unet", "pose_guider")
        for k, v in load_file(folder / name / "diffusion_pytorch_model.safetensors").items()
    }


# --- the loss ---------------------------------------------------------------------------------------------
def _alphas_cumprod_zero_snr() -> torch.Tensor:
    """scaled_linear betas 0.00085..0.012 over 1000 steps, rescaled to zero terminal SNR (Lin et al. 2023,
    Algorithm 1): sqrt(alpha_bar) shifted so the last is 0 and scaled so the first is unchanged."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return (root**2).float()


def test_loss_equals_the_written_out_v_prediction_min_snr_loss(T, files):
    cache = T.files.load_state(files / "cache.safetensors")
    torch.manual_seed(0)
    animator = T.Animator(TINY, stage=1)
    randomize(animator, 1)
    batch = T.step_batch(cache, 1, step=3, seed=0, batch_size=4, uncond_ratio=0.1)
    batch["timesteps"] = torch.tensor([0, 999, 250, 600])  # both ends: SNR 0 at t = 999
    scheduler = T.training_scheduler()
    loss = T.train_step_loss(animator, batch, scheduler, noise_offset=0.05, snr_gamma=5.0)

    # written out: noise offset, x_t, v target, min-SNR weights (snr + 1 for v-prediction), batch mean
    a = _alphas_cumprod_zero_snr()[batch["timesteps"]].view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    x0 = batch["latents"]
    noise = batch["noise"] + 0.05 * batch["offset"]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    snr = a.flatten() / (1 - a.flatten())
    weights = torch.minimum(snr + 1, torch.tensor(5.0)) / (snr + 1)
    poses = np.stack([[draw_pose_image(lm.numpy(), 128, 128) for lm in clip] for clip in batch["landmarks"]])
    poses = torch.from_numpy(poses).permute(0, 4, 1, 2, 3).float() / 255  # (B, F, H, W, 3) -> (B, 3, F, H, W)
    pred = animator(noisy, batch["timesteps"], batch["tokens"], batch["ref_latents"], poses, batch["uncond"])
    expected = (((pred - v) ** 2).mean(dim=(1, 2, 3, 4)) * weights).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert weights[1] == 1.0 and weights[0] < 0.01  # t = 999: SNR 0 -> weight 1; t = 0: large SNR -> small


def test_condition_dropout_zeroes_the_clip_pixels_and_skips_the_referencenet(T, files):
    cache = T.files.load_state(files / "cache.safetensors")
    draws = [T.step_batch(cache, 1, s, 0, 4, 0.1)["uncond"] for s in range(2000)]
    assert 0.08 < np.mean(draws) < 0.12  # one coin per step, p = 0.1
    step = draws.index(True)
    batch = T.step_batch(cache, 1, step, 0, 4, 0.1)
    from anim_lab.clip import load_image_encoder

    encoder = load_image_encoder(T.ANIMATOR_ENCODER_DIR)  # the encoder the cache was built with
    with torch.no_grad():
        zero_pixels = encoder(pixel_values=torch.zeros(1, 3, 96, 96)).image_embeds  # (1, D)
    torch.testing.assert_close(batch["tokens"], zero_pixels[:, None].expand(4, 1, -1))
    assert zero_pixels.abs().sum() > 0  # not zero tokens: image_encoder(0), as the reference trains
    # the dropped step runs no ReferenceNet: a ReferenceNet that would fail is never called
    animator = T.Animator(TINY, stage=1)
    animator.reference_unet.forward = None
    poses = T.pose_batch(batch["landmarks"])
    out = animator(batch["latents"], batch["timesteps"], batch["tokens"], batch["ref_latents"], poses, True)
    assert out.shape == batch["latents"].shape


def test_stage2_trains_the_motion_modules_only(T):
    animator = T.Animator(TINY, stage=2)
    trainable2 = {id(p) for p in animator.set_trainable()}
    trainable = {n for n, p in animator.named_parameters() if id(p) in trainable2}
    assert trainable and all("motion_modules" in n for n in trainable)
    assert {n for n, _ in animator.named_parameters() if "motion_modules" in n} == trainable
    stage1 = T.Animator(TINY, stage=1)
    trainable1 = {id(p) for p in stage1.set_trainable()}  # once: it walks the whole model
    names = {n for n, p in stage1.named_parameters() if id(p) in trainable1}
    assert not any(n.startswith("reference_unet.up_blocks.1") for n in names)  # the last up block: frozen
    assert any(n.startswith("pose_guider") for n in names) and any(
        n.startswith("denoising_unet") for n in names
    )


# --- accelerate, resume ----------------------------------------------------------------------------------
def _run(cmd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_equal_one_process_on_the_combined_batch(T, files, tmp_path):
    """3 steps under ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (2 gloo processes, 2
    samples each) against 1 process on the 4-sample batch; seed 1 makes step 1 unconditional (no ReferenceNet:
    unused parameters in DDP). (accelerate 1.15's ``--cpu`` flag starts one process unless given an MPI
    hostfile; the script selects the CPU itself when there is no GPU.)"""
    extra = ["--seed", "1", "--uncond-ratio", "0.5"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _run(
        [
            *launcher,
            str(SCRIPT),
            *_args(files, tmp_path / "two", 3, "--rank-weights", str(tmp_path / "w2"), *extra),
        ]
    )
    # the one process in this one: the same script, without a second interpreter start
    assert T.main(_args(files, tmp_path / "one", 3, "--rank-weights", str(tmp_path / "w1"), *extra)) == 0
    r0, r1 = (
        load_file(tmp_path / "w2" / "rank0.safetensors"),
        load_file(tmp_path / "w2" / "rank1.safetensors"),
    )
    single = load_file(tmp_path / "w1" / "rank0.safetensors")
    start = _initial(tmp_path)
    assert r0.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)  # both processes: identical weights
        torch.testing.assert_close(r0[k], single[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # not vacuous: every trained weight moved, and the frozen last up block of the ReferenceNet did not. The
    # zero-initialised norm2 biases (the LayerNorm before attn2) may stay: with ONE CLIP token softmax is 1
    # whatever the query, so attn2's query path gets a zero gradient (up to rounding, which Adam may amplify)
    frozen = {k for k in single if k.startswith("reference_unet.up_blocks.1.")}
    no_grad = {k for k in single if k.endswith("transformer_blocks.0.norm2.bias")}
    moved = {k for k in single if not torch.equal(single[k], start[k])}
    assert frozen and not moved & frozen and moved >= set(single) - frozen - no_grad
    log = json.loads((tmp_path / "two" / "toy_animator" / "train_log.json").read_text())
    assert log["processes"] == 2 and log["step"] == 3


def _initial(tmp_path) -> dict:
    """The weights the runs started from (seed 1, TINY), to check that training changed them."""
    spec = importlib.util.spec_from_file_location("train_animator_init", SCRIPT)
    T = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(T)
    torch.manual_seed(1)
    animator = T.Animator(TINY, stage=1)
    T.init_stage1(animator)
    return animator.state_dict()


def test_resume_equals_an_uninterrupted_run(T, files, runs, tmp_path):
    shutil.copytree(runs / "steps4", tmp_path / "straight")
    shutil.copytree(runs / "steps2", tmp_path / "resumed")
    assert T.main(_args(files, tmp_path / "resumed", 4)) == 0  # picks up the checkpoint at step 2
    a, b = _state(tmp_path / "straight" / "toy_animator"), _state(tmp_path / "resumed" / "toy_animator")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log_a = json.loads((tmp_path / "straight" / "toy_animator" / "train_log.json").read_text())
    log_b = json.loads((tmp_path / "resumed" / "toy_animator" / "train_log.json").read_text())
    assert log_a["log"]["loss"] == pytest.approx(log_b["log"]["loss"], abs=1e-5)
    assert log_a["log"]["steps"] == log_b["log"]["steps"] == [1, 2, 3, 4]
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()


def test_stage1_continues_from_written_weights_at_their_step(T, files, runs, tmp_path):
    """--init-from W --start-step 2: the weights are W's, and the draws go on from step 2, so the first loss
    of the continuation is the loss an uninterrupted run logged at step 3 (before its own update)."""
    shutil.copytree(runs / "steps4", tmp_path / "straight")
    shutil.copytree(runs / "steps2", tmp_path / "first")
    weights = tmp_path / "first" / "toy_animator"
    extra = ["--init-from", str(weights), "--start-step", "2", "--min-lr-ratio", "0.5"]
    assert T.main(_args(files, tmp_path / "more", 4, *extra)) == 0
    straight = json.loads((tmp_path / "straight" / "toy_animator" / "train_log.json").read_text())
    more = json.loads((tmp_path / "more" / "toy_animator" / "train_log.json").read_text())
    assert more["log"]["steps"] == [3, 4]
    assert more["log"]["loss"][0] == pytest.approx(straight["log"]["loss"][2], abs=1e-5)
    assert more["earlier"]["step"] == 2 and more["earlier"]["log"]["steps"] == [1, 2]  # the chain is kept
    # the frozen image encoder travels with the weights, tensor for tensor, in a standard pipeline folder
    folder = tmp_path / "more" / "toy_animator"
    copied, frozen = (
        load_file(f / "model.safetensors") for f in (folder / "image_encoder", T.ANIMATOR_ENCODER_DIR)
    )
    assert copied.keys() == frozen.keys() and all(torch.equal(copied[k], frozen[k]) for k in frozen)
    pipe = Pose2VideoPipeline.from_pretrained(folder)  # diffusers' own loading
    assert (
        type(pipe.denoising_unet).__name__ == "VideoUNet" and pipe.denoising_unet.has_motion_modules is False
    )


def test_learning_rate_warm_up_and_cosine_against_the_formula(T):
    args = T.parse_args(["--stage", "1", "--out", "x", "--max-steps", "100", "--warmup-steps", "10"])
    args.start_step, args.min_lr_ratio = 20, 0.1
    for step in (20, 25, 29, 30, 60, 99, 100):
        done = step - 20
        cosine = 0.5 * (1 + np.cos(np.pi * done / 80))
        expected = min(1.0, (done + 1) / 10) * (0.1 + 0.9 * cosine)
        assert T.lr_factor(step, args) == pytest.approx(expected, rel=1e-12)
    args.min_lr_ratio = 1.0  # the default: constant after the warm-up
    assert T.lr_factor(90, args) == 1.0


# --- bad input --------------------------------------------------------------------------------------------
def test_unwritable_output_folder_fails_before_any_work(T, files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert T.main(_args(files, blocker / "run", 2)) == 2
    assert "a_file is a file, not a folder; choose another --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--start-step", "5"], "--start-step continues a stage-1 run"),
        (["--min-lr-ratio", "0"], r"--min-lr-ratio must be in \(0, 1\]"),
        (["--image-encoder", "nowhere"], "--image-encoder nowhere has no model.safetensors"),
        (["--ema-decay", "1"], r"--ema-decay must be in \[0, 1\)"),
    ],
)
def test_bad_continuation_arguments_are_named(T, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        T.parse_args(["--stage", "1", "--out", str(tmp_path / "run"), *argv])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_stage2_names_missing_and_mismatched_weights(T, files, tmp_path):
    stage2 = ["--stage", "2", "--out", str(tmp_path / "s2"), "--model-config", str(files / "tiny.json")]
    with pytest.raises(T.TrainError, match=r"reference_unet/diffusion_pytorch_model.safetensors is missing"):
        T.train(T.parse_args([*stage2, "--init-from", str(tmp_path / "nowhere")]))
    # stage-1 weights of a wider model: the keys whose shapes differ are named
    wider = dict(TINY, unet=dict(TINY["unet"], block_out_channels=[8, 24]))
    T.write_weights(T.Animator(wider, stage=1), tmp_path / "wider")
    with pytest.raises(T.TrainError, match=r"(?s)does not fit the model.*down_blocks\.1"):
        T.train(T.parse_args([*stage2, "--init-from", str(tmp_path / "wider")]))
    assert not (tmp_path / "s2").exists()  # nothing written


def test_resume_refuses_a_checkpoint_of_another_config(T, files, runs, tmp_path):
    shutil.copytree(runs / "steps2", tmp_path / "run")
    before = _state(tmp_path / "run" / "checkpoint")
    other = dict(TINY, pose_guider=dict(TINY["pose_guider"], block_out_channels=[4, 8, 16, 8]))
    (tmp_path / "other.json").write_text(json.dumps(other))
    args = _args(files, tmp_path / "run", 4)
    args[args.index("--model-config") + 1] = str(tmp_path / "other.json")
    with pytest.raises(T.TrainError, match="another model config"):
        T.train(T.parse_args(args))
    after = _state(tmp_path / "run" / "checkpoint")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the checkpoint is untouched
    shutil.rmtree(tmp_path / "run")


def test_stage2_moves_the_motion_modules_and_nothing_else(T, files, runs, tmp_path):
    shutil.copytree(runs / "steps2", tmp_path / "s1")
    stage2 = ["--stage", "2", "--out", str(tmp_path / "s2"), "--model-config", str(files / "tiny.json")]
    stage2 += ["--init-from", str(tmp_path / "s1" / "toy_animator"), "--cache", str(tmp_path / "clips.pt")]
    stage2 += [
        "--num-items",
        "2",
        "--num-frames",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    assert T.main(stage2) == 0
    before, after = _state(tmp_path / "s1" / "toy_animator"), _state(tmp_path / "s2" / "toy_animator")
    motion = {k for k in after if "motion_modules" in k}
    assert motion and set(after) - motion == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # everything else frozen, bit for bit
    # proj_out starts at zero (AnimateDiff) and is trained: it moved
    assert all(after[k].abs().sum() > 0 for k in motion if "proj_out" in k)
    log = json.loads((tmp_path / "s2" / "toy_animator" / "train_log.json").read_text())
    assert log["stage"] == 2 and log["data"]["num_frames"] == 4


def test_the_chain_stage2_to_stage1_to_stage2_with_motion_from(T, files, runs, tmp_path):
    """Stage 1 may continue from a stage-2 folder (its motion modules are dropped: stage 1 has none), and
    stage 2 on the new weights may start its motion modules from the earlier stage-2 run's (--motion-from)."""
    shutil.copytree(runs / "steps2", tmp_path / "s1")
    clips = [
        "--cache",
        str(tmp_path / "clips.pt"),
        "--num-items",
        "2",
        "--num-frames",
        "4",
        "--batch-size",
        "1",
    ]
    stage2 = ["--stage", "2", "--model-config", str(files / "tiny.json"), *clips, "--no-progress"]
    s2 = [*stage2, "--out", str(tmp_path / "s2"), "--init-from", str(tmp_path / "s1" / "toy_animator")]
    assert T.main([*s2, "--max-steps", "2"]) == 0
    first = _state(tmp_path / "s2" / "toy_animator")
    motion = {k for k in first if "motion_modules" in k}
    # stage 1 again, from the stage-2 folder
    more = ["--init-from", str(tmp_path / "s2" / "toy_animator"), "--start-step", "2"]
    assert T.main(_args(files, tmp_path / "s1b", 4, *more)) == 0
    again = _state(tmp_path / "s1b" / "toy_animator")
    assert set(again) == set(first) - motion
    assert any(not torch.equal(again[k], first[k]) for k in again)  # stage 1 trained
    # the motion modules of the first stage-2 run, loaded onto the retrained stage-1 weights
    animator = T.Animator(TINY, stage=2)
    T.load_weights(animator, tmp_path / "s1b" / "toy_animator", ignore_missing=("motion_modules",))
    T.load_motion_modules(animator, tmp_path / "s2" / "toy_animator")
    state = {f"denoising_unet.{k}": v for k, v in animator.denoising_unet.state_dict().items()}
    assert all(torch.equal(state[k], first[k]) for k in motion)
    assert all(torch.equal(state[k], again[k]) for k in state if k not in motion)
    # and through the command line: the run starts from those motion modules (its first loss is not the
    # zero-init run's)
    s2b = [*stage2, "--init-from", str(tmp_path / "s1b" / "toy_animator"), "--max-steps", "1"]
    assert T.main([*s2b, "--out", str(tmp_path / "fresh")]) == 0
    assert (
        T.main(
            [*s2b, "--out", str(tmp_path / "warm"), "--motion-from", str(tmp_path / "s2" / "toy_animator")]
        )
        == 0
    )
    fresh, warm = (
        json.loads((tmp_path / n / "toy_animator" / "train_log.json").read_text()) for n in ("fresh", "warm")
    )
    assert fresh["log"]["loss"][0] != pytest.approx(warm["log"]["loss"][0], abs=1e-6)


def test_motion_from_is_named_when_wrong(T, files, runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--stage", "1", "--out", str(tmp_path / "run"), "--motion-from", str(tmp_path)])
    assert "--motion-from is for stage 2" in capsys.readouterr().err
    shutil.copytree(runs / "steps2", tmp_path / "s1")
    animator = T.Animator(TINY, stage=2)
    with pytest.raises(T.TrainError, match="holds no motion modules"):
        T.load_motion_modules(animator, tmp_path / "s1" / "toy_animator")
    with pytest.raises(T.TrainError, match=r"denoising_unet/diffusion_pytorch_model.safetensors is missing"):
        T.load_motion_modules(animator, tmp_path / "nowhere")


def test_the_cache_is_rebuilt_for_another_vae(T, tmp_path):
    """Latents of one VAE are meaningless to a model of another: a cache records the VAE's digest, and a
    cache built with another VAE is rebuilt, not reused."""
    from anim_lab.plain import randomize
    from anim_lab.vae import TOY_VAE_DIR, load_vae

    other = tmp_path / "other_vae"  # another VAE of the same shape: the toy VAE's weights redrawn
    randomize(load_vae(TOY_VAE_DIR), seed=1).save_pretrained(other)
    path = tmp_path / "cache.safetensors"
    args = dict(num_items=1, num_frames=2, fps=2.0, seed=0)
    old = T.build_cache(path, **args, vae_dir=other)
    again = T.load_cache(path, **args, vae_dir=other)
    assert torch.equal(again["latents"], old["latents"])  # reused
    new = T.load_cache(path, **args, vae_dir=TOY_VAE_DIR)  # another VAE: rebuilt
    assert new["meta"]["vae_sha256"] != old["meta"]["vae_sha256"]
    assert not torch.allclose(new["latents"], old["latents"])


def test_bf16_autocast_trains_close_to_fp32(T, files, runs, tmp_path):
    """--mixed-precision bf16: the same 4 steps under autocast give a loss curve near fp32's (bf16 keeps 8
    bits of mantissa, so not equal) and the setting is recorded in the log."""
    # its own process: accelerate's state (the precision) is fixed once per process
    _run([sys.executable, str(SCRIPT), *_args(files, tmp_path / "bf16", 4, "--mixed-precision", "bf16")])
    bf16 = json.loads((tmp_path / "bf16" / "toy_animator" / "train_log.json").read_text())
    fp32 = json.loads((runs / "steps4" / "toy_animator" / "train_log.json").read_text())
    assert bf16["mixed_precision"] == "bf16" and fp32["mixed_precision"] == "no"
    np.testing.assert_allclose(bf16["log"]["loss"], fp32["log"]["loss"], rtol=0.05)
    assert bf16["log"]["loss"] != fp32["log"]["loss"]  # autocast really ran in bf16


def test_ema_weights_follow_the_written_out_average_across_resumes(T, files, tmp_path):
    """--ema-decay 0.5, run one step at a time (each a resume): toy_animator/ holds e_k = d_k e_(k-1) +
    (1 - d_k) w_k over the raw weights w_k of checkpoint/, with diffusers' warm-up d_k = min(0.5, k / (9 + k))
    (d_1 = 0: the average starts at the first update); frozen weights are the raw ones."""
    out, raw, ema = tmp_path / "ema", [], None
    for k in range(1, 5):
        assert T.main(_args(files, out, k, "--ema-decay", "0.5", "--checkpoint-every", "1")) == 0
        w = _state(out / "checkpoint")
        d = 0.0 if k == 1 else min(0.5, k / (9 + k))
        ema = dict(w) if ema is None else {n: d * ema[n] + (1 - d) * w[n] for n in w}
        raw.append(w)
    got = _state(out / "toy_animator")
    frozen = [n for n in got if n.startswith("reference_unet.up_blocks.1.")]  # the last up block: frozen
    assert frozen and all(torch.equal(got[n], raw[-1][n]) for n in frozen)
    moved = [n for n in got if not torch.equal(raw[-1][n], raw[0][n])]
    assert len(moved) > len(got) // 2  # the average is over weights that moved
    for n in got:
        torch.testing.assert_close(got[n], ema[n], rtol=0, atol=1e-6)
    assert any(not torch.allclose(got[n], raw[-1][n]) for n in moved)  # not the raw weights
    log = json.loads((out / "toy_animator" / "train_log.json").read_text())
    assert log["ema_decay"] == 0.5 and log["log"]["steps"] == [1, 2, 3, 4]


def test_resume_refuses_to_switch_the_ema_on(T, files, runs, tmp_path, capsys):
    shutil.copytree(runs / "steps2", tmp_path / "run")
    assert T.main(_args(files, tmp_path / "run", 4, "--ema-decay", "0.9")) == 2
    assert "EMA setting" in capsys.readouterr().err
