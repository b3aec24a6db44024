"""scripts/train_toy_vae.py's v2 recipe on a tiny VAE built in code: the loss terms, the discriminator's
switch-on, the adaptive weight against a hand computation, exact resume, and the output-folder rules (a
foreign or pickled file is refused and never loaded)."""

import json
import math
import os
import pickle
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

import anim_lab

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


def _load(name):
    return anim_lab.load_script(name)  # the scripts' own functions, as chapters and other tests load them


@pytest.fixture(scope="module")
def T():
    return _load("train_toy_vae")


@pytest.fixture(scope="module")
def data(T):
    stills = T.render_stills("train", 8, seed=0, size=32)["images"]  # (8, 32, 32, 3) uint8
    return stills, stills[:2]


def tiny_perceptual(T):
    torch.manual_seed(1)
    cfg = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return T.ClipPerceptual(CLIPVisionModel(cfg), (0.5, 0.4, 0.3), (0.25, 0.3, 0.2))


def run(T, data, out, **kw):
    args = dict(
        out=out,
        minutes=1e6,
        max_steps=6,
        batch_size=2,
        crop=16,
        lr=1e-3,
        warmup_steps=2,
        eval_every_s=1e9,
        progress=False,
        data=data,
        config=TINY_VAE,
        perceptual=tiny_perceptual(T),
        perceptual_weight=1.0,
        disc_start=2,
        disc_channels=8,
        disc_layers=1,
        n_eval=2,
        ema_decay=0.9,
    )
    return T.train(**(args | kw))


def test_terms_finite_and_discriminator_switches_on_at_warm_up(T, data, tmp_path):
    log = run(T, data, tmp_path / "vae", max_steps=4)
    assert log["d_losses"][:2] == [None, None]  # off before disc_start
    assert all(math.isfinite(v) for v in log["d_losses"][2:]) and len(log["d_losses"]) == 4
    assert all(math.isfinite(v) for v in log["losses"])
    assert math.isfinite(log["scaling_factor"]) and log["scaling_factor"] > 0
    # the generator terms on a batch, one by one
    torch.manual_seed(0)
    vae = T.AutoencoderKL(**TINY_VAE)
    x = T.random_crops(torch.as_tensor(data[0]), 2, 16, torch.Generator().manual_seed(0))
    t = T.generator_terms(vae, x, torch.Generator().manual_seed(0), tiny_perceptual(T), 1.0)
    for name in ("l1", "perceptual", "rec_loss", "kl"):
        assert torch.isfinite(t[name]) and t[name] > 0, name
    assert t["rec_loss"].item() == pytest.approx((t["l1"] + t["perceptual"]).item())
    assert (
        T.hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -3.0)) == 0
    )  # both beyond margin
    assert T.hinge_d_loss(torch.zeros(1, 1), torch.zeros(1, 1)) == pytest.approx(1.0)


def test_adversarial_term_can_wait_for_the_discriminator(T, data, tmp_path):
    """adv_delay=1: at step 2 the discriminator trains but the decoder's loss is still that of a run without
    a GAN; from step 3 the adversarial term is in it."""
    with_gan = run(T, data, None, max_steps=4, adv_delay=1, final=False)
    without = run(T, data, None, max_steps=4, disc_weight=0.0, final=False)
    assert with_gan["d_losses"][:2] == [None, None] and with_gan["d_losses"][2] is not None
    assert with_gan["losses"][:3] == without["losses"][:3]
    assert with_gan["losses"][3] != without["losses"][3]


def test_ema_of_the_weights(T, data, tmp_path):
    """Two steps with decay 0.9: ema = 0.81 init + 0.09 w1 + 0.1 w2 (w_k the weights after step k)."""
    run(T, data, tmp_path / "one", max_steps=1, final=False)
    run(T, data, tmp_path / "two", max_steps=2, final=False)
    w1, s2 = T.read_state(tmp_path / "one" / T.STATE_FILE), T.read_state(tmp_path / "two" / T.STATE_FILE)
    torch.manual_seed(0)
    init = T.AutoencoderKL(**TINY_VAE).state_dict()
    key = "decoder.conv_out.weight"
    expected = 0.81 * init[key] + 0.09 * w1["vae"][key] + 0.1 * s2["vae"][key]
    torch.testing.assert_close(s2["ema"][key], expected)
    assert not torch.allclose(s2["ema"][key], s2["vae"][key])


def test_discriminator_is_unchanged_before_its_start(T, data, tmp_path):
    """With disc_start beyond the run, the saved discriminator is still its seeded initialisation."""
    run(T, data, tmp_path / "vae", max_steps=3, disc_start=10, final=False)
    saved = T.read_state(tmp_path / "vae" / T.STATE_FILE)["disc"]
    torch.manual_seed(0)
    T.AutoencoderKL(**TINY_VAE)  # train() seeds, builds the VAE, then the discriminator
    fresh = T.PatchDiscriminator(8, 1).state_dict()
    for k, v in fresh.items():
        assert torch.equal(saved[k], v), k


def test_adaptive_weight_is_the_ratio_of_gradient_norms(T, data):
    torch.manual_seed(0)
    vae, disc = T.AutoencoderKL(**TINY_VAE), T.PatchDiscriminator(8, 1)
    x = T.random_crops(torch.as_tensor(data[0]), 2, 16, torch.Generator().manual_seed(3))
    t = T.generator_terms(vae, x, torch.Generator().manual_seed(0), tiny_perceptual(T), 1.0)
    g_loss = -disc(t["rec"]).mean()
    last = vae.decoder.conv_out.weight
    weight = T.adaptive_weight(t["rec_loss"], g_loss, last, disc_weight=0.5)
    # by hand: two separate backward passes, the norms of the last layer's gradients
    t["rec_loss"].backward(retain_graph=True)
    rec_norm = last.grad.norm().item()
    last.grad = None
    g_loss.backward()
    g_norm = last.grad.norm().item()
    assert rec_norm > 0 and g_norm > 0
    assert weight.item() == pytest.approx(0.5 * rec_norm / (g_norm + 1e-4), rel=1e-5)
    assert not weight.requires_grad


def test_resume_gives_the_weights_of_an_uninterrupted_run(T, data, tmp_path):
    """3 steps, a checkpoint, a new process state (another seed would be drawn on the way), 3 more steps ==
    6 steps at once, exactly: the VAE, the discriminator and both Adam states (bf16 autocast on CPU is
    deterministic). The GAN switches on (step 2) and the learning rate drops (step 5) across the boundary."""
    run(T, data, tmp_path / "a")
    part = run(T, data, tmp_path / "b", stop_at=3)
    assert part["steps"] == 3 and "scaling_factor" not in part
    with pytest.raises(T.TrainError, match="--resume"):  # a state is never overwritten by accident
        run(T, data, tmp_path / "b")
    torch.manual_seed(123)  # a resumed run does not depend on the caller's random state
    # --init is not needed on resume (the state holds the weights): another folder here changes nothing
    resumed = run(T, data, tmp_path / "b", resume=True, init=tmp_path / "a")
    assert resumed["init"] is None
    assert resumed["steps"] == 6 and resumed["resumed_at"] == [3]
    a, b = T.read_state(tmp_path / "a" / T.STATE_FILE), T.read_state(tmp_path / "b" / T.STATE_FILE)
    flat_a = load_file(tmp_path / "a" / T.STATE_FILE)  # every tensor of the state, keyed by its path
    flat_b = load_file(tmp_path / "b" / T.STATE_FILE)
    assert flat_a.keys() == flat_b.keys() and any(k.startswith("/opt_d/") for k in flat_a)
    for k in flat_a:  # every tensor: weights, EMA, discriminator, both Adam states, random states
        assert torch.equal(flat_a[k], flat_b[k]), k
    assert a["opt_g"]["param_groups"] == b["opt_g"]["param_groups"]
    log_a = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log_a["losses"] == resumed["losses"] and log_a["d_losses"] == resumed["d_losses"]
    assert log_a["scaling_factor"] == resumed["scaling_factor"]
    # the diffusers folder holds the EMA weights; the state keeps both
    saved = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == b["ema"].keys()
    assert all(torch.equal(v, b["ema"][k]) for k, v in saved.items())
    with pytest.raises(T.TrainError, match="lr: 0.001 -> 0.002"):  # other settings are refused
        run(T, data, tmp_path / "b", resume=True, lr=2e-3)


class _Payload:
    """Unpickling this creates ``marker`` (it stands for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickles_are_refused_and_never_loaded(T, data, tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "vae"
    run(T, data, out, max_steps=2, final=False)
    # 1. a pickle beside our files: the folder is refused, naming it, and the file is left alone
    evil = pickle.dumps({"payload": _Payload(marker)})
    (out / "train_state.pt").write_bytes(evil)
    with pytest.raises(T.TrainError, match="train_state.pt"):
        run(T, data, out, resume=True)
    assert (out / "train_state.pt").exists()
    (out / "train_state.pt").unlink()
    # 2. a pickle under the state's own name: safetensors cannot parse it, nothing is unpickled
    (out / T.STATE_FILE).write_bytes(evil)
    with pytest.raises(T.TrainError, match="not a training state"):
        run(T, data, out, resume=True)
    assert not marker.exists(), "the planted pickle ran"
    # the payload is real: unpickling it would have created the marker
    pickle.loads((out / T.STATE_FILE).read_bytes())
    assert marker.exists()


def test_foreign_folders_are_refused(T, data, tmp_path):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    with pytest.raises(T.TrainError, match=r"holds files this program did not write: notes.txt"):
        run(T, data, out, max_steps=1)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").read_text() == "{}"
    (out / "notes.txt").unlink()  # only our files left: replaced
    run(T, data, out, max_steps=1)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert sorted(p.name for p in out.iterdir()) == sorted(T.OWN_FILES)
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}  # the umask, not 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no staging folder left beside it
    with pytest.raises(T.TrainError, match="holds the input --init"):
        run(T, data, out, max_steps=1, init=out, restart=True)
    with pytest.raises(SystemExit, match="error: .*holds a training state"):  # the CLI says it in one line
        T.main(["--out", str(out), "--max-steps", "1"])


def test_init_starts_from_the_saved_weights_and_config(T, data, tmp_path):
    run(T, data, tmp_path / "first", max_steps=2)
    run(T, data, tmp_path / "second", init=tmp_path / "first", stop_at=0, final=False)  # no step: init as is
    a = load_file(tmp_path / "first" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "second" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a = json.loads((tmp_path / "first" / "config.json").read_text())
    config_b = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config_a == config_b and "_name_or_path" not in config_b  # the pipelines load it unchanged


@pytest.mark.parametrize(
    ("kw", "message"),
    [(dict(ema_decay=1.0), "--ema-decay"), (dict(crop=12), "--crop"), (dict(max_steps=0), "--max-steps")],
)
def test_bad_arguments_are_refused_before_any_work(T, data, tmp_path, kw, message):
    with pytest.raises(T.TrainError, match=message):
        run(T, data, tmp_path / "vae", **kw)
    assert not (tmp_path / "vae").exists()


def test_a_pause_does_not_eat_the_time_budget(T, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(time=lambda: now[0]))  # the script's clock only
    clock = T.TrainingClock(5.0, max_gap_s=60.0)  # a resumed run at 5 s
    now[0] += 2.0
    assert clock() == 7.0
    now[0] += 3600.0  # stopped (SIGSTOP) for an hour: counts as one minute
    assert clock() == 67.0
    now[0] += 0.5
    assert clock() == 67.5
