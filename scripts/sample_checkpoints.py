"""Samples of the toy animator at checkpoints along its training, on one held-out case, into one small file.

Only the final weights live in the working tree; earlier ones live in git history (every commit of
``anim_lab/assets/toy_animator``). This script animates the same held-out case with each weights folder it is
given and stores the frames, so chapter 10 can show the model at each checkpoint without the weights:

    for c in ef21d3b 3e4c971; do
        mkdir -p runs/history/$c && git archive $c anim_lab/assets/toy_animator | tar -x -C runs/history/$c
    done
    PYTHONPATH=$PWD .venv/bin/python scripts/sample_checkpoints.py \\
        --weights "v1, stage 1 step 2700=runs/history/ef21d3b/anim_lab/assets/toy_animator" \\
        --weights "v1, final=runs/history/3e4c971/anim_lab/assets/toy_animator" \\
        --weights "v2, stage 1 step 2600=runs/animator_v2/snap_ema_2600" \\
        --weights "v2, stage 1 step 8000=runs/animator_v2/s1_ema_8000" \\
        --weights "final=anim_lab/assets/toy_animator" \\
        --vae history/toy_vae_v1 --image-encoder anim_lab/assets/toy_animator/image_encoder \\
        --out anim_lab/assets/toy_animator/samples_along_training.npz

(v1: the first version, trained on the toy VAE v1's latents, decoding with it; ef21d3b's folder is a legacy
one, given v1's VAE and the image encoder. v2: the retrain on the VAE v2's latents, its EMA weights at two
stage-1 checkpoints; the runs were under ``/work/runs`` then, as the file's ``command`` records.)

The case and settings are chapter 10's: ``eval_animator.make_cases(1, 24)[0]``, frames 0 / 7 / 15 / 23, 8 DDIM
steps, guidance 3.5, seed 42. A folder without ``image_encoder/`` (written before the weights carried their
frozen encoder) is given ``--image-encoder``, the encoder every run was trained with. A pipeline folder
(``model_index.json``) loads with :func:`anim_lab.toy.load_animator`; the folders in git history from before
the toy animator became one are read by :func:`legacy_animator`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import anim_lab
from anim_lab import metrics as M
from anim_lab.clip import load_image_encoder
from anim_lab.guidance import build_scheduler
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.pose_guider import PoseGuider
from anim_lab.toy import TOY_ANIMATOR_DIR, load_animator
from anim_lab.unet import ReferenceUNet, VideoUNet
from anim_lab.vae import load_vae
from anim_lab.weights import load_checkpoint, load_into, realign

PICK = [0, 7, 15, 23]  # frames of the 24-frame case
SETTINGS = {"steps": 8, "cfg": 3.5, "seed": 42}


def the_case():
    """Chapter 10's held-out case, cut to the frames in PICK."""
    E = anim_lab.load_script("eval_animator")
    full = E.make_cases(1, num_frames=24)[0]
    return E, E.Case(full.reference, full.poses[PICK], full.truth[PICK], full.landmarks[PICK])


def legacy_animator(folder: Path, image_encoder: Path, vae: Path) -> Pose2VideoPipeline:
    """A toy-animator folder from git history, written before it became a pipeline folder: the three
    networks' subfolders only (the UNets' config.json already diffusers configs, the guider's arguments under
    "kwargs"), with the VAE it was trained on (``vae``) and the DDIM scheduler it was sampled with."""
    for name in ("reference_unet", "denoising_unet", "pose_guider"):
        for file in ("config.json", "diffusion_pytorch_model.safetensors"):
            if not (folder / name / file).is_file():
                raise FileNotFoundError(f"{folder / name / file} is missing: not a toy-animator folder")
    config = json.loads((folder / "pose_guider" / "config.json").read_text())
    guider = PoseGuider(**config.get("kwargs", {k: v for k, v in config.items() if not k.startswith("_")}))
    load_into(guider, load_checkpoint(folder / "pose_guider" / "diffusion_pytorch_model.safetensors"))
    own = folder / "image_encoder"  # an early folder without one borrows the frozen encoder
    pipe = Pose2VideoPipeline(
        vae=load_vae(vae),  # the VAE these networks were trained on (v1 for every legacy folder)
        image_encoder=load_image_encoder(own if own.is_dir() else image_encoder),
        reference_unet=ReferenceUNet.from_pretrained(folder / "reference_unet"),
        denoising_unet=VideoUNet.from_pretrained(folder / "denoising_unet"),
        pose_guider=guider,
        scheduler=build_scheduler("scaled_linear"),
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            realign(module).eval().requires_grad_(False)  # as load_animator: the same kernels, the same sums
    return pipe


def sample(folder: Path, image_encoder: Path, vae: Path, E, case) -> np.ndarray:
    """The case animated by the weights in ``folder`` -> (len(PICK), H, W, 3) uint8."""
    if (folder / "model_index.json").is_file():
        pipe = load_animator(folder)
    else:
        pipe = legacy_animator(folder, image_encoder, vae)
    pipe.set_progress_bar_config(disable=True)
    return E.generate(pipe, case, **SETTINGS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--weights",
        action="append",
        required=True,
        metavar="LABEL=DIR",
        help="a toy-animator weights folder and its label (repeat, oldest first)",
    )
    p.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    p.add_argument(
        "--image-encoder",
        type=Path,
        default=TOY_ANIMATOR_DIR / "image_encoder",
        help="for folders without image_encoder/ (default: the committed animator's)",
    )
    p.add_argument(
        "--vae",
        type=Path,
        default=TOY_ANIMATOR_DIR / "vae",
        help="for folders without vae/: the VAE they were trained on (default: the committed animator's; "
        "folders from before the animator's retrain on the v2 VAE need the v1 VAE of their commit's history)",
    )
    args = p.parse_args(argv)
    args.runs = []
    for item in args.weights:
        label, sep, folder = item.rpartition("=")
        if not sep or not label or not folder:
            p.error(f"--weights must be LABEL=DIR, got {item!r}")
        if not Path(folder).is_dir():
            p.error(f"--weights {item!r}: {folder} is not a folder")
        args.runs.append((label, Path(folder)))
    if args.out.suffix != ".npz":
        p.error(f"--out must end in .npz, got {args.out}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    E, case = the_case()
    frames = []
    for label, folder in args.runs:
        try:
            frames.append(sample(folder, args.image_encoder, args.vae, E, case))
        except (OSError, ValueError) as err:
            print(f"sample_checkpoints: error: {label}: {err}", file=sys.stderr)
            return 2
        psnr = float(M.psnr(M.video_from_uint8(frames[-1]), M.video_from_uint8(case.truth)).mean())
        print(f"{label:40s} PSNR against the ground truth {psnr:.2f} dB")
    settings = dict(SETTINGS, frames=PICK, case="eval_animator.make_cases(1, 24)[0]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.stem}.tmp.npz")
    np.savez_compressed(
        tmp,
        labels=np.array([label for label, _ in args.runs]),
        frames=np.stack(frames),  # (K, len(PICK), H, W, 3) uint8
        settings=np.array(json.dumps(settings)),
        command=np.array(
            " ".join(["scripts/sample_checkpoints.py", *(argv if argv is not None else sys.argv[1:])])
        ),
    )
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
