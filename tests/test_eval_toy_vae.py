"""scripts/eval_toy_vae.py on a tiny random VAE: its rows are anim_lab.metrics of the mean-latent
reconstructions, and the ground-truth row is mediapipe's floor."""

import json

import numpy as np
import pytest
import torch

import anim_lab
from anim_lab import vae as V
from anim_lab.configs import TINY
from anim_lab.vae import build_vae


@pytest.fixture(scope="module")
def T():
    return anim_lab.load_script("eval_toy_vae")


def test_rows_are_the_metrics_of_the_reconstructions(T, tmp_path, capsys):
    torch.manual_seed(0)
    vae = build_vae(TINY.vae).eval()
    vae.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "scores.json"
    rows = T.main(["--n", "2", "--vae", f"tiny={tmp_path / 'tiny'}", "--json", str(out)])
    assert set(rows) == {"ground truth", "tiny"}
    truth = rows["ground truth"]
    assert truth["psnr"] is None and truth["ssim"] == pytest.approx(1.0) and truth["detect"] == 1.0
    assert truth["face_px"] < 4.0  # mediapipe on the renders themselves (toy-world-findings: about 2 px)
    data = T.held_out(2)
    images = V.images_from_uint8(data["images"])
    with torch.no_grad():
        recon = V.decode(vae, V.encode(vae, images)).clamp(-1, 1)
    mse = ((recon.double() - images.double()) ** 2).flatten(1).mean(1)
    assert rows["tiny"]["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-5)
    record = json.loads(out.read_text())
    assert record["rows"]["tiny"]["psnr"] == pytest.approx(rows["tiny"]["psnr"])
    assert record["environment"]["versions"]["torch"]
    assert "tiny" in capsys.readouterr().out
    np.testing.assert_array_equal(data["images"], T.held_out(2)["images"])  # the same renders every time
