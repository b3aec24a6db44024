"""The ``anim-lab`` command.

    anim-lab video2pose IN.mp4 OUT.mp4            face landmarks of a video drawn as pose images (Video2Pose)
    anim-lab video2video --ref face.png --driving talk.mp4 --out pose.mp4     the driving motion retargeted
    anim-lab animate --ref face.png --driving talk.mp4 --weights DIR --out out.mp4
    anim-lab demo [--out-dir out/demo]            the toy animator on a held-out toy identity (offline)
    anim-lab video2video --ref face.png --driving talk.mp4 --out poses.mp4   retargeted pose video

Each subcommand is one ``add_*`` function (its arguments) and one function that runs it. Errors the user can
fix raise :class:`CliError`; ``main`` prints them without a traceback and exits with status 2. Outputs are
written to a temporary file and renamed at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from einops import rearrange

from . import landmarks, video
from .files import OutputError, check_output_file, check_output_folder, publish_folder, staging_folder
from .pipelines import Pose2VideoPipeline, save_video
from .retarget import video2video_command
from .vae import images_to_uint8

__all__ = [
    "CliError",
    "build_parser",
    "main",
    "animate",
    "video2pose",
    "video2video",
    "demo",
    "load_toy_animator",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("auto", "anim_lab", "animate_anyone", "aniportrait")


class CliError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""


def _notice(message: str) -> None:
    print(f"anim-lab: {message}", file=sys.stderr)


# --- shared checks ------------------------------------------------------------------------------------------
def _check_output(
    path: str, suffixes: tuple[str, ...] = video.VIDEO_SUFFIXES, inputs: dict | None = None
) -> Path:
    """The output file, checked before any work: not a folder, the right suffix, not one of ``inputs``, and a
    destination that can really be written (see :func:`anim_lab.files.check_output_file`)."""
    try:
        return check_output_file(path, suffixes, inputs=inputs, what="output")
    except OutputError as err:
        raise CliError(str(err)) from None


def _parse_size(text: str | None) -> tuple[int, int] | None:
    """'512' -> (512, 512); '512x384' -> (height 512, width 384)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise CliError(f"--size must be N or HxW in pixels (e.g. 512 or 768x512), got {text!r}")
    return (parts[0], parts[-1])


# --- video2pose ---------------------------------------------------------------------------------------------
def add_video2pose(subparsers) -> None:
    p = subparsers.add_parser(
        "video2pose",
        help="draw the face landmarks of a video as pose images (the driving input of `animate`)",
        description="Find the face in every frame of IN (mediapipe face mesh) and draw its landmarks as "
        "AniPortrait-style pose images into OUT (.mp4 or .gif), at the same frame rate, with IN's audio. "
        "Frames without a face reuse the last face found.",
    )
    p.add_argument("input", metavar="IN", help="the driving video (mp4, gif, anything ffmpeg reads)")
    p.add_argument("output", metavar="OUT", help="the pose video to write (.mp4 or .gif)")
    p.add_argument("--size", help="pose image size, N or HxW (default: the video's size)")
    p.add_argument("--no-audio", action="store_true", help="do not copy IN's audio into OUT")
    p.set_defaults(func=video2pose)


def video2pose(args: argparse.Namespace) -> Path:
    source = Path(args.input)
    if not source.is_file():
        raise CliError(f"no such video file: {source}")
    out = _check_output(args.output, inputs={"IN": source})
    try:
        points = landmarks.video_to_pose(source, out, size=_parse_size(args.size), audio=not args.no_audio)
    except landmarks.NoFaceError as err:
        raise CliError(f"{source}: {err}") from None
    except ValueError as err:
        raise CliError(f"{source}: {err}") from None
    _notice(f"wrote {len(points)} pose frames to {out}")
    return out


# --- video2video -------------------------------------------------------------------------------------------
def add_video2video(subparsers) -> None:
    v2v = subparsers.add_parser(
        "video2video",
        help="retarget a driving video's head pose and expression onto a reference face (pose video)",
        description=(
            "AniPortrait's Video2Video poses: the reference face's landmarks moved by the driving video's "
            "head pose and expression, drawn as pose images at the reference's size, with the driving "
            "video's fps and audio. (The pose video is what pose2video animates the reference with.)"
        ),
    )
    v2v.add_argument("--ref", required=True, help="reference portrait (png/jpg)")
    v2v.add_argument("--driving", required=True, help="driving video (mp4, gif, anything ffmpeg reads)")
    v2v.add_argument("--out", required=True, help="output pose video (.mp4 or .gif)")
    v2v.add_argument(
        "--on-missing",
        choices=("hold", "error"),
        default="hold",
        help="driving frames without a face: hold the last pose (default) or fail",
    )
    v2v.add_argument("--smooth", type=int, default=3, help="pose smoothing window in frames (1 = off)")
    v2v.add_argument(
        "--camera",
        choices=("orthographic", "perspective"),
        default="orthographic",
        help="projection: the camera the fit implies (default) or AniPortrait's perspective camera",
    )
    v2v.add_argument("--fov", type=float, default=63.0, help="perspective camera's vertical field of view")
    v2v.add_argument("--no-audio", action="store_true", help="do not carry the driving video's audio over")
    v2v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v2v.set_defaults(func=video2video)


def video2video(args: argparse.Namespace) -> int:
    _check_output(args.out, inputs={"--ref": args.ref, "--driving": args.driving})
    out = video2video_command(
        args.ref,
        args.driving,
        args.out,
        on_missing=args.on_missing,
        smooth=args.smooth,
        camera=args.camera,
        fov=args.fov,
        progress=not args.no_progress,
        audio=not args.no_audio,
    )
    print(f"wrote {out}")
    return 0


# --- animate ------------------------------------------------------------------------------------------------
def add_animate(subparsers) -> None:
    p = subparsers.add_parser(
        "animate",
        help="animate a portrait with a driving video or a folder of pose images",
        description="Make a video of the face in --ref moving like the driving input. A driving video first "
        "goes through Video2Pose (its face landmarks drawn as pose images); a folder of pose images is used "
        "as it is, in file-name order. The output keeps the driving video's frame rate and audio.",
    )
    p.add_argument("--ref", required=True, metavar="IMG", help="the reference portrait (png/jpg); one face")
    p.add_argument(
        "--driving",
        required=True,
        metavar="VIDEO|POSE_DIR",
        help="a driving video, or a folder of pose images",
    )
    p.add_argument("--out", required=True, metavar="OUT", help="the video to write: .mp4 or .gif")
    p.add_argument(
        "--weights",
        default="toy",
        metavar="toy|DIR",
        help="'toy' (the embedded toy animator, 128 px) or a folder: one saved by Pose2VideoPipeline."
        "save_pretrained, or the official AnimateAnyone / AniPortrait weight folder (see --layout)",
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUTS,
        help="how the --weights folder is organised; auto: anim_lab if it has model_index.json, "
        "else animate_anyone",
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument(
        "--cfg", type=float, default=3.5, help="guidance scale; 1 turns guidance off (default 3.5)"
    )
    p.add_argument("--seed", type=int, default=42, help="random seed: the same seed gives the same video")
    p.add_argument("--frames", type=int, help="how many driving frames to animate (default: all)")
    p.add_argument("--size", help="output size, N or HxW, multiples of 8 (default: the model's size)")
    p.add_argument("--fps", type=float, help="frame rate (default: the driving video's; 25 for a folder)")
    p.add_argument("--context-frames", type=int, default=24, help="frames per window (default 24)")
    p.add_argument("--context-overlap", type=int, default=4, help="frames shared by windows (default 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype", default="fp32", choices=sorted(DTYPES), help="fp16/bf16 need CUDA (default fp32)"
    )
    p.set_defaults(func=animate)


def _check_device(device: str, dtype: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise CliError(f"--device {device!r} is not a device name (use cpu or cuda)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if dev.type == "cpu" and dtype != "fp32":
        raise CliError(f"--dtype {dtype} needs a CUDA GPU; on the CPU use --dtype fp32")
    return dev


def _check_weights(weights: str, layout: str) -> tuple[Path, str]:
    if weights == "toy":  # the embedded toy animator (anim_lab/assets/toy_animator)
        return TOY_ANIMATOR_DIR, "toy"
    folder = Path(weights)
    if not folder.is_dir():
        raise CliError(f"--weights {folder}: no such folder")
    if layout == "auto":
        layout = "anim_lab" if (folder / "model_index.json").is_file() else "animate_anyone"
    return folder, layout


def _load_pipeline(folder: Path, layout: str, dtype: torch.dtype) -> Pose2VideoPipeline:
    if layout == "toy":
        return load_toy_animator(folder)
    try:
        if layout == "anim_lab":
            return Pose2VideoPipeline.from_pretrained(folder, torch_dtype=dtype)
        return Pose2VideoPipeline.from_official(folder, layout=layout, torch_dtype=dtype)
    except (FileNotFoundError, ValueError) as err:
        hint = ""
        if layout != "anim_lab" and (folder / "model_index.json").is_file():
            hint = " (this folder was saved by anim_lab: use --layout anim_lab or auto)"
        raise CliError(f"--weights {folder} (layout {layout}){hint}: {err}") from None


def _read_reference(path: str, size: tuple[int, int]) -> np.ndarray:
    ref_path = Path(path)
    if not ref_path.is_file():
        raise CliError(f"--ref {ref_path}: no such image file")
    try:
        with PIL.Image.open(ref_path) as im:
            ref = np.asarray(im.convert("RGB"))
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise CliError(f"--ref {ref_path} is not a readable image ({err})") from None
    try:
        landmarks.detect_landmarks(ref, name=f"the reference image {ref_path.name}")
    except landmarks.NoFaceError as err:
        raise CliError(f"{err}; the reference must show one face, front-facing") from None
    if ref.shape[:2] != size:
        _notice(f"resizing the reference image from {ref.shape[1]}x{ref.shape[0]} to {size[1]}x{size[0]}")
        ref = np.asarray(PIL.Image.fromarray(ref).resize((size[1], size[0]), PIL.Image.LANCZOS))
    return ref


def _read_pose_folder(folder: Path) -> list[np.ndarray]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"--driving {folder} has no pose images ({', '.join(IMAGE_SUFFIXES)}): zero frames")
    frames = []
    for f in files:
        with PIL.Image.open(f) as im:
            frames.append(np.asarray(im.convert("RGB")))
        if frames[-1].shape != frames[0].shape:
            raise CliError(
                f"--driving {folder}: {f.name} is {frames[-1].shape[1]}x{frames[-1].shape[0]} but "
                f"{files[0].name} is {frames[0].shape[1]}x{frames[0].shape[0]}; all pose images must have "
                "the same size"
            )
    return frames


def _driving_poses(driving: str, size: tuple[int, int]) -> tuple[list[np.ndarray], float | None, Path | None]:
    """(pose images (H, W, 3) uint8, fps or None, audio source or None) of a pose folder or a video."""
    path = Path(driving)
    if path.is_dir():
        return _read_pose_folder(path), None, None
    if not path.is_file():
        raise CliError(f"--driving {path}: no such video file or folder")
    try:
        reader = video.VideoReader(path)
        poses = []
        for frame, points in landmarks.landmark_stream(iter(reader), total=reader.num_frames):
            h, w = frame.shape[:2]
            scale = np.array([size[1] / w, size[0] / h])
            poses.append(landmarks.draw_pose_image((points + 0.5) * scale - 0.5, size[0], size[1]))
    except landmarks.NoFaceError as err:
        raise CliError(f"--driving {path}: {err}") from None
    except ValueError as err:  # unreadable video, no frames, frames of mixed sizes
        raise CliError(f"--driving {path}: {err}") from None
    return poses, reader.fps, path


def animate(args: argparse.Namespace) -> Path:
    # cheap checks first, so a mistake is reported before anything slow runs
    out = _check_output(args.out, inputs={"--ref": args.ref, "--driving": args.driving})
    device = _check_device(args.device, args.dtype)
    folder, layout = _check_weights(args.weights, args.layout)
    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    if args.frames is not None and args.frames < 1:
        raise CliError(f"--frames must be at least 1, got {args.frames}")
    pipe = _load_pipeline(folder, layout, DTYPES[args.dtype])
    default = pipe.denoising_unet.unet_kwargs.get("sample_size", 64) * pipe.vae_scale_factor
    size = _parse_size(args.size) or (default, default)
    if size[0] % pipe.vae_scale_factor or size[1] % pipe.vae_scale_factor:
        raise CliError(f"--size must be a multiple of {pipe.vae_scale_factor}, got {size[0]}x{size[1]}")

    ref = _read_reference(args.ref, size)
    poses, fps, audio_from = _driving_poses(args.driving, size)
    if args.frames is not None:
        if args.frames > len(poses):
            raise CliError(f"--frames {args.frames}: the driving input has only {len(poses)} frames")
        poses = poses[: args.frames]
    if poses[0].shape[:2] != size:
        _notice(
            f"resizing the pose images from {poses[0].shape[1]}x{poses[0].shape[0]} to {size[1]}x{size[0]}"
        )
    fps = args.fps or fps or 25.0

    pipe.to(device)
    result = pipe(
        ref,
        poses,
        height=size[0],
        width=size[1],
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        context_frames=args.context_frames,
        context_overlap=args.context_overlap,
        output_type="np",
    )
    audio = audio_from if out.suffix.lower() == ".mp4" else None
    save_video(result.frames, out, fps=fps, audio_from=audio)
    _notice(f"wrote {len(poses)} frames to {out}")
    return out


# --- demo: the toy animator, offline ------------------------------------------------------------------------
TOY_ANIMATOR_DIR = Path(__file__).resolve().parent / "assets" / "toy_animator"
_ANIMATOR_PARTS = ("reference_unet", "denoising_unet", "pose_guider")


def load_toy_animator(
    folder: str | os.PathLike = TOY_ANIMATOR_DIR,
    scheduler: str = "scaled_linear",
    image_encoder: str | os.PathLike | None = None,
):
    """The toy animator (weights written by scripts/train_animator.py) with the toy VAE and the frozen image
    encoder it was trained with (its ``image_encoder/``, as the official checkpoints ship one), as a
    Pose2VideoPipeline. ``scheduler``: the DDIM betas, "scaled_linear" (what the training used, EchoMimic's
    fix) or "linear" (the official inference configs). ``image_encoder``: another encoder folder, for weights
    written before they carried their own. Missing files and keys that do not fit the config are named in a
    :class:`CliError`."""
    from .clip import load_image_encoder
    from .guidance import build_scheduler
    from .pose_guider import PoseGuider
    from .unet import ReferenceUNet, VideoUNet
    from .vae import load_vae
    from .weights import load_checkpoint, load_into

    folder = Path(folder)
    encoder_dir = folder / "image_encoder" if image_encoder is None else Path(image_encoder)
    encoder_weights = encoder_dir / "model.safetensors"
    if not encoder_weights.is_file():
        raise CliError(
            f"the toy animator's {encoder_weights} is missing (the frozen image encoder it was trained "
            f"with); train it with scripts/train_animator.py (see {TOY_ANIMATOR_DIR.name}/COMMANDS.md) or "
            "restore the file from git"
        )
    parts = {}
    for name in _ANIMATOR_PARTS:
        config_path, weights_path = (
            folder / name / "config.json",
            folder / name / "diffusion_pytorch_model.safetensors",
        )
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CliError(
                    f"the toy animator's {path} is missing; train it with scripts/train_animator.py (see "
                    f"{TOY_ANIMATOR_DIR.name}/COMMANDS.md) or restore the file from git"
                )
        config = json.loads(config_path.read_text())
        if name == "reference_unet":
            module = ReferenceUNet(config["unet_kwargs"])
        elif name == "denoising_unet":
            module = VideoUNet(config["unet_kwargs"], config.get("motion_kwargs"))
        else:
            module = PoseGuider(**config["kwargs"])
        try:
            load_into(module, load_checkpoint(weights_path), what=str(weights_path))
        except ValueError as err:  # KeyMismatchError, CorruptWeightsError: the keys / the file named
            raise CliError(f"{err}\nthe weights do not match {config_path}") from None
        parts[name] = module.eval().requires_grad_(False)
    vae_dir = Path(__file__).resolve().parent / "assets" / "toy_vae"
    return Pose2VideoPipeline(
        vae=load_vae(vae_dir).requires_grad_(False),
        image_encoder=load_image_encoder(encoder_dir),
        scheduler=build_scheduler(scheduler),
        **parts,
    )


def demo_strip(reference, poses, generated, truth, columns: int = 6) -> np.ndarray:
    """(H, W, 3) reference and (F, H, W, 3) uint8 poses / generated / ground truth -> one PNG image: a row per
    chosen frame, reference | pose | generated | ground truth."""
    picks = np.linspace(0, len(generated) - 1, min(columns, len(generated))).round().astype(int)
    rows = [
        np.concatenate([reference, poses[i], generated[i], truth[i]], axis=1) for i in picks
    ]  # (H, 4W, 3)
    return np.concatenate(rows, axis=0)  # (k*H, 4W, 3)


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="animate a held-out toy identity with the embedded toy animator (offline, about a minute)",
        description="The main job on the toy world, with nothing to download: a toy identity the animator "
        "never saw is animated by a driving clip it never saw, with the embedded toy animator "
        "(anim_lab/assets/toy_animator). Writes demo.mp4, demo.gif and strip.png (reference | pose | "
        "generated | ground truth) to OUT_DIR.",
    )
    p.add_argument(
        "--out-dir", default="out/demo", metavar="OUT_DIR", help="folder to write (default out/demo)"
    )
    p.add_argument(
        "--weights", default=str(TOY_ANIMATOR_DIR), metavar="DIR", help="the toy animator's folder"
    )
    p.add_argument(
        "--identity", type=int, default=0, help="which held-out identity / driving clip (default 0)"
    )
    p.add_argument("--frames", type=int, default=12, help="frames to generate (default 12)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument(
        "--cfg",
        type=float,
        default=1.0,
        help="guidance scale (default 1, no CFG: the scale with the best PSNR on validation cases, see "
        "anim_lab/assets/toy_animator/COMMANDS.md; the official 3.5 suits the SD1.5-sized models)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--force",
        action="store_true",
        help="OUT_DIR may hold other files: replace only demo.mp4, demo.gif and strip.png there",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=demo)


DEMO_FILES = ("demo.mp4", "demo.gif", "strip.png")  # all that `demo` writes into its folder


def demo(args: argparse.Namespace) -> Path:
    import shutil

    from .toy import ToyPortraitDataset

    try:
        out = check_output_folder(
            args.out_dir, DEMO_FILES, force=args.force, inputs={"--weights": args.weights}, what="--out-dir"
        )
    except OutputError as err:
        raise CliError(str(err)) from None
    if args.frames < 1 or args.steps < 1:
        raise CliError(f"--frames and --steps must be at least 1, got {args.frames} and {args.steps}")
    pipe = load_toy_animator(args.weights)
    pipe.set_progress_bar_config(disable=args.no_progress)

    # a held-out identity (test split) and a driving clip drawn for it: the clip's render is the ground truth
    item = ToyPortraitDataset("test", 128, args.frames, length=args.identity + 1, seed=2026, fps=25.0)[
        args.identity
    ]
    reference = images_to_uint8(item["reference"])  # (3, H, W) -> (H, W, 3)
    truth = images_to_uint8(rearrange(item["frames"], "c f h w -> f c h w"))  # -> (F, H, W, 3)
    poses = (item["poses"].permute(1, 2, 3, 0) * 255).round().byte().numpy()  # (F, H, W, 3)
    frames = pipe(
        reference,
        list(poses),
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        context_frames=16,
        context_overlap=4,
        output_type="np",
    ).frames[0]  # (F, H, W, 3) in [0, 1]
    generated = (frames * 255).round().astype(np.uint8)

    tmp = staging_folder(out)
    try:
        save_video(generated, tmp / "demo.mp4", fps=12)
        save_video(generated, tmp / "demo.gif", fps=12)
        PIL.Image.fromarray(demo_strip(reference, poses, generated, truth)).save(tmp / "strip.png")
        publish_folder(tmp, out, DEMO_FILES, force=args.force)  # never removes what demo did not write
    except OutputError as err:
        raise CliError(str(err)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _notice(f"wrote {out}/demo.mp4, demo.gif and strip.png (reference | pose | generated | ground truth)")
    return out


# --- entry point --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anim-lab",
        description="Portrait animation from a reference image and a driving video (anim_lab).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_video2pose(subparsers)
    add_video2video(subparsers)
    add_animate(subparsers)
    add_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, ImportError) as err:  # NoFaceError is a ValueError
        parser.exit(2, f"anim-lab {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
