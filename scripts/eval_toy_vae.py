"""Score toy VAEs side by side on held-out renders: what the issue "Sharper toy autoencoders" asks of them.

    .venv/bin/python scripts/eval_toy_vae.py                                  # the package's toy VAE
    .venv/bin/python scripts/eval_toy_vae.py --vae v1=history/toy_vae_v1 --vae v2=anim_lab/assets/toy_vae \\
        --json results/toy_vae.json

The held-out set is the one ``scripts/train_toy_vae.py`` evaluates on while it trains: 64 identities of the
test split at 128 px, one random pose and expression each (``render_stills("test", 64, seed=10000)``, the
training script's seed 0). Each VAE reconstructs them from the mean latent, and every metric is
``anim_lab.metrics``':

- ``psnr``, ``ssim``, ``sharpness`` (variance of the luminance Laplacian, reconstruction / ground truth),
  ``colour`` (the mean colour's drift, 8-bit levels) and ``face_colour`` (the same inside the face oval of the
  render's own landmarks);
- ``detect`` / ``face_px``: mediapipe's face mesh on the reconstructions upscaled to 256 px (bicubic): the
  share of faces found, and the mean distance (256-px pixels) of its 478 landmarks to the renderer's.
The ``ground truth`` row is mediapipe on the renders themselves: the floor of ``face_px``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import anim_lab
from anim_lab import metrics as M
from anim_lab import vae as V
from anim_lab.files import check_output_file, write_result
from anim_lab.landmarks import face_mask, landmark_errors

COLUMNS = ("psnr", "ssim", "sharpness", "colour", "face_colour", "detect", "face_px")


def held_out(n: int = 64, seed: int = 10_000) -> dict:
    """The training script's evaluation renders: uint8 images (N, 128, 128, 3) and landmarks (N, 478, 2)."""
    return anim_lab.load_script("eval_toy_models").render_stills("test", n, seed=seed)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Mean-latent reconstructions of (N, 3, H, W) in [-1, 1], clamped."""
    parts = [
        V.decode(vae, V.encode(vae, images[i : i + batch_size])) for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts).clamp(-1, 1)


def score(recon: torch.Tensor, images: torch.Tensor, landmarks: np.ndarray) -> dict:
    """The row of one VAE (or, with recon = images, of the ground truth)."""
    masks = torch.from_numpy(np.stack([face_mask(p, images.shape[-2], images.shape[-1]) for p in landmarks]))
    errors = landmark_errors(V.images_to_uint8(recon), landmarks)  # (N,) 256-px pixels, NaN: no face
    found = errors[~np.isnan(errors)]
    same = torch.equal(recon, images)
    return {
        "psnr": None if same else float(M.psnr(recon, images).mean()),
        "ssim": float(M.ssim(recon, images).mean()),
        "sharpness": M.sharpness_ratio(recon, images),
        "colour": float(M.colour_error(recon, images).mean()),
        "face_colour": float(M.colour_error(recon, images, masks).mean()),
        "detect": len(found) / len(errors),
        "face_px": float(np.mean(found)) if len(found) else None,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vae", action="append", default=[], metavar="NAME=FOLDER", help="a VAE folder to score (repeatable)"
    )
    parser.add_argument("--n", type=int, default=64, help="held-out renders")
    parser.add_argument("--json", help="also write the table here (e.g. results/toy_vae.json)")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, (".json",), what="--json file")
    folders = dict(v.split("=", 1) for v in args.vae) if args.vae else {"toy VAE": str(V.TOY_VAE_DIR)}
    torch.set_num_threads(1)
    data = held_out(args.n)
    images = V.images_from_uint8(data["images"])  # (N, 3, 128, 128) in [-1, 1]
    rows = {"ground truth": score(images, images, data["landmarks"])}
    for name, folder in folders.items():
        vae = V.load_vae(folder)
        rows[name] = score(reconstruct(vae, images), images, data["landmarks"])
        rows[name]["scaling_factor"] = float(vae.config.scaling_factor)
    head = f"{'':16}" + "".join(f"{c:>12}" for c in COLUMNS)
    print(f"{args.n} held-out renders at 128 px (mediapipe at 256 px)\n{head}")
    for name, r in rows.items():
        cells = ["-" if r[c] is None else f"{r[c]:.3f}" for c in COLUMNS]
        print(f"{name:16}" + "".join(f"{c:>12}" for c in cells))
    if args.json:
        write_result(
            args.json, {"command": " ".join(["scripts/eval_toy_vae.py", *sys.argv[1:]]), "rows": rows}
        )
    return rows


if __name__ == "__main__":
    main()
