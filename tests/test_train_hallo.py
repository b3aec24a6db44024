"""scripts/train_hallo.py on a tiny random animator (conftest's ``tiny_animator_weights``) and a micro random
wav2vec2: a smoke run that saves a loadable HalloPipeline, resume == uninterrupted bit for bit, the loss
falls on a tiny overfit case, only the intended parameters change, a foreign --out is refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import MICRO_W2V
from safetensors.torch import load_file
from transformers import Wav2Vec2Config, Wav2Vec2Model

import anim_lab
from anim_lab.pipelines import HalloPipeline, Pose2VideoPipeline
from anim_lab.unet import AUDIO_KEY

torch.set_num_threads(1)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def T():
    return anim_lab.load_script("train_hallo")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_animator_weights):
    folder = tmp_path_factory.mktemp("train_hallo")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**MICRO_W2V)).save_pretrained(folder / "w2v")
    return {"root": folder, "animator": tiny_animator_weights, "w2v": folder / "w2v"}


def argv(inputs, out, steps, *extra):
    return [
        "--out", str(out), "--wav2vec2", str(inputs["w2v"]), "--animator", str(inputs["animator"]),
        "--cache", str(inputs["root"] / "cache.safetensors"), "--size", "64", "--num-items", "1",
        "--clip-frames", "4", "--n-motion-frames", "2", "--batch-size", "2", "--max-steps", str(steps),
        "--checkpoint-every", "2", "--log-every", "1", "--image-tokens", "2", "--audio-tokens", "2",
        "--audio-hidden", "8", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run4(T, inputs):
    out = inputs["root"] / "run4"
    result = T.train(T.parse_args(argv(inputs, out, 4)))
    return out, result


def test_smoke_run_trains_and_saves_a_loadable_pipeline(run4):
    out, result = run4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "hallo", "train.log"]
    log = json.loads((out / "hallo" / "train_log.json").read_text())
    assert log["step"] == 4 and log["log"]["steps"] == [1, 2, 3, 4]
    assert all(np.isfinite(log["log"]["loss"]))
    pipe = HalloPipeline.from_pretrained(out / "hallo")
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = np.asarray(anim_lab.toy.render(anim_lab.toy.identity_from_seed(1), size=64)[0])
    lmk = anim_lab.toy.render(anim_lab.toy.identity_from_seed(1), size=64)[1]
    audio = (0.3 * rng.standard_normal(3200)).astype(np.float32)  # 0.2 s: 5 frames
    video = pipe(image, audio, landmarks=lmk, num_inference_steps=1, clip_length=4, height=64, width=64)
    assert video.frames.shape == (1, 5, 64, 64, 3) and np.isfinite(video.frames).all()


def test_resumed_run_equals_uninterrupted(T, inputs, run4):
    out = inputs["root"] / "run2+2"
    assert T.main(argv(inputs, out, 2)) == 0
    assert json.loads((out / "hallo" / "train_log.json").read_text())["step"] == 2
    assert T.main(argv(inputs, out, 4)) == 0  # resumes from out/checkpoint at step 2
    full = run4[0]
    for name in ("denoising_unet", "face_locator", "image_proj", "audio_proj"):
        a, b = load_file(out / "hallo" / name / WEIGHTS), load_file(full / "hallo" / name / WEIGHTS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [json.loads((f / "hallo" / "train_log.json").read_text())["log"] for f in (out, full)]
    assert logs[0]["loss"] == logs[1]["loss"]


def test_only_the_intended_parameters_change(inputs, run4):
    out = run4[0] / "hallo"
    animator = inputs["animator"]
    ref_before = load_file(animator / "reference_unet" / WEIGHTS)
    ref_after = load_file(out / "reference_unet" / WEIGHTS)
    assert ref_before.keys() == ref_after.keys() and all(
        torch.equal(ref_before[k], ref_after[k]) for k in ref_before
    )
    den_before, den_after = (
        load_file(animator / "denoising_unet" / WEIGHTS),
        load_file(out / "denoising_unet" / WEIGHTS),
    )
    audio_keys = {k for k in den_after if AUDIO_KEY in k}
    assert audio_keys and set(den_after) - audio_keys == set(den_before)
    assert all(torch.equal(den_before[k], den_after[k]) for k in den_before)  # 2D weights and motion modules
    vae_before, vae_after = load_file(animator / "vae" / WEIGHTS), load_file(out / "vae" / WEIGHTS)
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    enc_before = load_file(animator / "image_encoder" / "model.safetensors")
    enc_after = load_file(out / "image_encoder" / "model.safetensors")
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)
    # what was trained did change: the audio modules' zero-initialised output convs left zero
    convs = [k for k in audio_keys if "zero_conv" in k and k.endswith("weight")]
    assert convs and all(den_after[k].abs().max() > 0 for k in convs)
    state = anim_lab.files.load_state(run4[0] / "checkpoint" / "state.safetensors")
    trained = set(state["trainable"])
    assert trained and all(
        AUDIO_KEY in k or k.split(".")[0] in ("face_locator", "image_proj", "audio_proj") for k in trained
    )
    assert Pose2VideoPipeline  # the animator folder is the Pose2VideoPipeline the script starts from


def test_loss_falls_on_a_tiny_overfit_case(T, inputs):
    """30 steps on one clip: the mean loss over 6 fixed batches (their noise, timesteps and frames drawn
    from (seed, step)) falls clearly below the same batches' loss before training."""
    out = inputs["root"] / "overfit"
    args = T.parse_args(argv(inputs, out, 30, "--lr", "3e-3", "--warmup-steps", "1", "--uncond-ratio", "0"))
    result = T.train(args)
    trained = result["model"]
    animator = Pose2VideoPipeline.from_pretrained(inputs["animator"])
    w2v = Wav2Vec2Model.from_pretrained(inputs["w2v"])
    initial = T.build_networks(animator, w2v.config, args)
    T.init_image_proj(initial.image_proj, result["cache"]["embeds"])
    scheduler = T.T.training_scheduler()
    levels = len(initial.denoising_unet.down_blocks)

    def mean_loss(net):
        net.eval()
        with torch.no_grad():
            losses = [
                T.step_loss(net, T.add_masks(T.step_batch(result["cache"], 10_000 + s, args), 64, levels),
                            scheduler, args).item()
                for s in range(6)
            ]  # fmt: skip
        return float(np.mean(losses))

    before, after = mean_loss(initial), mean_loss(trained)
    print(f"overfit: mean loss {before:.4f} -> {after:.4f}")
    assert np.isfinite(before) and after < 0.8 * before, (before, after)


def test_foreign_out_is_refused_and_left_alone(T, inputs):
    out = inputs["root"] / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert T.main(argv(inputs, out, 2)) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_run_of_other_settings_is_not_resumed(T, inputs, run4, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(run4[0], out)
    assert T.main(argv(inputs, out, 6, "--image-tokens", "3")) == 2
