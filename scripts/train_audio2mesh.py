"""Train AniPortrait's Audio2Mesh on the toy world: speech -> per-frame offsets of the 478-point face mesh.

    PYTHONPATH=$PWD .venv/bin/python scripts/train_audio2mesh.py --features log-mel --max-steps 20 \\
        --n-utterances 8 --eval-utterances 4 --out /tmp/a2m            # a quick try

- Data (``anim_lab.toy.TalkingMeshDataset``): ``--n-utterances`` training utterances (training sentences and
  voices, training identities) and ``--eval-utterances`` of each evaluation split: ``train`` (new utterances
  of the training sentences and voices) and ``heldout`` (held-out sentences *and* voices, test identities).
  Targets: the offsets from each identity's neutral face of what speech moves (jaw and lips), at ``--fps``,
  in the frame the Audio2Video pipeline adds them in (``anim_lab.retarget.to_fit_frame``: the face's own
  size and tilt divided out, the frame ``fit_head_pose`` gives the reference's canonical mesh).
- Features: ``--features wav2vec2 --wav2vec2 FOLDER`` (a wav2vec2 folder: the tiny one of
  ``scripts/train_tiny_wav2vec2.py``, or wav2vec2-base-960h) runs the AniPortrait way: the CNN features
  interpolated to the frame rate, then the transformer and the two linear layers. The CNN is frozen (as in
  AniPortrait), so its features are computed once per utterance; ``--freeze-encoder`` also freezes the
  transformer (its states are then computed once and only the head trains). ``--features log-mel``: the
  baseline, an 80-band log-mel spectrogram at the frame rate into the same head (no encoder).
- Training: MSE on the offsets (divided by their standard deviation over the training frames), random crops of
  ``--crop-frames`` frames, AdamW with a linear warm-up and cosine decay. The batch, the crops and dropout are
  functions of the step, so a resumed run takes the same steps as an uninterrupted one.
- Evaluation every ``--eval-every`` steps, on whole utterances, per split: the lip vertex error (FaceFormer's:
  per frame the largest squared lip-vertex error, template units², mean over frames), the mouth-opening
  correlation with the ground truth, and the same two for the **shuffled-audio** baseline (each clip given
  another clip's features); once, the **mean-face** baseline (the training frames' mean offset).

Writes ``--out``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``Audio2Mesh.from_pretrained``
loads it, its wav2vec2 encoder included) and ``train_log.json`` (this script's own log). A resumable state
(``<out>.state.safetensors`` + ``.json``) is written at each evaluation; rerunning the same command continues
from it; it is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import anim_lab
from anim_lab import audio as A
from anim_lab import files, metrics, toy
from anim_lab.audio2mesh import Audio2Mesh, encoder_states
from anim_lab.errors import InputError
from anim_lab.retarget import to_fit_frame
from anim_lab.toy.talking_mesh import mean_offsets, shuffled
from anim_lab.weights import TRANSFORMERS_WEIGHTS, resolve_pretrained

OWN_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "train_log.json")
FEATURES = ("wav2vec2", "log-mel")
_NOT_ARCHITECTURE = {
    "transformers_version",
    "architectures",
    "model_type",
    "_name_or_path",
    "dtype",
    "torch_dtype",
}


def check_args(a) -> None:
    """Every argument and the destination, before any work; errors name the option and the fix."""
    if a.features not in FEATURES:
        raise InputError(f"--features must be one of {FEATURES}, got {a.features!r}")
    if a.features == "wav2vec2":
        if a.wav2vec2 is None:
            raise InputError("--features wav2vec2 needs --wav2vec2 FOLDER (e.g. the tiny wav2vec2's output)")
        resolve_pretrained(Path(a.wav2vec2), None, "--wav2vec2", TRANSFORMERS_WEIGHTS, "out/tiny_wav2vec2")
    elif a.wav2vec2 is not None or a.freeze_encoder:
        raise InputError("--wav2vec2 and --freeze-encoder are for --features wav2vec2")
    for name in ("max_steps", "batch_size", "eval_every", "crop_frames", "latent_dim", "threads"):
        if int(getattr(a, name)) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(a, name)}")
    for name in ("n_utterances", "eval_utterances"):
        if int(getattr(a, name)) < 2:
            raise InputError(f"--{name.replace('_', '-')} must be ≥ 2 (the baselines need two clips)")
    if not (a.lr > 0 and a.fps > 0 and a.warmup_steps >= 0):
        raise InputError(
            f"--lr and --fps must be positive and --warmup-steps ≥ 0, got {a.lr}, {a.fps}, {a.warmup_steps}"
        )
    files.check_output_folder(a.out, OWN_FILES, force=a.force, inputs={"--wav2vec2": a.wav2vec2})


def encoder_config(encoder) -> dict:
    """The wav2vec2 config entries that differ from ``Wav2Vec2Config()``'s: what rebuilds this encoder."""
    from transformers import Wav2Vec2Config

    default = Wav2Vec2Config().to_dict()
    return {
        k: v
        for k, v in encoder.config.to_dict().items()
        if k not in _NOT_ARCHITECTURE and default.get(k, object()) != v
    }


def build_model(a, encoder) -> Audio2Mesh:
    if encoder is None:
        return Audio2Mesh(num_vertices=478, latent_dim=a.latent_dim, feature_dim=A.MEL_BINS, fps=a.fps)
    model = Audio2Mesh(
        num_vertices=478, latent_dim=a.latent_dim, encoder_config=encoder_config(encoder), fps=a.fps
    )
    model.audio_encoder.load_state_dict(
        encoder.state_dict()
    )  # the pretrained encoder, shipped with the model
    if a.freeze_encoder:
        model.audio_encoder.requires_grad_(False)
    return model


@torch.no_grad()
def features_of(item, encoder, freeze_encoder: bool) -> torch.Tensor:
    """What one utterance's training reads, ``(F, D)``: log-mel bands; the interpolated CNN features (the
    frozen part of wav2vec2); or, with a frozen encoder, its states."""
    if encoder is None:
        return torch.from_numpy(A.log_mel(item.audio, num_frames=item.num_frames))
    values = torch.from_numpy(A.normalize(item.audio))[None]  # (1, N)
    extract = A.wav2vec2_extract(encoder, values, item.num_frames)  # (1, F, C)
    if freeze_encoder:
        return encoder_states(encoder, True, extract=extract)[0]  # (F, hidden)
    return extract[0]


def predict(model: Audio2Mesh, feats: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, F, D)`` features -> ``(B, F, 478, 3)`` offsets."""
    if mode == "log-mel":
        return model(features=feats)
    if mode == "frozen":
        return model.out_fn(model.in_fn(feats)).unflatten(-1, (-1, 3))
    return model(extract=feats)


def make_set(split: str, length: int, fps: float, seed: int, encoder, freeze: bool, dtype=torch.float32):
    data = toy.TalkingMeshDataset(split, length=length, fps=fps, seed=seed)
    out = []
    for i in range(length):
        item = data[i]
        # targets in the frame the pipeline adds them in (anim_lab.retarget.to_fit_frame)
        neutral, offsets = to_fit_frame(item.neutral, item.offsets)  # (478, 3), (F, 478, 3)
        out.append(
            dict(
                feats=features_of(item, encoder, freeze),
                offsets=torch.from_numpy(offsets).to(dtype),  # (F, 478, 3)
                neutral=torch.from_numpy(neutral).float(),
            )
        )
    return out


@torch.no_grad()
def evaluate(model: Audio2Mesh, items: list[dict], mode: str, feats: list | None = None) -> dict:
    """Lip vertex error (frames of every clip pooled) and mouth-opening correlation (pooled) of the model
    on ``items`` (with ``feats`` in place of each clip's own features: the shuffled baseline)."""
    model.eval()
    pred, true = [], []
    for k, x in enumerate(items):
        f = x["feats"] if feats is None else feats[k]
        pred.append(x["neutral"] + predict(model, f[None], mode)[0])
        true.append(x["neutral"] + x["offsets"].float())
    model.train()
    pred, true = torch.cat(pred), torch.cat(true)
    return dict(
        lve=metrics.lip_vertex_error(pred, true), mouth_r=metrics.mouth_opening_correlation(pred, true)
    )


def learning_rate(step: int, max_steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))


def batch_of(
    data: list[dict], step_seed: int, batch_size: int, crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random crops, all of one length (the crop, or the shortest clip drawn)."""
    g = torch.Generator().manual_seed(step_seed)
    chosen = [data[i] for i in torch.randint(len(data), (batch_size,), generator=g).tolist()]
    length = min([crop] + [len(x["feats"]) for x in chosen])
    feats, offsets = [], []
    for x in chosen:
        start = int(torch.randint(len(x["feats"]) - length + 1, (1,), generator=g))
        feats.append(x["feats"][start : start + length])
        offsets.append(x["offsets"][start : start + length].float())
    return torch.stack(feats), torch.stack(offsets)  # (B, L, D), (B, L, 478, 3)


def save(model: Audio2Mesh, out: Path, log: dict, force: bool) -> None:
    tmp = files.staging_folder(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
        files.publish_folder(tmp, out, OWN_FILES, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def train(a, stop_after: int | None = None) -> dict:
    """Train, evaluate, save; returns the log. ``stop_after``: leave after that many steps with the state
    written, as an interrupted run would (tests of resuming)."""
    check_args(a)
    state_path = a.out.parent / f"{a.out.name}.state.safetensors"
    state = None
    if state_path.exists():  # an interrupted run: resumed only by the same command
        state = files.load_state(state_path)  # safetensors + JSON: reading it runs no code
        before = {k: v for k, v in state["log"]["args"].items() if k != "force"}
        if before != {k: v for k, v in logged_args(a).items() if k != "force"}:
            raise InputError(
                f"{state_path} is the state of a run with other arguments ({before}); rerun that command to "
                "finish it, or delete the state (and its .json) to start this one"
            )
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    encoder = A.load_wav2vec2(a.wav2vec2)[0] if a.features == "wav2vec2" else None
    mode = "log-mel" if encoder is None else ("frozen" if a.freeze_encoder else "finetune")
    t0 = time.time()
    data = make_set("train", a.n_utterances, a.fps, a.seed, encoder, a.freeze_encoder, torch.float16)
    evals = {
        split: make_set(split, a.eval_utterances, a.fps, 1000 + a.seed, encoder, a.freeze_encoder)
        for split in ("train", "heldout")
    }
    scale = float(torch.cat([x["offsets"].float().flatten() for x in data]).std())  # template units
    model = build_model(a, encoder).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.01)
    mean = torch.from_numpy(mean_offsets([dict_item(x) for x in data]))
    log = dict(
        args=logged_args(a),
        mode=mode,
        n_params=sum(p.numel() for p in model.parameters()),
        n_trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
        seconds_of_speech=round(sum(len(x["offsets"]) for x in data) / a.fps, 1),
        data_seconds=round(time.time() - t0, 1),
        offset_std=scale,
        mean_face={split: mean_face_scores(items, mean) for split, items in evals.items()},
        losses=[],
        evals=[],
    )
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resuming at step {step}", flush=True)
    t0 = time.time()
    while step < a.max_steps:
        step_seed = a.seed * 1_000_003 + step
        torch.manual_seed(step_seed)  # dropout
        feats, target = batch_of(data, step_seed, a.batch_size, a.crop_frames)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, a.max_steps, a.lr, a.warmup_steps)
        loss = F.mse_loss(predict(model, feats, mode) / scale, target / scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log["losses"].append(round(loss.item(), 5))
        if step % a.eval_every == 0 or step == a.max_steps:
            row = dict(step=step, seconds=round(time.time() - t0, 1))
            for split, items in evals.items():
                row[split] = evaluate(model, items, mode)
                row[f"{split}_shuffled"] = evaluate(model, items, mode, shuffled([x["feats"] for x in items]))
            log["evals"].append(row)
            print(json.dumps(row), flush=True)
            files.save_state(
                dict(model=model.state_dict(), opt=opt.state_dict(), step=step, log=log), state_path
            )
        if stop_after is not None and step >= stop_after:
            return log
    save(model.eval(), a.out, log, a.force)
    for p in (state_path, state_path.with_suffix(".json")):
        p.unlink(missing_ok=True)
    return log


def logged_args(a) -> dict:
    """The arguments as the log records them: paths relative to the repository (no machine's path)."""
    return {k: anim_lab.repo_relative(v) if isinstance(v, Path) else v for k, v in vars(a).items()}


def dict_item(x: dict):
    """A training entry as what ``mean_offsets`` reads (``offsets``, ``num_frames``)."""
    return argparse.Namespace(offsets=x["offsets"].float().numpy(), num_frames=len(x["offsets"]))


def mean_face_scores(items: list[dict], mean: torch.Tensor) -> dict:
    pred = torch.cat([x["neutral"] + mean.expand(len(x["offsets"]), -1, -1) for x in items])
    true = torch.cat([x["neutral"] + x["offsets"].float() for x in items])
    return dict(
        lve=metrics.lip_vertex_error(pred, true), mouth_r=metrics.mouth_opening_correlation(pred, true)
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--features", default="wav2vec2", help=f"one of {FEATURES}")
    p.add_argument("--wav2vec2", type=Path, default=None, help="a wav2vec2 folder (config.json + weights)")
    p.add_argument("--freeze-encoder", action="store_true", help="train the head only (wav2vec2 features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--latent-dim", type=int, default=512)
    p.add_argument("--n-utterances", type=int, default=1000)
    p.add_argument("--eval-utterances", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-frames", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="replace only this script's files in a used --out")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    log = train(a)
    print(json.dumps(log["evals"][-1]))
    return log


if __name__ == "__main__":
    main()
