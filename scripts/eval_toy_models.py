"""Measure the committed toy VAE and toy CLIP on held-out identities (and hold the toy-data helper the
training scripts share).

    .venv/bin/python scripts/eval_toy_models.py            # both models, the numbers quoted in the chapters
    .venv/bin/python scripts/eval_toy_models.py --only clip

VAE: PSNR of mean-latent reconstructions of full 128-px frames of held-out identities.
CLIP: zero-shot accuracy per attribute (the prompt is the attribute's phrase, e.g. "red hair"; the predicted
value is the most similar prompt) and same-identity retrieval across poses (top-1 over a gallery of other
renders), next to the nearest-neighbour-on-pixels baseline (32x32 pixels, cosine).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.nn import functional as F

from anim_lab import clip as C
from anim_lab import metrics as M
from anim_lab import toy
from anim_lab import vae as V
from anim_lab.toy import renderer as R

# The expression states the captions name, and the ranges they are drawn from (clearly apart, so labels are
# clean).
MOUTH_OPEN, MOUTH_CLOSED = (0.55, 1.0), (0.0, 0.05)
EYES_CLOSED, EYES_OPEN = (0.9, 1.0), (0.0, 0.1)


def identity_seeds(split: str, n: int, seed: int = 0) -> list[int]:
    """``n`` identity seeds of a split of the toy world (``toy.identity_split``), drawn without
    replacement."""
    seeds = np.asarray(list(toy.identity_split(split)))
    if n > len(seeds):
        raise ValueError(f"the {split!r} split has {len(seeds)} identities, asked for {n}")
    return [int(s) for s in np.random.default_rng(seed).choice(seeds, size=n, replace=False)]


def random_pose(rng: np.random.Generator) -> R.HeadPose:
    return R.HeadPose(
        yaw=rng.uniform(-25, 25),
        pitch=rng.uniform(-12, 12),
        roll=rng.uniform(-10, 10),
        tx=rng.uniform(-0.06, 0.06),
        ty=rng.uniform(-0.05, 0.05),
        scale=rng.uniform(0.9, 1.1),
    )


def random_expression(rng: np.random.Generator) -> tuple[R.Expression, dict]:
    """An expression with clean open/closed labels for mouth and eyes (smile is free)."""
    mouth_open = bool(rng.random() < 0.5)
    eyes_closed = bool(rng.random() < 0.3)
    expr = R.Expression(
        mouth_open=float(rng.uniform(*(MOUTH_OPEN if mouth_open else MOUTH_CLOSED))),
        blink=float(rng.uniform(*(EYES_CLOSED if eyes_closed else EYES_OPEN))),
        smile=float(rng.uniform(0, 1)),
    )
    return expr, {"mouth": "open" if mouth_open else "closed", "eyelids": "closed" if eyes_closed else "open"}


def render_stills(split: str, n_identities: int, views: int = 1, seed: int = 0, size: int = 128) -> dict:
    """Render ``views`` random poses/expressions of ``n_identities`` identities of a split.

    Returns ``images`` uint8 (N, H, W, 3) with N = n_identities * views (views of one identity adjacent),
    ``identity`` (N,) int index of the identity, ``labels`` list of N dicts attribute -> value (the identity's
    categorical attributes plus ``mouth`` and ``eyelids``), ``landmarks`` float32 (N, 478, 2).
    """
    rng = np.random.default_rng(seed)
    images, ids, labels, lms = [], [], [], []
    for k, s in enumerate(identity_seeds(split, n_identities, seed)):
        ident = R.identity_from_seed(s)
        for _ in range(views):
            expr, state = random_expression(rng)
            img, lm = R.render(ident, random_pose(rng), expr, size=size, seed=int(rng.integers(1 << 30)))
            images.append(img)
            lms.append(lm)
            ids.append(k)
            labels.append({name: getattr(ident, name) for name in R.ATTRIBUTES} | state)
    return dict(images=np.stack(images), identity=np.array(ids), labels=labels, landmarks=np.stack(lms))


# --- VAE ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_vae(vae=None, n: int = 64, seed: int = 123) -> dict:
    """Mean and min PSNR (dB) of reconstructions (mean latents) of ``n`` full 128-px held-out frames."""
    vae = V.load_toy_vae() if vae is None else vae
    images = V.images_from_uint8(render_stills("test", n, seed=seed)["images"])
    values = torch.cat(
        [
            M.psnr(V.decode(vae, V.encode(vae, images[i : i + 32])), images[i : i + 32])
            for i in range(0, n, 32)
        ]
    )
    return dict(psnr_mean=round(float(values.mean()), 2), psnr_min=round(float(values.min()), 2), n=n)


# --- CLIP ---------------------------------------------------------------------------------------------------
def retrieval_top1(embeds: torch.Tensor, identity: torch.Tensor) -> float:
    """Each item queries all the others (cosine); a hit if the most similar one has the same identity."""
    sims = C.cosine_similarity_matrix(embeds, embeds)  # (N, N)
    sims.fill_diagonal_(-2.0)  # never retrieve yourself
    return float((identity[sims.argmax(1)] == identity).float().mean())


@torch.no_grad()
def evaluate_clip(
    model=None, tokenizer=None, n_identities: int = 100, views: int = 4, seed: int = 321, preprocess=None
) -> dict:
    """Zero-shot accuracy per attribute, identity retrieval top-1 (CLIP vs pixels) on held-out identities.

    ``preprocess``: a :class:`~anim_lab.clip.ClipPreprocess`; default the committed toy CLIP's."""
    if model is None:
        model, tokenizer = C.load_toy_clip()
    data = render_stills("test", n_identities, views=views, seed=seed)
    images = V.images_from_uint8(data["images"])
    preprocess = toy_clip_preprocess() if preprocess is None else preprocess
    pixel_values = preprocess(images)  # (N, 3, S, S)
    image_embeds = torch.cat(
        [
            model.get_image_features(pixel_values=pixel_values[i : i + 100]).pooler_output
            for i in range(0, len(images), 100)
        ]
    )  # (N, D)
    result = {"zero_shot": {}, "n_images": len(images)}
    for attr, values in caption_attributes().items():
        prompts = [toy.toy_phrase(attr, v) for v in values]
        text = C.encode_text(model, tokenizer, prompts)  # (K, D)
        pred = C.cosine_similarity_matrix(image_embeds, text).argmax(1)  # (N,)
        truth = torch.tensor([values.index(lab[attr]) for lab in data["labels"]])
        result["zero_shot"][attr] = round(float((pred == truth).float().mean()), 4)
    identity = torch.as_tensor(data["identity"])
    result["retrieval_top1_clip"] = round(retrieval_top1(image_embeds, identity), 4)
    pixels = F.interpolate(images, size=(32, 32), mode="area").flatten(1)  # (N, 3*32*32)
    result["retrieval_top1_pixels"] = round(retrieval_top1(pixels - pixels.mean(0), identity), 4)
    return result


def caption_attributes() -> dict[str, tuple[str, ...]]:
    """The attributes the toy CLIP's captions name, and their values."""
    return toy.toy_caption_attributes()


def toy_clip_preprocess() -> C.ClipPreprocess:
    """The preprocessing the committed toy CLIP was trained with (its ``preprocessor_config.json``)."""
    return C.ClipPreprocess.from_folder(C.TOY_CLIP_DIR)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["vae", "clip"], default=None)
    p.add_argument("--n-vae", type=int, default=256)
    p.add_argument("--n-identities", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = {}
    if args.only in (None, "vae"):
        out["vae"] = evaluate_vae(n=args.n_vae)
    if args.only in (None, "clip"):
        out["clip"] = evaluate_clip(n_identities=args.n_identities)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
