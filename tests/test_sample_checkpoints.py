"""scripts/sample_checkpoints.py: samples of weights folders along training, stored for chapter 10."""

import json
import shutil

import numpy as np
import pytest

import anim_lab
from anim_lab.plain import randomize
from anim_lab.toy import load_animator
from anim_lab.vae import load_vae
from anim_lab.weights import realign


@pytest.fixture(scope="module")
def S():
    return anim_lab.load_script("sample_checkpoints")


def test_samples_equal_direct_generations_and_early_folders_borrow_the_encoder(
    S, tiny_animator_weights, tmp_path
):
    early = tmp_path / "early"  # a folder from before the weights carried their image_encoder/ (git history)
    legacy = shutil.ignore_patterns("image_encoder", "vae", "scheduler", "model_index.json")
    shutil.copytree(tiny_animator_weights, early, ignore=legacy)
    out = tmp_path / "samples.npz"
    argv = ["--weights", f"early={early}", "--weights", f"full={tiny_animator_weights}", "--out", str(out)]
    argv += ["--image-encoder", str(tiny_animator_weights / "image_encoder")]
    v1 = tmp_path / "v1_vae"  # the VAE the early networks were trained on, another random one
    other = realign(load_vae(tiny_animator_weights / "vae"))
    randomize(other, seed=5)
    other.save_pretrained(v1)
    argv += ["--vae", str(v1)]
    assert S.main(argv) == 0
    data = np.load(out)
    assert list(data["labels"]) == ["early", "full"]
    E, case = S.the_case()
    pipe = load_animator(tiny_animator_weights)
    pipe.set_progress_bar_config(disable=True)
    direct = E.generate(pipe, case, steps=8, cfg=3.5, seed=42)  # chapter 10's settings, by hand
    assert data["frames"].shape == (2, *direct.shape) and data["frames"].dtype == np.uint8
    assert np.array_equal(data["frames"][1], direct)
    # the early folder: the same networks, the encoder lent, and the VAE given by --vae
    pipe.vae = realign(load_vae(v1)).eval()
    assert np.array_equal(data["frames"][0], E.generate(pipe, case, steps=8, cfg=3.5, seed=42))
    assert json.loads(str(data["settings"]))["frames"] == [0, 7, 15, 23]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "early",
        "samples.npz",
        "v1_vae",
    ]  # no temporary file left


@pytest.mark.parametrize(
    ("weights", "out", "message"),
    [
        ("no-separator", "s.npz", "--weights must be LABEL=DIR"),
        ("label=nowhere", "s.npz", "nowhere is not a folder"),
        (None, "s.png", "--out must end in .npz"),
    ],
)
def test_bad_arguments_are_named(S, tmp_path, capsys, weights, out, message):
    weights = weights or f"x={tmp_path}"
    with pytest.raises(SystemExit):
        S.parse_args(["--weights", weights, "--out", str(tmp_path / out)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / out).exists()


def test_weights_that_do_not_fit_are_named_and_nothing_is_written(S, tiny_animator_weights, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_animator_weights, broken)
    (broken / "reference_unet" / "diffusion_pytorch_model.safetensors").unlink()
    out = tmp_path / "samples.npz"
    assert S.main(["--weights", f"broken={broken}", "--out", str(out)]) == 2
    assert "broken: " in (err := capsys.readouterr().err) and "reference_unet/diffusion_pytorch_model" in err
    assert not out.exists()
