"""Read and write videos as ``(H, W, 3)`` uint8 RGB frames: mp4 (H.264 through imageio-ffmpeg's own ffmpeg
binary, optionally with the audio of another file muxed in) and gif.

- :func:`read_video` / :func:`write_video`: whole clips as ``(F, H, W, 3)`` arrays.
- :class:`VideoReader` / :class:`VideoWriter`: one frame at a time, for long videos (memory stays flat).

A writer works on a temporary file next to the target and renames it only when everything (frames, audio) has
been written, so an error never leaves a half-written video behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageSequence

from .errors import InputError
from .files import check_output_file, current_umask

VIDEO_SUFFIXES = (".mp4", ".gif")


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (no system ffmpeg needed)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def _existing(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such video file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a video file")
    return path


def probe(path) -> str:
    """ffmpeg's description of a media file's streams (the text of ``ffmpeg -i path``)."""
    path = _existing(path)
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return result.stderr


def has_audio(path) -> bool:
    """Whether a media file has an audio stream."""
    return re.search(r"Stream #\S+.*: Audio:", probe(path)) is not None


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------


class VideoReader:
    """The frames of a video file, one at a time: ``for frame in VideoReader(path)`` (``(H, W, 3)`` uint8
    RGB).

    Attributes: ``fps``, ``height``, ``width``, ``num_frames`` (ffmpeg's estimate from the duration; exact for
    gif). Opening checks the file, so a missing file or a non-video fails here (FileNotFoundError /
    ValueError).
    """

    def __init__(self, path):
        self.path = _existing(path)
        if self.path.suffix.lower() == ".gif":
            self._gif_frames, self.fps = _read_gif(self.path)
            self.num_frames, self.height, self.width = self._gif_frames.shape[:3]
            return
        self._gif_frames = None
        try:
            reader = imageio_ffmpeg.read_frames(str(self.path))
            meta = next(reader)
            reader.close()
        except (OSError, RuntimeError, StopIteration, KeyError) as err:
            raise InputError(
                f"{self.path} is not a readable video file ({type(err).__name__}: {str(err)[:200]})"
            ) from err
        self.width, self.height = meta["size"]
        self.fps = float(meta["fps"])
        self.num_frames = max(1, int(round(float(meta.get("duration") or 0) * self.fps)))

    def __len__(self) -> int:
        return self.num_frames

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._gif_frames is not None:
            yield from self._gif_frames
            return
        reader = imageio_ffmpeg.read_frames(str(self.path))  # an ffmpeg child process, ended by close()
        try:
            next(reader)  # metadata
            for buf in reader:
                yield np.frombuffer(buf, np.uint8).reshape(self.height, self.width, 3)
        finally:
            reader.close()


def read_video(path) -> tuple[np.ndarray, float]:
    """All frames of a video file and its frame rate: ``(F, H, W, 3)`` uint8 RGB, fps.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable video, or no frames.
    """
    reader = VideoReader(path)
    frames = list(reader)
    if not frames:
        raise InputError(f"{reader.path} has no video frames")
    return np.stack(frames), reader.fps  # (F, H, W, 3)


def _read_gif(path: Path) -> tuple[np.ndarray, float]:
    try:
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
            duration_ms = im.info.get("duration", 100) or 100
    except OSError as err:
        raise InputError(f"{path} is not a readable gif ({err})") from err
    return np.stack(frames), 1000.0 / float(duration_ms)  # (F, H, W, 3), fps


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


def _file_mode() -> int:
    """The permissions a new file gets from ``open()``: 0o666 minus the process umask."""
    return 0o666 & ~current_umask()


def _check_frame(frame, index: int) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"frame {index} must be uint8 (0-255), got {arr.dtype}; "
            f"convert with (x * 255).round().astype(np.uint8)"
        )
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"frame {index} must have shape (H, W, 3), got {arr.shape}")
    return np.ascontiguousarray(arr)


class VideoWriter:
    """Write frames one at a time to ``.mp4`` (H.264, yuv420p) or ``.gif``; use as a context manager.

    >>> with VideoWriter("out.mp4", fps=25, audio_from="in.mp4") as w:
    ...     for frame in frames:
    ...         w.write(frame)                       # (H, W, 3) uint8 RGB, all the same size

    On a clean exit the file appears at ``path`` (with the audio muxed in), with the permissions any new file
    gets under the process umask (0o644 under the usual 022); if the block raises, nothing appears. A path
    that cannot be created (a folder on its way is a regular file) fails at construction.

    Args:
        path: output file; the suffix picks the format.
        fps: frame rate.
        audio_from: a media file whose first audio stream is muxed in (AAC), up to the video's length;
            mp4 only; ignored when that file has no audio.
        quality: imageio-ffmpeg's quality, 0-10 (10 = best).

    For mp4, odd heights/widths are padded by one replicated row/column (yuv420p needs even sizes). Gif timing
    has 10 ms steps, so the fps of a gif is rounded to that.
    """

    def __init__(self, path, fps: float, *, audio_from=None, quality: float = 8.0):
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in VIDEO_SUFFIXES:
            raise InputError(f"video path must end in .mp4 or .gif, got {self.path.name!r}")
        if not fps or not fps > 0:
            raise InputError(f"fps must be positive, got {fps}")
        # before any work: not a folder, not the audio source, really writable
        check_output_file(self.path, VIDEO_SUFFIXES, {"audio_from": audio_from}, what="video path")
        if audio_from is not None:
            audio_from = _existing(audio_from)
            if self.format == ".gif":
                raise InputError("a gif cannot carry audio; write an .mp4 or pass audio_from=None")
            if not has_audio(audio_from):
                audio_from = None
        self.fps, self.audio_from, self.quality = float(fps), audio_from, quality
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (H, W) of the first frame
        self._tmp: Path | None = None
        self._ffmpeg = None
        self._gif: list[np.ndarray] = []

    def write(self, frame) -> None:
        frame = _check_frame(frame, self.num_frames)
        if self._size is None:
            self._size = frame.shape[:2]
            self._start()
        elif frame.shape[:2] != self._size:
            raise InputError(
                f"frame {self.num_frames} is {frame.shape[1]}x{frame.shape[0]} but the first frame was "
                f"{self._size[1]}x{self._size[0]}; all frames of a video must have the same size"
            )
        if self.format == ".gif":
            self._gif.append(frame)
        else:
            pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # even size for yuv420p
            self._ffmpeg.send(np.ascontiguousarray(frame))
        self.num_frames += 1

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=self.format, dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        if self.format == ".mp4":
            height, width = self._size[0] + self._size[0] % 2, self._size[1] + self._size[1] % 2
            self._ffmpeg = imageio_ffmpeg.write_frames(
                str(self._silent),
                (width, height),
                fps=self.fps,
                quality=self.quality,
                macro_block_size=1,
                ffmpeg_log_level="error",
                output_params=["-movflags", "+faststart"],
            )
            self._ffmpeg.send(None)  # start ffmpeg

    @property
    def _silent(self) -> Path:
        """Where ffmpeg writes the video stream: the temp file itself, or a second one when audio is muxed
        after."""
        return self._tmp if self.audio_from is None else self._tmp.with_suffix(".silent.mp4")

    def close(self) -> Path:
        """Finish the file and move it into place; returns the path."""
        try:
            if self.num_frames == 0:
                raise InputError(f"no frames were written to {self.path}")
            if self.format == ".gif":
                images = [Image.fromarray(f) for f in self._gif]
                images[0].save(
                    self._tmp,
                    format="GIF",
                    save_all=True,
                    append_images=images[1:],
                    duration=1000.0 / self.fps,
                    loop=0,
                    optimize=False,
                )
            else:
                self._ffmpeg.close()
                self._ffmpeg = None
                if self.audio_from is not None:
                    self._mux_audio()
            os.chmod(self._tmp, _file_mode())  # mkstemp made it private (0600); give it a new file's mode
            os.replace(self._tmp, self.path)
            return self.path
        finally:
            self._cleanup()

    def _mux_audio(self) -> None:
        # copy the video stream; read at most the video's duration of audio (no -shortest: it can drop frames)
        cmd = [
            ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            "-i",
            str(self._silent),
            "-t",
            f"{self.num_frames / self.fps:.6f}",
            "-i",
            str(self.audio_from),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            "-c:v",
            "copy",
            "-c:a",
            "aac",
            "-movflags",
            "+faststart",
            str(self._tmp),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg could not mux the audio of {self.audio_from}: {result.stderr[-500:]}")

    def abort(self) -> None:
        """Stop and delete everything written so far."""
        self._cleanup()

    def _cleanup(self) -> None:
        if self._ffmpeg is not None:
            # ffmpeg may already be gone; the files are removed below anyway
            with contextlib.suppress(Exception):
                self._ffmpeg.close()
            self._ffmpeg = None
        if self._tmp is not None:
            for p in {self._tmp, self._silent}:
                if p.exists():
                    p.unlink()
        self._gif = []

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path, frames, fps: float, *, audio_from=None, quality: float = 8.0) -> Path:
    """Write ``(F, H, W, 3)`` uint8 RGB frames to ``.mp4`` or ``.gif`` (see :class:`VideoWriter` for the
    options)."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"frames must be uint8 (0-255), got {arr.dtype}; convert with (x * 255).round().astype(np.uint8)"
        )
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise InputError(f"frames must have shape (F, H, W, 3) with F ≥ 1, got {arr.shape}")
    with VideoWriter(path, fps, audio_from=audio_from, quality=quality) as writer:
        for frame in arr:
            writer.write(frame)
    return writer.path


def _frames_to_uint8(frames) -> np.ndarray:
    """A pipeline's output (any output type; the first video of a batch) -> (F, H, W, 3) uint8."""
    frames = getattr(frames, "frames", frames)  # a pipeline output object
    if isinstance(frames, list) and frames and isinstance(frames[0], list):
        frames = frames[0]  # the first video of a batch
    if isinstance(frames, list):
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise InputError("frames must be PIL images, an (F, H, W, 3) array or an (F, 3, H, W) tensor")
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if hasattr(frames, "detach"):  # a torch tensor (F, 3, H, W) or (B, F, 3, H, W)
        frames = frames.detach().float().cpu().numpy()
        frames = np.moveaxis(frames[0] if frames.ndim == 5 else frames, 1, -1)  # -> (F, H, W, 3)
    frames = np.asarray(frames)
    if frames.ndim == 5:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise InputError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        lo, hi = float(np.min(frames)), float(np.max(frames))
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # NaN fails too
            raise InputError(
                f"float frames must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map [-1, 1] frames "
                "with (x + 1) / 2, and give [0, 255] pixels as uint8 (or divide them by 255)"
            )
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames


def save_video(frames, path, fps: float = 8.0, audio_from=None) -> Path:
    """Write a pipeline's output (``pipe(...)``, or its ``.frames``, of any output type but "latent"; the
    first video of a batch) to ``.mp4`` or ``.gif``: PIL images, (F, H, W, 3) arrays in [0, 1] or uint8, or
    (F, 3, H, W) tensors in [0, 1]. Written to a temporary file and renamed at the end, so a failure leaves
    nothing at ``path``; ``audio_from``: a media file whose audio is muxed into an mp4."""
    return write_video(path, _frames_to_uint8(frames), fps, audio_from=audio_from)


def write_gif(path, frames, fps: float) -> Path:
    """Write frames to an animated, looping gif."""
    if Path(path).suffix.lower() != ".gif":
        raise InputError(f"gif path must end in .gif, got {Path(path).name!r}")
    return write_video(path, frames, fps)
