"""Train the toy world's tiny CLIP (transformers CLIPModel, both towers) on toy portraits with attribute
captions.

    PYTHONPATH=$PWD .venv/bin/python scripts/train_toy_clip.py --max-steps 50 --out /tmp/clip \
        --encoder-out /tmp/enc  # quick try

The committed weights (seed 0, one CPU thread) are this script's own output, from four stages of fixed step
counts, run by ``scripts/retrain_toy_clip.sh`` (resumable; each stage's log is kept in the next one's
``train_log.json`` under ``earlier_stages``):

    PYTHONPATH=$PWD .venv/bin/python scripts/train_toy_clip.py --resize 128 --max-steps 1830 \
        --out runs/toy_clip/stage1 --encoder-out none
    PYTHONPATH=$PWD .venv/bin/python scripts/train_toy_clip.py --resize 128 --init runs/toy_clip/stage1 \
        --max-steps 1333 --lr 5e-4 --aux-weight 4 --out runs/toy_clip/stage2 --encoder-out none
    PYTHONPATH=$PWD .venv/bin/python scripts/train_toy_clip.py --init runs/toy_clip/stage2 --max-steps 1171 \
        --lr 5e-4 --aux-weight 4 --mouth-weight 2 --eval-identities 60 --out runs/toy_clip/stage3 \
        --encoder-out none
    PYTHONPATH=$PWD .venv/bin/python scripts/train_toy_clip.py --init runs/toy_clip/stage3 --max-steps 1302 \
        --lr 3e-4 --aux-weight 4 --mouth-weight 2 --identity-weight 0.5 --any-pairs

Stages 1-2 (resize 128) learn colours, hairstyle and identity but leave mouth open/closed near chance;
stage 3 zooms in (resize 160) and weights the mouth head up, and the mouth is learned, but identity retrieval
falls (pairs of the same mouth state never teach it to look past the mouth); stage 4 pairs views regardless of
mouth state, with the identity term doubled. (The step counts are those of an earlier, time-budgeted run of
16, 12, 10.7 and 12 minutes; the learning-rate schedule is a function of the step, so a rerun reproduces.)

Writes ``--out`` (default ``anim_lab/assets/toy_clip``: CLIPModel + tokenizer + preprocessor_config.json) and
the image tower alone as a ``CLIPVisionModelWithProjection`` to ``--encoder-out``
(``anim_lab/assets/toy_image_encoder``).

Recipe:
- Images: 128-px renders, resized to 160 and centre-cropped to 96 px
  (``CLIPImageProcessor(size=160, crop=96)``): the central 77 px of the frame, enlarged 1.25x, so the face
  fills the crop and one 12-px patch covers 9.6 px of the render; hair, background and the collar are still in
  view. Patch 12: 8x8 tokens. (At resize 128 the mouth stayed at chance; at resize 192 the mouth was learned
  but hair colour, mostly cropped away, stalled at ~76%.)
- Captions: a random non-empty subset of the image's attribute phrases ("red hair , mouth open"), the
  expression phrases (mouth, eyelids) and eye colour more often than the others. The tokenizer is word-level,
  built here from the toy vocabulary (:func:`anim_lab.clip.build_word_tokenizer`).
- Loss: (1) CLIP's symmetric cross-entropy, with *every* caption that is true of an image counted as a
  positive (a batch holds many captions such as "blue background" that fit several images); (2) an image-image
  term that pulls together two renders of the same identity in different poses (retrieval; weight 0.25, and
  the two renders share the mouth state, or the term would teach the encoder to ignore the mouth); (3) small
  linear attribute heads on the image embedding, dropped after training (they speed up learning of the image
  side on a CPU budget); the mouth head's loss can be weighted up (``--mouth-weight``: added to the heads' sum
  before averaging).
- AdamW, warm-up then cosine decay over ``--max-steps`` (or, for a quick try, over ``--minutes``); held-out
  zero-shot accuracy and retrieval every ``--eval-every`` steps, with a checkpoint each time. A resumable
  training state (model, heads, optimiser, sampler) is written beside ``--out`` (``<out>.state.safetensors``
  and ``.json``) at each checkpoint; a rerun with the same arguments continues from it, and it is removed
  when the stage ends.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

import anim_lab
from anim_lab import clip as C
from anim_lab import files, repo_relative, toy
from anim_lab import vae as V
from anim_lab.configs import TOY

E = anim_lab.load_script("eval_toy_models")  # the shared toy-data helper
ROOT = anim_lab.REPO_DIR

DEFAULT_OUT = ROOT / "anim_lab" / "assets" / "toy_clip"
DEFAULT_ENCODER_OUT = ROOT / "anim_lab" / "assets" / "toy_image_encoder"
RESIZE, CROP, PATCH = 160, 96, 12  # RESIZE: the committed model's (stages 1-2 used 128)
PHRASE_P = {"mouth": 0.7, "eyelids": 0.6, "eyes": 0.6}  # the others: 0.4
MAX_TOKENS = 24


def clip_config(vocab_size: int, image_size: int = CROP, patch_size: int = PATCH) -> CLIPConfig:
    vision = TOY.get("image_encoder")
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        # the image tower is configs.TOY.image_encoder (the toy animation models' image encoder)
        vision_config={k: v for k, v in vision.items() if k != "projection_dim"}
        | dict(image_size=image_size, patch_size=patch_size),
        projection_dim=vision["projection_dim"],
    )


def label_matrix(labels: list[dict], attributes: dict[str, tuple[str, ...]]) -> torch.Tensor:
    """Per-image attribute value indices: list of N dicts -> (N, A) long."""
    return torch.tensor([[values.index(lab[a]) for a, values in attributes.items()] for lab in labels])


def sample_captions(
    values: torch.Tensor, attributes: dict, g: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """For each image, a random non-empty subset of its phrases, shuffled: (N, A) values -> (N captions,
    (N, A) mask)."""
    names = list(attributes)
    p = torch.tensor([PHRASE_P.get(a, 0.4) for a in names])
    mask = torch.rand(values.shape, generator=g) < p  # (N, A): which phrases each caption names
    empty = ~mask.any(1)
    mask[empty, torch.randint(0, len(names), (int(empty.sum()),), generator=g)] = True
    captions = []
    for row, m in zip(values.tolist(), mask.tolist(), strict=True):
        phrases = [
            toy.toy_phrase(a, attributes[a][v]) for a, v, keep in zip(names, row, m, strict=True) if keep
        ]
        order = torch.randperm(len(phrases), generator=g).tolist()
        captions.append(" , ".join(phrases[i] for i in order))
    return captions, mask


def consistent(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: caption j is true of image i (every phrase it names matches image i's value)."""
    agree = values[:, None, :] == values[None, :, :]  # (N_img, N_cap, A)
    return (agree | ~mask[None, :, :]).all(-1)


def soft_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform distribution over each row's positives."""
    target = positives.float() / positives.float().sum(1, keepdim=True)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def losses(
    model,
    heads,
    pixel_values,
    input_ids,
    attention_mask,
    values,
    mask,
    tau_img: float = 0.1,
    head_weights: torch.Tensor | None = None,
) -> dict:
    """pixel_values (2B, 3, S, S) with views of identity k at rows 2k, 2k+1; captions (2B, L); labels (2B, A).

    ``head_weights`` (A,): weights of the attribute heads' losses (default all 1), summed and divided by A."""
    img = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)  # (2B, D)
    txt = F.normalize(
        model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output, dim=-1
    )
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # (2B images, 2B captions)
    pos = consistent(values, mask)  # (2B, 2B)
    clip_loss = (soft_ce(logits, pos) + soft_ce(logits.T, pos.T)) / 2
    # image-image: each render's positive is the other view of its identity
    sims = img @ img.T / tau_img  # (2B, 2B)
    sims = sims - torch.eye(len(img)) * 1e4  # never yourself
    partner = torch.arange(len(img)) ^ 1  # 0<->1, 2<->3, ...
    ident_loss = F.cross_entropy(sims, partner)
    aux = 0.0
    if heads:
        w = torch.ones(len(heads)) if head_weights is None else head_weights
        aux = sum(w[a] * F.cross_entropy(h(img), values[:, a]) for a, h in enumerate(heads)) / len(heads)
    return dict(clip=clip_loss, identity=ident_loss, aux=aux)


def pick_pair(mouth: torch.Tensor, g: torch.Generator, same_mouth: bool = True) -> torch.Tensor:
    """Two different views of one identity, with the same mouth state when there are such views
    (``same_mouth``).

    The image-image term makes the two views' embeddings alike; pairing an open mouth with a closed one from
    the start would teach the encoder to ignore the mouth, which the captions ask it to see. Once the mouth is
    learned, pairs across mouth states (``same_mouth=False``) teach retrieval to look past it.
    """
    first = int(torch.randint(0, len(mouth), (1,), generator=g))
    same = [v for v in range(len(mouth)) if v != first and (mouth[v] == mouth[first] or not same_mouth)]
    pool = same or [v for v in range(len(mouth)) if v != first]
    return torch.tensor([first, pool[int(torch.randint(0, len(pool), (1,), generator=g))]])


def to_pixel_values(crops_u8: torch.Tensor, preprocess: C.ClipPreprocess) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, S, S) with the CLIP preprocessing."""
    return preprocess(V.images_from_uint8(crops_u8))  # (N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]


# what save_atomic writes in a CLIP or image-encoder folder (a folder holding anything else is not replaced)
CLIP_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "train_log.json",
)


def save_atomic(
    model: CLIPModel, tokenizer, out: Path, encoder_out: Path | None, log: dict, resize: int = RESIZE
) -> None:
    """Write the CLIP folder (and the image-encoder folder) beside their targets, then swap them in; a
    target that holds files this script does not write is refused, not replaced."""
    crop = model.config.vision_config.image_size
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop}
    )
    for folder, write in ((out, "clip"), (encoder_out, "encoder")):
        if folder is None:
            continue
        tmp = files.staging_folder(folder)
        try:
            if write == "clip":
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            else:
                C.vision_tower_of(model).save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
            files.publish_folder(tmp, folder, CLIP_FILES)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def train(
    out: Path | None = DEFAULT_OUT,
    encoder_out: Path | None = DEFAULT_ENCODER_OUT,
    minutes: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    n_identities: int = 3000,
    views: int = 4,
    batch_identities: int = 48,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    aux_weight: float = 0.5,
    identity_weight: float = 0.25,
    mouth_weight: float = 0.0,
    same_mouth_pairs: bool = True,
    resize: int = RESIZE,
    eval_every: int | None = 200,
    eval_identities: int = 100,
    threads: int = 1,
    progress: bool = True,
    data: dict | None = None,
    init: Path | None = None,
) -> dict:
    """Train and save; returns the log (held-out zero-shot/retrieval curve against steps, losses).

    The run lasts ``max_steps`` steps (reproducible) or, for a quick try, ``minutes`` (whichever comes first
    when both are given); the cosine schedule runs over it. ``data``: a :func:`eval_toy_models.render_stills`
    dict (identities with ``views`` adjacent renders each) to skip rendering (tests); evaluation (every
    ``eval_every`` steps) is skipped when ``eval_every`` is None. With ``out``, a resumable state
    ``<out>.state.safetensors`` + ``.json`` is written at each evaluation and removed at the end; a call with
    the same settings continues from it.
    """
    if max_steps is None and minutes is None:
        raise ValueError("give max_steps (a reproducible run) or minutes (a quick, time-budgeted try)")
    for folder in (out, encoder_out):  # refused now, not after the training
        if folder is not None:
            files.check_output_folder(folder, CLIP_FILES, what="output folder")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    data = E.render_stills("train", n_identities, views=views, seed=seed) if data is None else data
    attributes = toy.toy_caption_attributes()
    values_all = label_matrix(data["labels"], attributes)  # (N, A)
    n_ids = int(data["identity"].max()) + 1
    views = len(data["identity"]) // n_ids
    mouth_all = values_all[:, list(attributes).index("mouth")].reshape(n_ids, views)  # (n_ids, views)
    preprocess = C.ClipPreprocess(size=resize, crop_size=CROP)
    head_weights = torch.ones(len(attributes))
    head_weights[list(attributes).index("mouth")] += mouth_weight
    images_u8 = torch.as_tensor(data["images"])  # (N, 128, 128, 3) uint8; preprocessed per batch
    if init is None:
        tokenizer = C.build_word_tokenizer(toy.toy_vocabulary(), model_max_length=MAX_TOKENS)
        model = CLIPModel(clip_config(len(tokenizer))).train()
    else:  # continue from a saved folder (a second stage; the attribute heads start afresh)
        model, tokenizer = C.load_clip(init)
        model.requires_grad_(True).train()
    heads = nn.ModuleList([nn.Linear(model.config.projection_dim, len(v)) for v in attributes.values()])
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    log = dict(
        seed=seed,
        n_params=sum(p.numel() for p in model.parameters()),
        n_images=len(images_u8),
        n_identities=n_ids,
        views=views,
        batch_images=2 * batch_identities,
        lr=lr,
        warmup_steps=warmup_steps,
        aux_weight=aux_weight,
        identity_weight=identity_weight,
        mouth_weight=mouth_weight,
        same_mouth_pairs=same_mouth_pairs,
        minutes=minutes,
        max_steps=max_steps,
        init=None if init is None else repo_relative(init),
        resize=resize,
        crop=CROP,
        patch=PATCH,
        eval_every=eval_every,
        eval_identities=eval_identities,
        curve=[],
        losses=[],
    )
    if init is not None and (Path(init) / "train_log.json").is_file():  # keep the earlier stage's record
        earlier = json.loads((Path(init) / "train_log.json").read_text())
        log["earlier_stages"] = earlier.pop("earlier_stages", []) + [
            {k: v for k, v in earlier.items() if k != "losses"}
        ]
    settings = {k: v for k, v in log.items() if k not in ("curve", "losses", "earlier_stages")}
    state_path = None if out is None else Path(out).with_name(Path(out).name + ".state.safetensors")
    step, elapsed_before = 0, 0.0
    if state_path is not None and state_path.is_file():
        state = files.load_state(state_path)  # safetensors + JSON: reading it runs no code
        if state["settings"] != settings:
            raise ValueError(
                f"{state_path} holds a run with other settings ({state['settings']}); delete it to start over"
            )
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        step, elapsed_before, log = state["step"], state["elapsed_s"], state["log"]
        print(f"resuming {repo_relative(out)} at step {step}", flush=True)
    t0 = time.time() - elapsed_before
    bar = tqdm(
        total=max_steps, initial=step, disable=not progress, desc="toy CLIP", unit="step", mininterval=30
    )
    while True:
        frac = max(
            (time.time() - t0) / (minutes * 60) if minutes is not None else 0.0,
            step / max_steps if max_steps is not None else 0.0,
        )
        if frac >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * frac))
        # a batch: B identities, two different views of each, adjacent rows
        ids = torch.randperm(n_ids, generator=g)[:batch_identities]
        two = torch.stack([pick_pair(mouth_all[i], g, same_mouth_pairs) for i in ids.tolist()])  # (B, 2)
        rows = (ids[:, None] * views + two).flatten()  # (2B,)
        values = values_all[rows]
        captions, mask = sample_captions(values, attributes, g)
        tok = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        pixel_values = to_pixel_values(images_u8[rows], preprocess)  # (2B, 3, 96, 96)
        parts = losses(
            model,
            heads if aux_weight else None,
            pixel_values,
            tok["input_ids"],
            tok["attention_mask"],
            values,
            mask,
            head_weights=head_weights,
        )
        loss = parts["clip"] + identity_weight * parts["identity"] + aux_weight * parts["aux"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        log["losses"].append(
            {k: round(float(v.detach() if torch.is_tensor(v) else v), 4) for k, v in parts.items()}
        )
        bar.update(1)
        bar.set_postfix(clip=f"{parts['clip'].item():.3f}", ident=f"{parts['identity'].item():.3f}")
        if eval_every is not None and step % eval_every == 0 and (max_steps is None or step < max_steps):
            log["curve"].append(evaluate(model, tokenizer, step, t0, eval_identities, preprocess))
            bar.write(json.dumps(log["curve"][-1]))
            if out is not None:
                save_atomic(model, tokenizer, out, encoder_out, log | dict(steps=step), resize)
                state = dict(
                    settings=settings,
                    step=step,
                    elapsed_s=time.time() - t0,
                    model=model.state_dict(),
                    heads=heads.state_dict(),
                    opt=opt.state_dict(),
                    generator=g.get_state(),
                    log=log,
                )
                files.save_state(state, state_path)
            model.train()
    bar.close()
    log["steps"] = step
    if eval_every is not None:
        log["curve"].append(evaluate(model, tokenizer, step, t0, eval_identities, preprocess))
        print(json.dumps(log["curve"][-1]), flush=True)
    model.eval()
    if out is not None:
        save_atomic(model, tokenizer, out, encoder_out, log, resize)
        for path in (state_path, state_path.with_suffix(".json")):
            if path.is_file():
                path.unlink()  # the training state this run wrote
    log["model"], log["tokenizer"] = model, tokenizer
    return log


@torch.no_grad()
def evaluate(model, tokenizer, step, t0, n_identities, preprocess) -> dict:
    model.eval()
    res = E.evaluate_clip(model, tokenizer, n_identities=n_identities, preprocess=preprocess)
    return dict(
        step=step,
        minutes=round((time.time() - t0) / 60, 2),
        **res["zero_shot"],
        retrieval=res["retrieval_top1_clip"],
        retrieval_pixels=res["retrieval_top1_pixels"],
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--encoder-out", default=str(DEFAULT_ENCODER_OUT), help="image-tower folder, or 'none' to skip it"
    )
    p.add_argument("--max-steps", type=int, default=None, help="training steps (a reproducible run)")
    p.add_argument("--minutes", type=float, default=None, help="a time budget instead (quick tries only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-identities", type=int, default=3000)
    p.add_argument("--batch-identities", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--identity-weight", type=float, default=0.25)
    p.add_argument("--mouth-weight", type=float, default=0.0, help="extra weight of the mouth attribute head")
    p.add_argument("--any-pairs", action="store_true", help="identity pairs may differ in mouth state")
    p.add_argument("--resize", type=int, default=RESIZE, help="shortest edge before the 96-px centre crop")
    p.add_argument("--init", type=Path, default=None, help="continue training from this saved CLIP folder")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    p.add_argument("--eval-identities", type=int, default=100, help="held-out identities per evaluation")
    args = p.parse_args(argv)
    if args.max_steps is None and args.minutes is None:
        p.error("give --max-steps (reproducible) or --minutes (a quick try)")
    train(
        args.out,
        None if args.encoder_out.lower() == "none" else Path(args.encoder_out),
        args.minutes,
        args.max_steps,
        args.seed,
        args.n_identities,
        batch_identities=args.batch_identities,
        lr=args.lr,
        aux_weight=args.aux_weight,
        identity_weight=args.identity_weight,
        mouth_weight=args.mouth_weight,
        same_mouth_pairs=not args.any_pairs,
        resize=args.resize,
        eval_every=args.eval_every,
        eval_identities=args.eval_identities,
        threads=args.threads,
        init=args.init,
    )


if __name__ == "__main__":
    main()
