"""scripts/train_causal_vae.py (the 128-px v2 recipe) on the tiny causal VAE: the temporal term against a hand
computation, the discriminator judging frames, exact resume (N + N steps == 2N), the EMA that is saved, the
scaling factor written at the end, and the refusals (bad arguments before any work, foreign folders, a
planted pickle)."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_security import plant

import anim_lab
from anim_lab import toy
from anim_lab.causal_vae import CAUSAL_VAE_TINY


@pytest.fixture(scope="module")
def T():
    return anim_lab.load_script("train_causal_vae")


@pytest.fixture(scope="module")
def data():
    """Four 9-frame, 32-px training clips and two held-out ones (uint8 (N, F, H, W, 3))."""

    def clips(split, n):
        seeds = list(toy.identity_split(split))[:n]
        return torch.from_numpy(
            np.stack(
                [
                    toy.make_clip(toy.identity_from_seed(s), num_frames=9, size=32, seed=s).frames
                    for s in seeds
                ]
            )
        )

    return clips("train", 4), clips("test", 2)


def run(T, data, out, **kw):
    args = dict(
        out=out,
        minutes=1e6,
        max_steps=6,
        batch_size=2,
        window=5,
        crop=16,
        lr=1e-3,
        warmup_steps=2,
        eval_every_s=1e9,
        progress=False,
        data=data,
        init=None,
        config=CAUSAL_VAE_TINY,
        disc_start=2,
        adv_delay=1,
        disc_channels=8,
        disc_layers=1,
        ema_decay=0.9,
    )
    torch.manual_seed(1234)  # the fresh model's random weights (the run's own seed is set after)
    return T.train(**(args | kw))


def test_motion_loss_is_the_l1_of_frame_differences(T):
    g = torch.Generator().manual_seed(0)
    x, rec = torch.rand(2, 3, 5, 4, 4, generator=g), torch.rand(2, 3, 5, 4, 4, generator=g)
    by_hand = sum(
        ((rec[:, :, t] - rec[:, :, t - 1]) - (x[:, :, t] - x[:, :, t - 1])).abs().sum() for t in range(1, 5)
    ) / (2 * 3 * 4 * 4 * 4)
    torch.testing.assert_close(T.motion_loss(rec, x), by_hand)
    assert T.motion_loss(x + 0.25, x) < 1e-7  # a constant offset has the same motion (up to rounding)
    assert T.motion_loss(x[:, :, :1].expand_as(x), x) > 0  # a frozen clip does not


def test_discriminator_judges_each_frame(T):
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    f = T.frames(video)
    assert f.shape == (10, 3, 16, 16)
    assert torch.equal(f[7], video[1, :, 2])  # clip 1, frame 2


def test_windows_are_4k_plus_1_crops_of_the_clips(T, data):
    train, _ = data
    x = T.random_windows(train, 3, 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 5, 16, 16) and x.min() >= -1 and x.max() <= 1
    clips = T.to_video(train)  # (N, 3, 9, 32, 32)
    for w in x:  # each window is a crop of some clip (maybe flipped)
        found = any(
            torch.equal(cand, w) or torch.equal(cand.flip(-1), w)
            for c in clips
            for t in range(5)
            for y in range(17)
            for xx in range(17)
            for cand in [c[:, t : t + 5, y : y + 16, xx : xx + 16]]
        )
        assert found


def test_resume_gives_the_weights_of_an_uninterrupted_run(T, data, tmp_path):
    """3 steps, a checkpoint, 3 more steps == 6 steps at once, exactly: the VAE, its EMA, the discriminator,
    both Adam states. The discriminator (step 2) and the adversarial term (step 3) switch on, and the learning
    rate drops (step 5), across the boundary."""
    full = run(T, data, tmp_path / "a")
    part = run(T, data, tmp_path / "b", stop_at=3)
    assert part["steps"] == 3 and "scaling_factor" not in part
    with pytest.raises(T.TrainError, match="--resume"):  # a state is never overwritten by accident
        run(T, data, tmp_path / "b")
    torch.manual_seed(99)  # a resumed run does not depend on the caller's random state
    resumed = run(T, data, tmp_path / "b", resume=True)
    assert resumed["steps"] == 6 and resumed["resumed_at"] == [3]
    flat_a = load_file(tmp_path / "a" / T.STATE_FILE)
    flat_b = load_file(tmp_path / "b" / T.STATE_FILE)
    assert flat_a.keys() == flat_b.keys()
    assert any(k.startswith("/opt_d/") for k in flat_a) and any(k.startswith("/ema/") for k in flat_a)
    for k in flat_a:
        assert torch.equal(flat_a[k], flat_b[k]), k
    assert full["losses"] == resumed["losses"] and len(full["losses"]) == 6
    assert full["scaling_factor"] == resumed["scaling_factor"]
    # the weights moved: the run trained something (the first and last states differ)
    first = run(T, data, tmp_path / "c", stop_at=0, final=False)
    assert first["steps"] == 0
    w0 = load_file(tmp_path / "c" / T.STATE_FILE)
    moved = [k for k in w0 if k.startswith("/vae/") and not torch.equal(w0[k], flat_a[k])]
    assert len(moved) > 10
    assert all(not torch.equal(w0[k], flat_a[k]) for k in w0 if k.startswith("/disc/") and "weight" in k)
    with pytest.raises(T.TrainError, match="motion_weight: 1.0 -> 0.5"):  # other settings are refused
        run(T, data, tmp_path / "b", resume=True, motion_weight=0.5)


def test_the_saved_model_is_the_ema_with_its_scaling_factor(T, data, tmp_path):
    log = run(T, data, tmp_path / "v")
    state = T.read_state(tmp_path / "v" / T.STATE_FILE)
    saved = load_file(tmp_path / "v" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == state["ema"].keys()
    assert all(torch.equal(v, state["ema"][k]) for k, v in saved.items())
    assert any(not torch.equal(state["ema"][k], state["vae"][k]) for k in saved)  # the EMA lags the raw
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLHunyuanVideo"
    assert config["scaling_factor"] == log["scaling_factor"] != CAUSAL_VAE_TINY["scaling_factor"]
    # the factor is 1 / std of posterior samples of the training clips' latents, remeasured here
    vae = anim_lab.causal_vae.CausalVAE.from_pretrained(tmp_path / "v")
    again = T.measure_scaling_factor(vae, T.to_video(data[0]), seed=0)
    assert round(again, 6) == config["scaling_factor"]
    # --export-raw: the trained weights themselves, as a folder the evaluation loads
    T.main(["--out", str(tmp_path / "v"), "--export-raw", str(tmp_path / "raw")])
    raw = load_file(tmp_path / "raw" / "diffusion_pytorch_model.safetensors")
    assert raw.keys() == state["vae"].keys() and all(torch.equal(v, state["vae"][k]) for k, v in raw.items())
    assert json.loads((tmp_path / "raw" / "config.json").read_text()) == config
    with pytest.raises(SystemExit, match="holds the input --out"):  # never into the run's own folder
        T.main(["--out", str(tmp_path / "v"), "--export-raw", str(tmp_path)])
    curve = log["curve"]
    assert [c["step"] for c in curve] == [0, 6]
    assert set(curve[-1]) >= {"psnr", "sharpness", "ssim", "motion", "raw"}


def test_motion_ratio_is_one_for_the_truth_and_zero_for_a_still(T):
    video = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    assert T.motion_ratio(video, video) == pytest.approx(1.0)
    assert T.motion_ratio(video[:, :, :1].expand_as(video), video) == 0.0
    assert T.motion_ratio(video / 2, video) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(window=8), "--window must be 4k \\+ 1"),
        (dict(crop=12), "--crop"),
        (dict(max_steps=0), "--max-steps"),
        (dict(ema_decay=1.0), "--ema-decay"),
        (dict(motion_weight=-1.0), "--motion-weight"),
        (dict(window=13), "shorter than --window 13"),  # the 9-frame clips
        (dict(resume=True), "holds no train_state"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(T, data, tmp_path, kw, message):
    with pytest.raises(T.TrainError, match=message):
        run(T, data, tmp_path / "vae", **kw)
    assert not (tmp_path / "vae").exists()


def test_the_cli_refuses_bad_arguments_before_rendering(T, tmp_path, capsys):
    out = tmp_path / "vae"
    with pytest.raises(SystemExit, match="--window must be 4k"):
        T.main(["--out", str(out), "--window", "10"])
    with pytest.raises(SystemExit, match="--crop must be at most"):
        T.main(["--out", str(out), "--crop", "256"])
    with pytest.raises(SystemExit, match="--init: "):  # a folder that is no causal VAE
        T.main(["--out", str(out), "--init", str(tmp_path)])
    assert not out.exists()


def test_foreign_folders_and_pickles_are_refused(T, data, tmp_path):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(T.TrainError, match="holds files this program did not write: notes.txt"):
        run(T, data, out, max_steps=1)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    run(T, data, out, max_steps=2, final=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(T.OWN_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no staging folder left beside it
    with pytest.raises(T.TrainError, match="holds the input --init"):
        run(T, data, out, max_steps=1, init=out, restart=True)
    (out / T.STATE_FILE).write_bytes(pickle.dumps({"step": 3}))  # a pickle under the state's name
    with pytest.raises(T.TrainError, match="not a training state"):
        run(T, data, out, resume=True)
    marker = tmp_path / "PWNED"
    plant(out / T.STATE_FILE, marker)  # a torch.save archive whose pickle would run a payload
    with pytest.raises(T.TrainError, match="not a training state"):
        run(T, data, out, resume=True)
    assert not marker.exists(), "the planted pickle ran"
