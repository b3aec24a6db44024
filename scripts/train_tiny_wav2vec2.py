"""Train a tiny wav2vec2 (transformers' ``Wav2Vec2ForCTC``) on the toy world's speech, with phoneme CTC.

    PYTHONPATH=$PWD .venv/bin/python scripts/train_tiny_wav2vec2.py --max-steps 30 --out /tmp/w2v  # quick try

wav2vec2-base-960h was pre-trained on 960 h of LibriSpeech and fine-tuned with character CTC; nothing that
size can be trained here. This script trains the same architecture (the 7-layer CNN at 50 frames a second,
the transformer, a CTC head) at a toy size, from scratch, on eSpeak NG speech, whose phoneme labels are exact.
The result is a small model whose features hear phonemes, for the audio-driven models of the toy world.

- Data: ``--n-utterances`` utterances of the training split (``toy.sample_speech(seed, "train")``: training
  sentences and voices, rates 130-190 wpm, pitches 30-70), synthesised once and kept in memory; each is
  normalised as ``Wav2Vec2FeatureExtractor`` does, and batches are zero-padded at the end.
- Targets: eSpeak's phoneme symbols without stress marks, pauses dropped. The vocabulary is fixed by the code
  (``<pad>``, the CTC blank, at 0, then the sorted symbols of ``anim_lab.toy.visemes.PHONEME_VISEMES``,
  pauses and marks left out), not by the data, so every run has the same output layer.
- Loss: CTC over the log-softmax of the logits, with each utterance's true number of CNN frames
  (``_get_feat_extract_output_lengths``) as its input length. AdamW, linear warm-up, cosine decay.
- Evaluation every ``--eval-every`` steps: greedy CTC decoding (argmax, repeats merged, blanks dropped) and
  the phoneme error rate (edit distance / reference length) on utterances of the training split (new seeds)
  and of the held-out split (held-out voices *and* sentences).

Writes ``--out``: ``config.json`` + ``model.safetensors`` (Wav2Vec2ForCTC; ``anim_lab.audio.load_wav2vec2``
loads its encoder), ``preprocessor_config.json``, ``vocab.json`` and ``train_log.json`` (this script's own
log). A resumable state (``<out>.state.safetensors`` + ``.json``: model, optimiser, step, log) is
written at each evaluation; a rerun with the same arguments continues from it, and it is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from anim_lab import audio as A
from anim_lab import files, toy
from anim_lab.toy.visemes import PHONEME_VISEMES

OWN_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "train_log.json")
VOCAB = ("<pad>",) + tuple(sorted(s for s in PHONEME_VISEMES if s[0] not in "_;"))  # no pauses, no marks
TINY_W2V = dict(  # ~0.5 M parameters; the base model's CNN strides and kernels (50 frames a second)
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=192,
    conv_dim=(64,) * 7,
    num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=4,
    hidden_dropout=0.05,
    attention_dropout=0.05,
    activation_dropout=0.05,
    feat_proj_dropout=0.05,
    final_dropout=0.05,
    layerdrop=0.0,
    mask_time_prob=0.05,
    feat_extract_norm="group",
    do_stable_layer_norm=False,
    ctc_loss_reduction="mean",
)


def phoneme_ids(speech: toy.Speech) -> list[int]:
    """The CTC target: the utterance's phonemes (stress marks dropped, pauses left out) as vocabulary ids."""
    index = {s: i for i, s in enumerate(VOCAB)}
    return [index[p.base] for p in speech.phonemes if p.base in index]


def make_set(split: str, seeds: range) -> list[dict]:
    """Utterances of a split: normalised 16-kHz audio and phoneme ids."""
    out = []
    for seed in seeds:
        speech = toy.sample_speech(seed, split)
        out.append(dict(values=A.normalize(speech.audio_16k()), labels=phoneme_ids(speech), seed=seed))
    return out


def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input_values (B, N) zero-padded, lengths (B,), labels (sum L,), label lengths (B,)."""
    lengths = torch.tensor([len(x["values"]) for x in items])
    values = torch.zeros(len(items), int(lengths.max()))
    for i, x in enumerate(items):
        values[i, : len(x["values"])] = torch.from_numpy(x["values"])
    labels = torch.tensor([t for x in items for t in x["labels"]])
    return values, lengths, labels, torch.tensor([len(x["labels"]) for x in items])


def ctc_loss(model: Wav2Vec2ForCTC, batch) -> torch.Tensor:
    values, lengths, labels, label_lengths = batch
    logits = model(values).logits  # (B, N) -> (B, T, V)
    frames = model._get_feat_extract_output_lengths(lengths)  # (B,) CNN frames of each unpadded utterance
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, labels, frames, label_lengths, blank=0, reduction="mean", zero_infinity=True)


def greedy_decode(logits: torch.Tensor) -> list[int]:
    """``(T, V)`` -> ids: the best id per frame, repeats merged, blanks (0) dropped."""
    best = logits.argmax(-1).tolist()
    return [b for i, b in enumerate(best) if b != 0 and (i == 0 or b != best[i - 1])]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@torch.no_grad()
def phoneme_error_rate(model: Wav2Vec2ForCTC, items: list[dict]) -> float:
    model.eval()
    errors = total = 0
    for x in items:
        logits = model(torch.from_numpy(x["values"])[None]).logits[0]  # (T, V)
        errors += edit_distance(greedy_decode(logits), x["labels"])
        total += len(x["labels"])
    model.train()
    return errors / max(total, 1)


def learning_rate(step: int, max_steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))


def save(model: Wav2Vec2ForCTC, out: Path, log: dict) -> None:
    from anim_lab.clip import quiet_transformers

    tmp = files.staging_folder(out)
    try:
        with quiet_transformers():  # no progress bar
            model.save_pretrained(tmp)
        Wav2Vec2FeatureExtractor(**A.WAV2VEC2_BASE_960H_PREPROCESSOR).save_pretrained(tmp)
        (tmp / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(VOCAB)}, indent=1))
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
        files.publish_folder(tmp, out, OWN_FILES)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def initial_model(path: Path, config: dict | None = None) -> tuple[Wav2Vec2ForCTC, dict | None]:
    """The weights a run starts from, and their log: a folder this script wrote (``config.json`` +
    ``model.safetensors`` + ``train_log.json``), or the resumable state of an unfinished run
    (``<out>.state.safetensors``: its model at the last evaluation, and its log so far; ``config`` as the run
    had it). The vocabulary must be this script's."""
    if path.name.endswith(".state.safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"--init-from {path}: no such training state")
        state = files.load_state(path)  # safetensors + JSON: reading it runs no code
        cfg = dict(TINY_W2V, **(config or {}), vocab_size=len(VOCAB), pad_token_id=0)
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**cfg))
        model.load_state_dict(state["model"])
        return model, state["log"]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {path}: not a folder written by this script (no config.json)")
    vocab = json.loads((path / "vocab.json").read_text()) if (path / "vocab.json").is_file() else None
    if vocab != {s: i for i, s in enumerate(VOCAB)}:
        raise ValueError(f"--init-from {path}: its vocab.json is not this script's phoneme vocabulary")
    log = path / "train_log.json"
    return Wav2Vec2ForCTC.from_pretrained(path), json.loads(log.read_text()) if log.is_file() else None


def train(
    out: Path,
    max_steps: int,
    seed: int = 0,
    n_utterances: int = 2000,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup_steps: int = 200,
    eval_every: int = 500,
    eval_utterances: int = 60,
    config: dict | None = None,
    threads: int = 1,
    stop_after: int | None = None,
    init_from: Path | None = None,
) -> dict:
    """Train, evaluate, save; returns the log. ``stop_after``: leave after that many steps with the state
    written, as an interrupted run would (tests of resuming). ``init_from``: start from these weights (see
    :func:`initial_model`); the run's log keeps theirs under ``"earlier"``."""
    files.check_output_folder(out, OWN_FILES, what="output folder")
    start = None if init_from is None else initial_model(Path(init_from), config)  # refused before any work
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = make_set("train", range(10_000 + seed * n_utterances, 10_000 + (seed + 1) * n_utterances))
    evals = {
        "train": make_set("train", range(eval_utterances)),  # seen voices and sentences, new rates/pitches
        "heldout": make_set("heldout", range(eval_utterances)),  # held-out voices and sentences
    }
    cfg = dict(TINY_W2V, **(config or {}), vocab_size=len(VOCAB), pad_token_id=0)
    model = (Wav2Vec2ForCTC(Wav2Vec2Config(**cfg)) if start is None else start[0]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    log = dict(
        seed=seed,
        max_steps=max_steps,
        n_params=sum(p.numel() for p in model.parameters()),
        n_utterances=n_utterances,
        hours_of_speech=round(sum(len(x["values"]) for x in data) / A.SAMPLE_RATE / 3600, 3),
        batch_size=batch_size,
        lr=lr,
        vocab=list(VOCAB),
        losses=[],
        evals=[],
    )
    if start is not None:
        log.update(init_from=str(init_from), earlier=start[1])
    step = 0
    state_path = out.parent / f"{out.name}.state.safetensors"
    if state_path.exists():
        state = files.load_state(state_path)  # safetensors + JSON: reading it runs no code
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resuming at step {step}")
    t0 = time.time()
    while step < max_steps:
        # the batch, dropout and SpecAugment's masks (transformers draws them from numpy's global generator)
        # are functions of the step, so a resumed run takes the same steps as an uninterrupted one
        step_seed = seed * 1_000_003 + step
        g = torch.Generator().manual_seed(step_seed)
        torch.manual_seed(step_seed)
        np.random.seed(step_seed % 2**32)
        batch = collate([data[i] for i in torch.randperm(len(data), generator=g)[:batch_size].tolist()])
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, max_steps, lr, warmup_steps)
        loss = ctc_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log["losses"].append(round(loss.item(), 4))
        if step % eval_every == 0 or step == max_steps:
            per = {name: round(phoneme_error_rate(model, items), 4) for name, items in evals.items()}
            log["evals"].append(dict(step=step, per=per, seconds=round(time.time() - t0, 1)))
            print(f"step {step}: loss {loss.item():.3f}, PER {per}", flush=True)
            state = dict(model=model.state_dict(), opt=opt.state_dict(), step=step, log=log)
            files.save_state(state, state_path)
        if stop_after is not None and step >= stop_after:
            return log
    save(model, out, log)
    for p in (state_path, state_path.with_suffix(".json")):
        p.unlink(missing_ok=True)
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-utterances", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-utterances", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from these weights: a folder this script wrote, or an unfinished run's "
        ".state.safetensors",
    )
    a = p.parse_args(argv)
    log = train(
        a.out,
        a.max_steps,
        seed=a.seed,
        n_utterances=a.n_utterances,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        eval_every=a.eval_every,
        eval_utterances=a.eval_utterances,
        threads=a.threads,
        init_from=a.init_from,
    )
    print(json.dumps(log["evals"][-1]))
    return log


if __name__ == "__main__":
    main()
