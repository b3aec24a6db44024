"""The ``anim-lab`` command: one subcommand per job (``anim-lab video2video --help``)."""

from __future__ import annotations

import argparse
import sys


def _video2video(args) -> int:
    from anim_lab.retarget import video2video_command

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anim-lab", description="anim_lab: portrait animation, built to learn"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    v2v = sub.add_parser(
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
    v2v.set_defaults(func=_video2video)
    return parser


def main(argv=None) -> int:
    """Run ``anim-lab``; bad input prints ``anim-lab: error: ...`` and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # NoFaceError is a ValueError
        parser.exit(2, f"anim-lab {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
