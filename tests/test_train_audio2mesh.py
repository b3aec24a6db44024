"""scripts/train_audio2mesh.py: smoke runs (log-mel; a micro wav2vec2 fine-tuned), exact resume, its saved
folder, and bad arguments refused before any work."""

import json

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

import anim_lab
from anim_lab.audio2mesh import Audio2Mesh
from anim_lab.errors import InputError

T = anim_lab.load_script("train_audio2mesh")
MICRO = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    vocab_size=5,
)
SMALL = ["--max-steps", "4", "--n-utterances", "3", "--eval-utterances", "2", "--eval-every", "2"]
SMALL += ["--latent-dim", "8", "--batch-size", "2", "--crop-frames", "10", "--warmup-steps", "1"]


def args(tmp_path, *extra, out="out"):
    return T.parser().parse_args(["--out", str(tmp_path / out), *SMALL, *extra])


@pytest.fixture(scope="module")
def micro_wav2vec2(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("w2v") / "tiny"
    Wav2Vec2ForCTC(Wav2Vec2Config(**MICRO)).save_pretrained(folder)
    return folder


def test_log_mel_smoke_run_saves_a_loadable_model(tmp_path):
    log = T.train(args(tmp_path, "--features", "log-mel"))
    assert len(log["losses"]) == 4 and all(torch.isfinite(torch.tensor(log["losses"])))
    last = log["evals"][-1]
    assert last["step"] == 4 and {"train", "heldout", "train_shuffled", "heldout_shuffled"} <= set(last)
    assert log["mean_face"]["heldout"]["lve"] > 0 and log["mode"] == "log-mel"
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(T.OWN_FILES) and not list(
        tmp_path.glob("*.state*")
    )
    assert json.loads((out / "train_log.json").read_text())["losses"] == log["losses"]
    model = Audio2Mesh.from_pretrained(out)
    assert model.config.feature_dim == 80 and model.config.num_vertices == 478
    items = T.make_set("heldout", 2, 25.0, 1000, None, False)
    assert T.evaluate(model, items, "log-mel")["lve"] == pytest.approx(last["heldout"]["lve"], rel=1e-5)


def test_wav2vec2_run_resumes_to_the_same_weights(tmp_path, micro_wav2vec2, monkeypatch):
    extra = ("--features", "wav2vec2", "--wav2vec2", str(micro_wav2vec2))
    log = T.train(args(tmp_path, *extra, out="a"))
    assert log["mode"] == "finetune" and log["n_trained"] < log["n_params"]  # the CNN stays frozen
    T.train(args(tmp_path, *extra, out="b"), stop_after=2)  # interrupted after the first evaluation
    assert (tmp_path / "b.state.safetensors").exists() and not (tmp_path / "b").exists()
    with monkeypatch.context() as m, pytest.raises(InputError, match="other arguments"):
        m.setattr(T, "make_set", lambda *a, **k: pytest.fail("data were made before the check"))
        T.train(args(tmp_path, *extra, "--lr", "0.01", out="b"))  # a state is resumed by its own command only
    T.train(args(tmp_path, *extra, out="b"))
    a, b = (Audio2Mesh.from_pretrained(tmp_path / x).state_dict() for x in ("a", "b"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the shipped encoder is the pretrained one where training does not touch it (the CNN)
    pretrained = Wav2Vec2ForCTC.from_pretrained(micro_wav2vec2).wav2vec2.state_dict()
    for key, value in pretrained.items():
        if key.startswith("feature_extractor."):
            torch.testing.assert_close(a[f"audio_encoder.{key}"], value)
    frozen = T.train(args(tmp_path, *extra, "--freeze-encoder", out="c"))
    assert frozen["mode"] == "frozen" and frozen["n_trained"] == 16 * 8 + 8 + 8 * 478 * 3 + 478 * 3


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--features", "wav2vec2"), "--wav2vec2 FOLDER"),
        (("--features", "wav2vec2", "--wav2vec2", "/nonexistent/w2v"), "does not exist"),
        (("--features", "log-mel", "--freeze-encoder"), "for --features wav2vec2"),
        (("--features", "mfcc"), "--features must be one of"),
        (("--features", "log-mel", "--n-utterances", "1"), "--n-utterances must be ≥ 2"),
        (("--features", "log-mel", "--lr", "0"), "--lr"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, extra, match):
    monkeypatch.setattr(T, "make_set", lambda *a, **k: pytest.fail("data were made before the check"))
    with pytest.raises((InputError, FileNotFoundError), match=match):
        T.train(args(tmp_path, *extra))


def test_a_foreign_output_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "make_set", lambda *a, **k: pytest.fail("data were made before the check"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="notes.txt"):
        T.train(args(tmp_path, "--features", "log-mel"))
