"""scripts/train_tiny_wav2vec2.py: phoneme CTC on the toy world's speech (a smoke run at a micro size,
resuming, and its decoding and scoring pieces against hand-worked cases)."""

import json

import pytest
import torch

import anim_lab
from anim_lab import audio as A
from anim_lab import files, toy

T = anim_lab.load_script("train_tiny_wav2vec2")
MICRO = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
)
RUN = dict(
    max_steps=4, n_utterances=6, batch_size=3, warmup_steps=2, eval_every=2, eval_utterances=2, config=MICRO
)


def test_greedy_decoding_merges_repeats_and_drops_blanks():
    ids = [0, 3, 3, 0, 3, 5, 5, 5, 0, 0, 2]
    logits = torch.nn.functional.one_hot(torch.tensor(ids), 6).float()  # (T, V)
    assert T.greedy_decode(logits) == [3, 3, 5, 2]  # a blank between two 3s keeps both


def test_edit_distance_counts_insertions_deletions_substitutions():
    assert T.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert T.edit_distance([1, 3], [1, 2, 3]) == 1  # one deletion
    assert T.edit_distance([1, 2, 4, 3], [1, 2, 3]) == 1  # one insertion
    assert T.edit_distance([7, 8, 9], [1, 2, 3]) == 3
    assert T.edit_distance([], [1, 2]) == 2


def test_targets_are_the_phonemes_without_pauses_or_stress():
    speech = toy.synthesize("Bob spoke.")
    ids = T.phoneme_ids(speech)
    assert [T.VOCAB[i] for i in ids] == [p.base for p in speech.phonemes if not p.base.startswith("_")]
    assert T.VOCAB[0] == "<pad>" and 0 not in ids


def test_a_smoke_run_trains_saves_and_resumes_to_the_same_weights(tmp_path):
    log = T.train(tmp_path / "a", **RUN)
    assert len(log["losses"]) == 4 and all(torch.isfinite(torch.tensor(log["losses"])))
    assert [e["step"] for e in log["evals"]] == [2, 4]
    assert set(log["evals"][-1]["per"]) == {"train", "heldout"}
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(T.OWN_FILES) and not list(tmp_path.glob("*.state.*"))  # the state is gone
    assert json.loads((tmp_path / "a" / "train_log.json").read_text())["losses"] == log["losses"]
    # the encoder loads as wav2vec2 features do
    model, _ = A.load_wav2vec2(tmp_path / "a")
    feats, _ = A.hallo_audio_features(toy.synthesize("Bob.").audio_16k(), model)
    assert feats.shape[1:] == (1, 16)
    # interrupted after 2 steps, then rerun: the same weights as the uninterrupted run
    T.train(tmp_path / "b", **RUN, stop_after=2)
    assert (tmp_path / "b.state.safetensors").exists() and not (tmp_path / "b").exists()
    T.train(tmp_path / "b", **RUN)
    a, b = (A.load_wav2vec2(tmp_path / x)[0].state_dict() for x in ("a", "b"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_foreign_output_folder_is_refused_before_training(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        T.train(tmp_path / "out", **RUN)


def test_a_run_starts_from_a_finished_folder_or_an_unfinished_state(tmp_path):
    first = T.train(tmp_path / "first", **RUN)
    T.train(tmp_path / "cut", **RUN, stop_after=2)  # leaves cut.state.safetensors
    state = tmp_path / "cut.state.safetensors"
    model, earlier = T.initial_model(state, MICRO)
    for key, value in files.load_state(state)["model"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert len(earlier["losses"]) == 2
    model, earlier = T.initial_model(tmp_path / "first", MICRO)
    for key, value in A.load_wav2vec2(tmp_path / "first")[0].state_dict().items():
        torch.testing.assert_close(model.wav2vec2.state_dict()[key], value, rtol=0, atol=0)
    assert earlier["losses"] == first["losses"]
    log = T.train(tmp_path / "next", **RUN, init_from=state)
    assert log["init_from"] == str(state) and len(log["earlier"]["losses"]) == 2
    assert log["losses"][0] != first["losses"][0]  # it started from the state's weights, not fresh ones
    (tmp_path / "first" / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match="not this script's phoneme vocabulary"):
        T.train(tmp_path / "other", **RUN, init_from=tmp_path / "first")
    assert not (tmp_path / "other").exists()
    with pytest.raises(FileNotFoundError, match="no such training state"):
        T.initial_model(tmp_path / "gone.state.safetensors")


def test_the_packaged_toy_wav2vec2_hears_phonemes_of_held_out_speech():
    """The committed weights (anim_lab/assets/toy_wav2vec2): its log ends at its last step, and greedy CTC
    decoding of held-out voices speaking held-out sentences (utterances its evaluation never used) gets most
    phonemes right."""
    from transformers import Wav2Vec2ForCTC

    log = json.loads((A.TOY_WAV2VEC2_DIR / "train_log.json").read_text())
    assert log["evals"][-1]["step"] == log["max_steps"] and log["evals"][-1]["per"]["heldout"] < 0.3
    vocab = json.loads((A.TOY_WAV2VEC2_DIR / "vocab.json").read_text())
    assert vocab == {s: i for i, s in enumerate(T.VOCAB)}
    model = Wav2Vec2ForCTC.from_pretrained(A.TOY_WAV2VEC2_DIR)
    items = T.make_set("heldout", range(1000, 1004))
    assert T.phoneme_error_rate(model, items) < 0.4
    encoder, extractor = A.load_wav2vec2(A.TOY_WAV2VEC2_DIR)  # the encoder alone, as the audio models load it
    assert encoder.config.hidden_size == 96 and extractor.sampling_rate == A.SAMPLE_RATE
