"""scripts/eval_i2v.py: its ceiling row (ground-truth clips through the causal VAE and back), bad input."""

import pytest
import torch

import anim_lab
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


def test_bad_recon_sizes_are_named(E, tmp_path, capsys):
    with pytest.raises(SystemExit):
        E.main(["--recon-sizes", "96,big", "--json", str(tmp_path / "eval.json")])
    assert "--recon-sizes must be a comma list of sizes" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()
