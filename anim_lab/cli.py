"""The ``anim-lab`` command.

    anim-lab video2pose IN.mp4 OUT.mp4            face landmarks of a video drawn as pose images (Video2Pose)
    anim-lab video2video --ref face.png --driving talk.mp4 --out pose.mp4     the driving motion retargeted
    anim-lab animate --ref face.png --driving talk.mp4 --weights DIR --out out.mp4
    anim-lab demo [--out-dir out/demo]            the toy animator on a held-out toy identity (offline)
    anim-lab audio2video --ref face.png --audio speech.wav --out talk.mp4   the portrait speaks (AniPortrait)
    anim-lab video2video --ref face.png --driving talk.mp4 --out poses.mp4   retargeted pose video

Each subcommand is one ``add_*`` function (its arguments) and one function that runs it. Errors the user can
fix raise :class:`CliError`; ``main`` prints them without a traceback and exits with status 2. Outputs are
written to a temporary file and renamed at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from einops import rearrange
from tqdm.auto import tqdm

from . import landmarks, retarget, video
from .errors import AnimLabError, InputError
from .files import OutputError, check_output_file, check_output_folder, publish_folder, staging_folder
from .pipelines import Pose2VideoPipeline
from .toy.animator import TOY_ANIMATOR_DIR, load_animator
from .vae import images_to_uint8
from .video import save_video
from .weights import load_official_pipeline

__all__ = [
    "CliError",
    "build_parser",
    "main",
    "animate",
    "video2pose",
    "video2video",
    "demo",
    "audio2video",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("auto", "anim_lab", "animate_anyone", "aniportrait")
MIN_SIZE = 32  # pixels: the smallest pose image, driving frame or output side accepted (a face needs room)
MAX_MISSING_SHARE = 0.25  # driving frames without a face held on the last pose: refused above this share
HIGH_CFG = 20.0  # guidance scales above this saturate colours: a notice says so


class CliError(AnimLabError):
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


def _parse_size(text: str | None, minimum: int = MIN_SIZE) -> tuple[int, int] | None:
    """'512' -> (512, 512); '512x384' -> (height 512, width 384); each side at least ``minimum``."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise CliError(f"--size must be N or HxW in pixels (e.g. 512 or 768x512), got {text!r}")
    if min(parts) < minimum:
        raise CliError(f"--size {text}: each side must be at least {minimum} px")
    return (parts[0], parts[-1])


def _check_seed(seed: int) -> int:
    if not 0 <= seed < 2**64:
        raise CliError(f"--seed must be between 0 and 2**64 - 1 (a torch generator's range), got {seed}")
    return seed


def _check_fps(fps: float | None) -> float | None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise CliError(f"--fps must be a positive number of frames per second, got {fps}")
    return fps


def _check_cfg(cfg: float) -> float:
    if not (math.isfinite(cfg) and cfg >= 0):
        raise CliError(f"--cfg must be a number >= 0 (1 = no guidance), got {cfg}")
    if cfg > HIGH_CFG:
        _notice(
            f"--cfg {cfg:g} is far above the usual 1-7.5: the guided prediction is extrapolated so far that "
            "many pixels saturate to pure colours"
        )
    return cfg


def _check_frame_size(height: int, width: int, what: str) -> None:
    if min(height, width) < MIN_SIZE:
        raise CliError(
            f"{what} is {width}x{height} px; anim-lab needs at least {MIN_SIZE}x{MIN_SIZE} (a face's "
            "landmarks need room to be drawn)"
        )


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
    size = _parse_size(args.size)
    try:
        reader = video.VideoReader(source)
    except InputError as err:
        raise CliError(f"{source}: {err}") from None
    _check_frame_size(reader.height, reader.width, f"the video {source}")
    try:
        points = landmarks.video_to_pose(source, out, size=size, audio=not args.no_audio)
    except InputError as err:  # no face, no frames, frames of mixed sizes
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
    out = _check_output(args.out, inputs={"--ref": args.ref, "--driving": args.driving})
    if args.smooth < 1:
        raise CliError(f"--smooth must be at least 1 frame (1 = no smoothing), got {args.smooth}")
    if not 0 < args.fov < 180:
        raise CliError(f"--fov must be between 0 and 180 degrees, got {args.fov}")
    out = video2video_command(
        args.ref,
        args.driving,
        out,
        on_missing=args.on_missing,
        smooth=args.smooth,
        camera=args.camera,
        fov=args.fov,
        progress=not args.no_progress,
        audio=not args.no_audio,
    )
    print(f"wrote {out}")
    return 0


def video2video_command(
    ref,
    driving,
    out,
    *,
    on_missing: str = "hold",
    smooth: int = retarget.SMOOTH_WINDOW,
    camera: str = "orthographic",
    fov: float = retarget.FOV_DEGREES,
    progress: bool = True,
    audio: bool = True,
) -> Path:
    """``anim-lab video2video``: a reference image + a driving video -> the retargeted pose video
    (:func:`anim_lab.retarget.video_to_video_poses`), drawn frame by frame into ``out``.

    The output has the driving video's fps and (mp4) audio and the reference image's size. It is written to a
    temporary file and renamed at the end, so a failure leaves nothing at ``out``. (The pose video is what
    the pose2video pipeline animates the reference with.)
    """
    # an output equal to an input, a folder, a wrong suffix, an unwritable place: refused before any work
    out = check_output_file(
        out, video.VIDEO_SUFFIXES, inputs={"--ref": ref, "--driving": driving}, what="--out"
    )
    image = _open_image(ref, "--ref")
    poses = retarget.video_to_video_poses(
        image, driving, on_missing=on_missing, smooth=smooth, camera=camera, fov=fov, progress=progress
    )
    audio_from = driving if audio and out.suffix.lower() == ".mp4" else None
    frames = poses.landmarks  # (F, 478, 2)
    if progress:
        frames = tqdm(frames, desc="pose frames", unit="frame")
    with video.VideoWriter(out, poses.fps, audio_from=audio_from) as writer:
        for points in frames:
            writer.write(landmarks.draw_pose_image(points, *poses.size))
    return out


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
        "--cfg",
        type=float,
        default=3.5,
        help="guidance scale (default 3.5); any value <= 1 turns guidance off: 0 and 1 give the same video",
    )
    p.add_argument("--seed", type=int, default=42, help="random seed: the same seed gives the same video")
    p.add_argument(
        "--frames", type=int, help="how many driving frames to animate (default: all); only these are read"
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help=f"accept a driving video where more than {MAX_MISSING_SHARE * 100:.0f}%% of the frames show no "
        "face (each such frame holds the last pose found)",
    )
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
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {device}: anim-lab generates on cpu or cuda, not on {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if dev.type == "cpu" and dtype != "fp32":
        raise CliError(f"--dtype {dtype} needs a CUDA GPU; on the CPU use --dtype fp32")
    return dev


def _check_weights(weights: str, layout: str) -> tuple[Path, str]:
    if weights == "toy":  # the embedded toy animator (anim_lab/assets/toy_animator)
        if layout != "auto":
            raise CliError(
                f"--layout {layout} is for a --weights folder; the embedded toy animator has one layout"
            )
        return TOY_ANIMATOR_DIR, "toy"
    folder = Path(weights)
    if not folder.is_dir():
        raise CliError(f"--weights {folder}: no such folder")
    if layout == "auto":
        layout = "anim_lab" if (folder / "model_index.json").is_file() else "animate_anyone"
    return folder, layout


def _load_pipeline(folder: Path, layout: str, dtype: torch.dtype) -> Pose2VideoPipeline:
    try:
        if layout == "toy":
            return load_animator(folder)
        if layout == "anim_lab":
            return Pose2VideoPipeline.from_pretrained(folder, torch_dtype=dtype)
        return load_official_pipeline(folder, layout=layout, torch_dtype=dtype)
    except (FileNotFoundError, InputError) as err:
        if layout == "toy":
            raise CliError(f"--weights toy: {err}") from None
        hint = ""
        if layout != "anim_lab" and (folder / "model_index.json").is_file():
            hint = " (this folder was saved by anim_lab: use --layout anim_lab or auto)"
        raise CliError(f"--weights {folder} (layout {layout}){hint}: {err}") from None


def _image_to_rgb(im: PIL.Image.Image, name: str) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB, as it is shown: EXIF orientation applied (phone photos), 16-bit
    greys scaled (not clipped to white), and any alpha channel dropped with a notice."""
    im = PIL.ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit (or 32-bit int) greys: 0..65535
        grey = np.asarray(im, dtype=np.float64)
        scale = 257.0 if grey.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        grey = np.clip(np.round(grey / scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        detail = " (every pixel is fully transparent: is this the right image?)" if not alpha.any() else ""
        _notice(f"{name} has an alpha channel; it is dropped and the stored colours are used{detail}")
    return np.asarray(im.convert("RGB"))


def _open_image(path, option: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB as it is shown (see :func:`_image_to_rgb`); a missing or
    unreadable file is a CliError naming ``option``."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{option} {path}: no such image file")
    try:
        with PIL.Image.open(path) as im:
            return _image_to_rgb(im, f"{option} {path.name}")
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise CliError(f"{option} {path} is not a readable image ({err})") from None


def _read_reference(path: str, size: tuple[int, int]) -> np.ndarray:
    ref_path = Path(path)
    ref = _open_image(ref_path, "--ref")
    _check_frame_size(*ref.shape[:2], f"--ref {ref_path.name}")
    try:
        with landmarks.FaceLandmarker(max_num_faces=4) as lm:
            faces = lm.detect_all(ref, name=f"the reference image {ref_path.name}")
    except landmarks.NoFaceError as err:
        raise CliError(f"{err}; the reference must show one face, front-facing") from None
    if len(faces) > 1:
        x0, y0 = faces[0].pixels.min(0).round().astype(int)
        x1, y1 = faces[0].pixels.max(0).round().astype(int)
        _notice(
            f"--ref {ref_path.name} shows {len(faces)} faces; the driving poses are drawn for one face, so "
            f"crop the image to it (mediapipe's first face spans x {x0}-{x1}, y {y0}-{y1})"
        )
    if ref.shape[:2] != size:
        h, w = ref.shape[:2]
        how = "scaled"
        if abs(w / h - size[1] / size[0]) > 0.01:
            how = (
                f"stretched (its aspect ratio {w / h:.2f} becomes {size[1] / size[0]:.2f}; crop it to "
                f"{size[1]}:{size[0]} first to keep the face's proportions)"
            )
        _notice(f"resizing the reference image from {w}x{h} to {size[1]}x{size[0]}, {how}")
        ref = np.asarray(PIL.Image.fromarray(ref).resize((size[1], size[0]), PIL.Image.LANCZOS))
    return ref


def _read_pose_folder(folder: Path, frames: int | None) -> list[np.ndarray]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"--driving {folder} has no pose images ({', '.join(IMAGE_SUFFIXES)}): zero frames")
    if frames is not None and frames > len(files):
        raise CliError(f"--frames {frames}: the driving input has only {len(files)} frames")
    poses = []
    for f in files[:frames]:
        try:
            with PIL.Image.open(f) as im:
                poses.append(_image_to_rgb(im, f"--driving {f.name}"))
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise CliError(f"--driving {folder}: {f.name} is not a readable image ({err})") from None
        if poses[-1].shape != poses[0].shape:
            raise CliError(
                f"--driving {folder}: {f.name} is {poses[-1].shape[1]}x{poses[-1].shape[0]} but "
                f"{files[0].name} is {poses[0].shape[1]}x{poses[0].shape[0]}; all pose images must have "
                "the same size"
            )
    _check_frame_size(*poses[0].shape[:2], f"the pose image {files[0].name}")
    return poses


def _driving_poses(
    driving: str, size: tuple[int, int], frames: int | None = None, allow_missing: bool = False
) -> tuple[list[np.ndarray], float | None, Path | None]:
    """(pose images (H, W, 3) uint8, fps or None, audio source or None) of a pose folder or a video; only the
    first ``frames`` frames are read."""
    path = Path(driving)
    if path.is_dir():
        return _read_pose_folder(path, frames), None, None
    if not path.is_file():
        raise CliError(f"--driving {path}: no such video file or folder")
    missing: list[int] = []
    try:
        reader = video.VideoReader(path)
        _check_frame_size(reader.height, reader.width, f"--driving {path.name}")
        wanted = reader.num_frames if frames is None else min(frames, reader.num_frames)
        decoded = iter(reader)  # an ffmpeg process, ended by close()
        try:
            source = itertools.islice(decoded, frames)  # stop reading at the frames needed
            poses = []
            for frame, points in landmarks.landmark_stream(source, total=wanted, missing=missing):
                h, w = frame.shape[:2]
                scale = np.array([size[1] / w, size[0] / h])
                poses.append(landmarks.draw_pose_image((points + 0.5) * scale - 0.5, size[0], size[1]))
        finally:
            decoded.close()
    except InputError as err:  # no face, an unreadable video, no frames, frames of mixed sizes
        raise CliError(f"--driving {path}: {err}") from None
    if frames is not None and len(poses) < frames:
        raise CliError(
            f"--frames {frames}: the driving input has only {len(poses)} frames"
            + (f" (its container promises {reader.num_frames})" if reader.num_frames > len(poses) else "")
        )
    if len(poses) < wanted - 1:  # ffmpeg's count comes from the duration: one frame either way is rounding
        _notice(
            f"--driving {path.name}: decoded {len(poses)} frames where its container promises "
            f"{reader.num_frames}; the file may be truncated"
        )
    if missing:
        share = len(missing) / len(poses)
        first = ", ".join(str(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        message = (
            f"no face in {len(missing)} of {len(poses)} driving frames ({first}); each holds the last pose"
        )
        if share > MAX_MISSING_SHARE and not allow_missing:
            raise CliError(
                f"--driving {path.name}: {message}, more than {MAX_MISSING_SHARE:.0%}; pass --allow-missing "
                "to accept it, or trim the video to the frames with a face"
            )
        _notice(message)
    return poses, reader.fps, path


def animate(args: argparse.Namespace) -> Path:
    # every argument is checked, and the destination probed, before anything slow runs
    out = _check_output(args.out, inputs={"--ref": args.ref, "--driving": args.driving})
    device = _check_device(args.device, args.dtype)
    folder, layout = _check_weights(args.weights, args.layout)
    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    if args.frames is not None and args.frames < 1:
        raise CliError(f"--frames must be at least 1, got {args.frames}")
    if args.context_frames < 1 or not 0 <= args.context_overlap < args.context_frames:
        raise CliError(
            f"--context-frames must be >= 1 and --context-overlap in [0, context frames), got "
            f"{args.context_frames} and {args.context_overlap}"
        )
    _check_seed(args.seed)
    _check_fps(args.fps)
    _check_cfg(args.cfg)
    requested = _parse_size(args.size, minimum=8)
    pipe = _load_pipeline(folder, layout, DTYPES[args.dtype])
    default = pipe.denoising_unet.unet_kwargs.get("sample_size", 64) * pipe.vae_scale_factor
    size = requested or (default, default)
    if size[0] % pipe.vae_scale_factor or size[1] % pipe.vae_scale_factor:
        raise CliError(f"--size must be a multiple of {pipe.vae_scale_factor}, got {size[0]}x{size[1]}")
    if min(size) < default:
        _notice(
            f"--size {size[0]}x{size[1]} is below the {default} px this model was trained at; expect a "
            "blurred or broken face"
        )

    ref = _read_reference(args.ref, size)
    poses, fps, audio_from = _driving_poses(args.driving, size, args.frames, args.allow_missing)
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
    if args.identity < 0:
        raise CliError(f"--identity must be >= 0 (which held-out toy identity), got {args.identity}")
    _check_seed(args.seed)
    _check_cfg(args.cfg)
    pipe = load_animator(args.weights)
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


# --- audio2video -------------------------------------------------------------------------------------------
TOY_AUDIO2MESH_DIR = Path(__file__).resolve().parent / "assets" / "toy_audio2mesh"
AUDIO2VIDEO_TAG = (
    "anim-lab audio2video"  # the mp4 comment that marks a file audio2video wrote (and may replace)
)
AUDIO2MESH_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def add_audio2video(subparsers) -> None:
    p = subparsers.add_parser(
        "audio2video",
        help="make a portrait speak a recording (AniPortrait's Audio2Video: audio -> mesh -> pose -> video)",
        description="Animate the face in --ref speaking --audio (or --text, spoken first by the toy world's "
        "eSpeak NG voice): Audio2Mesh turns the speech into face-mesh motion, added to the reference's own "
        "face; the meshes are drawn as pose images and animated by the animator. The mp4 has "
        "ceil(seconds x fps) frames and the speech as its audio track. Audio is read as 16-kHz mono: "
        "several channels are mixed to mono (their mean) and other sample rates resampled, each with a note. "
        "An existing OUT is replaced only when audio2video wrote it (its mp4 comment says so).",
    )
    p.add_argument("--ref", required=True, metavar="IMG", help="the reference portrait (png/jpg); one face")
    p.add_argument("--audio", metavar="WAV", help="the speech (wav, flac, ogg, mp3)")
    p.add_argument("--text", help="a sentence to speak instead of --audio (the toy world's eSpeak NG voice)")
    p.add_argument("--voice", default="en-us+m3", help="eSpeak NG voice for --text (default en-us+m3)")
    p.add_argument("--rate", type=int, default=160, help="words per minute for --text (default 160)")
    p.add_argument("--pitch", type=int, default=50, help="voice pitch 0-100 for --text (default 50)")
    p.add_argument(
        "--out", required=True, metavar="OUT.mp4", help="the video to write (.mp4, with the audio)"
    )
    p.add_argument(
        "--weights",
        default="toy",
        metavar="toy|DIR",
        help="the animator: 'toy' (the embedded toy animator) or a pipeline folder (as for `animate`)",
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUTS,
        help="how the --weights folder is organised (as for `animate`); auto: anim_lab if it has "
        "model_index.json, else animate_anyone",
    )
    p.add_argument(
        "--audio2mesh",
        default=str(TOY_AUDIO2MESH_DIR),
        metavar="DIR",
        help="an Audio2Mesh folder (Audio2Mesh.save_pretrained; scripts/train_audio2mesh.py writes one); "
        "default anim_lab/assets/toy_audio2mesh",
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (default 1: the toy animator's)")
    p.add_argument("--seed", type=int, default=42, help="random seed: the same seed gives the same video")
    p.add_argument("--fps", type=float, help="frame rate (default: the Audio2Mesh's, 25 for the toy world)")
    p.add_argument(
        "--pose",
        choices=("reference", "template"),
        default="reference",
        help="head pose: hold the reference's (default) or a template's motion mirrored and tiled",
    )
    p.add_argument(
        "--pose-template",
        metavar="NPY",
        help="for --pose template: a (T, 6) .npy of yaw, pitch, roll (degrees), tx, ty (fractions of the "
        "frame), scale; default: 2 s of the toy world's head motion",
    )
    p.add_argument("--context-frames", type=int, default=24, help="frames per window (default 24)")
    p.add_argument("--context-overlap", type=int, default=4, help="frames shared by windows (default 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=audio2video)


def _written_by_audio2video(path: Path) -> bool:
    """Whether ``path`` is an mp4 that audio2video wrote (its comment tag says so)."""
    try:
        text = video.probe(path)
    except OSError:
        return False
    return AUDIO2VIDEO_TAG in text


def _check_audio2mesh_folder(folder: str) -> Path:
    path = Path(folder)
    missing = [name for name in AUDIO2MESH_FILES if not (path / name).is_file()]
    if not path.is_dir() or missing:
        what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
        raise CliError(
            f"--audio2mesh {path} {what}: audio2video needs an Audio2Mesh folder (config.json + "
            "diffusion_pytorch_model.safetensors). Train one with scripts/train_audio2mesh.py --out "
            f"{TOY_AUDIO2MESH_DIR if path == TOY_AUDIO2MESH_DIR else path} (see its docstring), or pass "
            "--audio2mesh DIR"
        )
    return path


def _audio2mesh_fps(folder: Path) -> float:
    import json

    try:
        fps = json.loads((folder / "config.json").read_text()).get("fps", 25.0)
    except (OSError, ValueError) as err:
        raise CliError(f"--audio2mesh {folder}: config.json is not readable JSON ({err})") from None
    return float(fps or 25.0)


def _read_speech(path: str) -> np.ndarray:
    """--audio as (N,) float32 16-kHz mono, checked; a note when it is mixed down or resampled."""
    import soundfile

    from . import audio as A

    path = Path(path)
    if not path.is_file():
        raise CliError(f"--audio {path}: no such audio file")
    if path.stat().st_size == 0:
        raise CliError(f"--audio {path} is empty (0 bytes): give a recording of speech")
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise CliError(f"--audio {path} is not a readable audio file ({str(err)[:200]})") from None
    if info.channels > 1:
        _notice(f"--audio {path.name} has {info.channels} channels: mixed to mono (their mean)")
    if info.samplerate != A.SAMPLE_RATE:
        _notice(f"--audio {path.name} is sampled at {info.samplerate} Hz: resampled to 16 kHz")
    try:
        return A.load_audio(path)
    except InputError as err:
        raise CliError(f"--audio {err}") from None


def _pose_template(path: str | None, fps: float) -> np.ndarray:
    if path is None:  # the toy world's head motion, 2 s: its pose_temp.npy
        from .toy import sample_motion

        poses, _ = sample_motion(int(round(2 * fps)), fps, seed=0)
        return np.stack([p.as_array() for p in poses])  # (T, 6)
    try:
        template = np.load(path, allow_pickle=False)  # never a pickle
    except (OSError, ValueError) as err:
        raise CliError(f"--pose-template {path}: not a readable .npy array ({err})") from None
    if template.ndim != 2 or template.shape[1] != 6 or len(template) < 1 or not np.isfinite(template).all():
        raise CliError(
            f"--pose-template {path}: must be a finite (T, 6) array (yaw, pitch, roll, tx, ty, scale), got "
            f"shape {template.shape}"
        )
    if (template[:, 5] <= 0).any():
        raise CliError(f"--pose-template {path}: the scale column (the 6th) must be positive")
    return template


def audio2video(args: argparse.Namespace) -> Path:
    """``anim-lab audio2video``: every argument, the inputs and the destination checked before any work;
    the video written to a temporary file, tagged, and renamed at the end."""
    import json
    import os
    import shutil
    import subprocess
    import tempfile

    from . import audio as A
    from .audio2mesh import Audio2Mesh
    from .pipelines import audio2video as a2v

    # 1. the arguments and the destination
    if args.text is not None and args.audio is not None:
        raise CliError(
            "give --audio or --text, not both (--text is spoken by the toy voice instead of a file)"
        )
    if args.text is None and args.audio is None:
        raise CliError("give the speech: --audio FILE, or --text 'a sentence' to synthesise it")
    out = _check_output(args.out, (".mp4",), inputs={"--ref": args.ref, "--audio": args.audio})
    if out.exists() and not _written_by_audio2video(out):
        raise CliError(
            f"--out {out} exists and was not written by anim-lab audio2video; it is left as it is: choose "
            "another name (or move that file away yourself)"
        )
    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    if args.context_frames < 1 or not 0 <= args.context_overlap < args.context_frames:
        raise CliError(
            f"--context-frames must be >= 1 and --context-overlap in [0, context frames), got "
            f"{args.context_frames} and {args.context_overlap}"
        )
    if args.pose_template is not None and args.pose != "template":
        raise CliError("--pose-template is for --pose template")
    _check_seed(args.seed)
    _check_fps(args.fps)
    _check_cfg(args.cfg)
    device = _check_device(args.device, "fp32")
    folder, layout = _check_weights(args.weights, args.layout)
    mesh_folder = _check_audio2mesh_folder(args.audio2mesh)
    fps = args.fps or _audio2mesh_fps(mesh_folder)
    template = _pose_template(args.pose_template, fps) if args.pose == "template" else None

    # 2. the speech and the reference
    if args.text is not None:
        from .toy import Voice, synthesize

        try:
            speech = synthesize(args.text, Voice(args.voice, args.rate, args.pitch)).audio_16k()
        except InputError as err:
            raise CliError(f"--text: {err}") from None
    else:
        speech = _read_speech(args.audio)
    if len(speech) < A.SAMPLE_RATE / fps:
        raise CliError(
            f"--audio is {1000 * len(speech) / A.SAMPLE_RATE:.0f} ms long, shorter than one video frame "
            f"({1000 / fps:.0f} ms at {fps:g} fps): give a longer recording"
        )
    image = _open_image(args.ref, "--ref")
    _check_frame_size(*image.shape[:2], f"--ref {Path(args.ref).name}")
    try:
        found = a2v.reference_face(image)  # mediapipe, at the image's own size
    except landmarks.NoFaceError as err:
        raise CliError(f"--ref {args.ref}: {err}; the reference must show one face, front-facing") from None

    # 3. the models
    pipe = _load_pipeline(folder, layout, torch.float32)
    try:
        mesh_model = Audio2Mesh.from_pretrained(mesh_folder).eval()
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CliError(f"--audio2mesh {mesh_folder}: not a loadable Audio2Mesh folder ({err})") from None
    side = pipe.denoising_unet.unet_kwargs.get("sample_size", 64) * pipe.vae_scale_factor
    reference = a2v.reference_face(image, xyz=found.xyz, size=(side, side))  # scaled to the video's size
    if image.shape[:2] != (side, side):
        _notice(f"the reference is {image.shape[1]}x{image.shape[0]}: generated at {side}x{side}")

    # 4. the video
    pipe.to(device)
    mesh_model.to(device)
    result = a2v.audio_to_video(
        pipe,
        mesh_model,
        image,
        speech,
        fps=fps,
        size=(side, side),
        reference_xyz=reference.xyz,
        pose=args.pose,
        template=template,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        context_frames=args.context_frames,
        context_overlap=args.context_overlap,
        progress=not args.no_progress,
    )

    # 5. written beside the target, tagged, renamed into place: a failure leaves nothing at --out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.audio2video-", dir=out.parent))
    try:
        wav = A.write_audio(tmp / "speech.wav", speech)
        save_video(result.frames, tmp / "video.mp4", fps=fps, audio_from=wav)
        tagged = tmp / "tagged.mp4"
        cmd = [video.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(tmp / "video.mp4"), "-map", "0"]
        cmd += ["-c", "copy", "-metadata", f"comment={AUDIO2VIDEO_TAG}", "-movflags", "+faststart"]
        done = subprocess.run([*cmd, str(tagged)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ffmpeg could not tag {out.name}: {done.stderr[-300:]}")
        os.chmod(tagged, 0o666 & ~_umask())
        os.replace(tagged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _notice(
        f"wrote {len(result.frames)} frames ({len(speech) / A.SAMPLE_RATE:.2f} s at {fps:g} fps) to {out}"
    )
    return out


def _umask() -> int:
    from .files import current_umask

    return current_umask()


# --- entry point --------------------------------------------------------------------------------------------
class Terminated(BaseException):
    """SIGTERM arrived: raised like Ctrl-C's KeyboardInterrupt, so every temporary file is removed on the way
    out (what a command writes appears only by a rename at its end)."""


def _on_sigterm(signum, frame):
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="anim-lab",
        description="Portrait animation from a reference image and a driving video (anim_lab).",
    )
    parser.add_argument("--version", action="version", version=f"anim-lab {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_video2pose(subparsers)
    add_video2video(subparsers)
    add_animate(subparsers)
    add_demo(subparsers)
    add_audio2video(subparsers)
    return parser


# what the user can fix: the project's own errors (anim_lab.errors: CliError, OutputError, NoFaceError,
# NonFiniteError, KeyMismatchError, every InputError), whose messages name the file or the option; a missing,
# unreadable or unwritable file (OSError, PIL's UnidentifiedImageError included); a missing extra. Any other
# exception, a ValueError from a library included, is a bug.
USER_ERRORS = (AnimLabError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = None
    if threading.current_thread() is threading.main_thread():  # signals can only be set there
        handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.func(args)
    except (KeyboardInterrupt, Terminated) as err:
        code = 130 if isinstance(err, KeyboardInterrupt) else 143
        parser.exit(code, f"anim-lab {args.command}: interrupted; nothing was written\n")
    except USER_ERRORS as err:
        if args.debug:
            raise
        parser.exit(2, f"anim-lab {args.command}: error: {err}\n")
    except Exception as err:  # a bug, not a user error: one line, and --debug for the traceback
        if args.debug:
            raise
        parser.exit(
            1,
            f"anim-lab {args.command}: internal error: {type(err).__name__}: {err}\n"
            "  run it again with --debug for the traceback, and please report it\n",
        )
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
