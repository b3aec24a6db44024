"""Video files (mp4/gif, audio mux) and Video2Pose."""

import os
import stat

import numpy as np
import psutil
import pytest
import skimage.data
from helpers import tone

from anim_lab import landmarks as L
from anim_lab import video as V
from anim_lab.files import OutputError


def _frames(n=6, h=48, w=64):
    """Smooth moving gradients (H.264 keeps them within a few grey levels)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [
            np.stack([(x * 3 + 10 * i) % 256, (y * 4) % 256, np.full_like(x, 40 * i % 256)], -1)
            for i in range(n)
        ]
    ).astype(np.uint8)


def test_mp4_round_trip(tmp_path):
    frames = _frames()
    V.write_video(tmp_path / "a.mp4", frames, fps=12.5, quality=10)
    back, fps = V.read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape and fps == 12.5
    assert np.abs(back.astype(int) - frames).mean() < 3.0
    assert not V.has_audio(tmp_path / "a.mp4")
    # odd sizes are padded to even by one replicated row/column
    V.write_video(tmp_path / "odd.mp4", frames[:, :47, :63], fps=10)
    assert V.read_video(tmp_path / "odd.mp4")[0].shape == (6, 48, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "odd.mp4"]  # no temporary files left


def test_gif_round_trip(tmp_path):
    frames = np.zeros((4, 32, 40, 3), np.uint8)
    for i in range(4):
        frames[i, :, 10 * i : 10 * i + 10] = (255, 0, 0)
    V.write_gif(tmp_path / "a.gif", frames, fps=25)
    back, fps = V.read_video(tmp_path / "a.gif")
    np.testing.assert_array_equal(back, frames)
    assert fps == 25


def test_audio_is_muxed_without_dropping_frames(tmp_path):
    wav = tone(tmp_path / "tone.wav", seconds=2.0)
    frames = _frames(n=10)
    V.write_video(tmp_path / "talk.mp4", frames, fps=25, audio_from=wav)  # 0.4 s of video, 2 s of audio
    assert V.has_audio(tmp_path / "talk.mp4")
    back, fps = V.read_video(tmp_path / "talk.mp4")
    assert len(back) == 10 and fps == 25
    # a source without audio is ignored
    V.write_video(tmp_path / "silent.mp4", frames, fps=25)
    V.write_video(tmp_path / "again.mp4", frames, fps=25, audio_from=tmp_path / "silent.mp4")
    assert not V.has_audio(tmp_path / "again.mp4")


def test_bad_files_and_frames_give_clear_errors_and_no_output(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        V.read_video(tmp_path / "notes.mp4")
    with pytest.raises(FileNotFoundError, match="no such video"):
        V.read_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        V.write_video(tmp_path / "x.mp4", np.zeros((4, 8, 8), np.uint8), fps=25)
    with pytest.raises(TypeError, match="uint8"):
        V.write_video(tmp_path / "x.mp4", np.zeros((4, 8, 8, 3), np.float32), fps=25)
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        V.write_video(tmp_path / "x.avi", _frames(), fps=25)
    with pytest.raises(ValueError, match="gif cannot carry audio"):
        V.write_video(tmp_path / "x.gif", _frames(), fps=25, audio_from=tmp_path / "notes.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.mp4"]


# --- Video2Pose ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    """A 12-frame 25-fps clip made from the astronaut (shifting crop), with a 440 Hz tone."""
    d = tmp_path_factory.mktemp("v2p")
    img = skimage.data.astronaut()
    frames = np.stack(
        [img[30 + i : 286 + i, 100 + 2 * i : 356 + 2 * i] for i in range(12)]
    )  # (12, 256, 256, 3)
    V.write_video(d / "face.mp4", frames, fps=25, audio_from=tone(d / "tone.wav"), quality=9)
    return d, frames


def test_video_to_pose_keeps_frames_fps_and_audio(face_video):
    d, frames = face_video
    lmk = L.video_to_pose(d / "face.mp4", d / "face_pose.mp4", progress=False)
    assert lmk.shape == (12, 478, 2)
    poses, fps = V.read_video(d / "face_pose.mp4")
    assert poses.shape == (12, 256, 256, 3) and fps == 25 and V.has_audio(d / "face_pose.mp4")
    # the face moves left as the crop window moves right (2 px per frame), in the landmarks and in the pose
    # video
    assert -2.5 < np.median(lmk[-1, :, 0] - lmk[0, :, 0]) / 11 < -1.5
    oval = [
        (p[..., 1] > 90) & (p[..., 0] < 80) & (p[..., 2] < 80) for p in poses
    ]  # green lines (mp4 is lossy)
    assert min(m.sum() for m in oval) > 50
    cols = [np.nonzero(m)[1].mean() for m in oval]
    assert -3.0 < (cols[-1] - cols[0]) / 11 < -1.0
    # the written pose images are the landmarks drawn
    first = L.draw_pose_image(lmk[0], 256)
    assert np.abs(poses[0].astype(int) - first).mean() < 2.0
    # a list of frames -> gif, fps given, pose images at another size
    lmk4 = L.video_to_pose(list(frames[:4]), d / "face_pose.gif", fps=10, size=(128, 160), progress=False)
    back, fps = V.read_video(d / "face_pose.gif")
    assert lmk4.shape == (4, 478, 2) and back.shape == (4, 128, 160, 3) and fps == 10
    scaled = L.draw_pose_image((lmk4[2] + 0.5) * np.array([160 / 256, 128 / 256]) - 0.5, 128, 160)
    np.testing.assert_array_equal(back[2], scaled)  # gif is lossless for these few colours


def test_video_to_pose_errors_leave_no_output(face_video, tmp_path):
    d, frames = face_video
    (tmp_path / "fake.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="not a readable video"):
        L.video_to_pose(tmp_path / "fake.mp4", tmp_path / "out.mp4", progress=False)
    with pytest.raises(ValueError, match="fps is required"):
        L.video_to_pose(list(frames[:2]), tmp_path / "out.mp4", progress=False)
    empty = np.zeros((3, 256, 256, 3), np.uint8)
    with pytest.raises(L.NoFaceError, match="no face found in any of the 3 frames"):
        L.video_to_pose(empty, tmp_path / "out.mp4", fps=25, progress=False)
    # a failure half way (a frame of another size after frames already written) leaves nothing either
    mixed = [frames[0], frames[1], frames[2][:128]]
    with pytest.raises(ValueError, match="frame 2 is 256x128 but frame 0 is 256x256"):
        L.video_to_pose(mixed, tmp_path / "out.mp4", fps=25, progress=False)
    with pytest.raises(L.NoFaceError, match="frame 1"):
        L.video_to_pose(
            [frames[0], empty[0]], tmp_path / "out.gif", fps=25, on_missing="error", progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.mp4"]


def test_video_writer_streams_and_aborts(tmp_path):
    frames = _frames(n=5)
    with V.VideoWriter(tmp_path / "s.mp4", fps=5) as w:
        for f in frames:
            w.write(f)
    reader = V.VideoReader(tmp_path / "s.mp4")
    assert (reader.fps, reader.height, reader.width, len(reader)) == (5, 48, 64, 5)
    assert np.stack(list(reader)).shape == (5, 48, 64, 3)
    with pytest.raises(RuntimeError, match="boom"), V.VideoWriter(tmp_path / "t.mp4", fps=5) as w:
        w.write(frames[0])
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="no frames"), V.VideoWriter(tmp_path / "u.gif", fps=5):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mp4"]


# --- files: permissions, impossible destinations, readers closed on failure ------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_writer_honours_the_umask(tmp_path, umask, suffix):
    old = os.umask(umask)
    try:
        path = V.write_video(tmp_path / f"u{suffix}", _frames(n=2), fps=5)
        (tmp_path / "plain").write_bytes(b"")  # what open() gives a new file under this umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_destination_under_a_regular_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    for dest in (tmp_path / "taken" / "out.mp4", tmp_path / "taken" / "deeper" / "out.gif"):
        with pytest.raises(OutputError, match=r"taken is a file, not a folder"):
            V.write_video(dest, _frames(n=2), fps=5)
        with pytest.raises(OutputError, match="is a file, not a folder"):
            V.VideoWriter(dest, fps=5)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        V.VideoWriter(tmp_path / "dir.mp4", fps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mp4", "taken"]


def test_a_video_is_never_written_over_its_own_audio_source(tmp_path):
    source = V.write_video(tmp_path / "talk.mp4", _frames(n=3), fps=5)
    before = source.read_bytes()
    with pytest.raises(OutputError, match="is the input audio_from"):
        V.write_video(source, _frames(n=3), fps=5, audio_from=source)
    assert source.read_bytes() == before


def _ffmpeg_children() -> list:
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name().lower()]


def test_failed_video_to_pose_leaves_no_ffmpeg_reader(face_video, tmp_path):
    """Each failure path of video_to_pose on a file closes the ffmpeg reader, even while the exception (and
    its traceback, which keeps the frames of the failed call alive) is still held."""
    d, frames = face_video
    assert not _ffmpeg_children()
    no_face = tmp_path / "blank.mp4"
    V.write_video(no_face, np.zeros((6, 64, 64, 3), np.uint8), fps=25)
    (tmp_path / "taken").write_text("a file")
    failures = [
        # mediapipe finds no face in frame 0 (error mode): fails after the reader started
        (
            L.NoFaceError,
            lambda: L.video_to_pose(no_face, tmp_path / "o.mp4", on_missing="error", progress=False),
        ),
        # the output cannot be created: refused before the reader starts
        (
            OutputError,
            lambda: L.video_to_pose(d / "face.mp4", tmp_path / "taken" / "o.mp4", progress=False),
        ),
        # a bad pose-image size: fails while drawing the first frame
        (
            ValueError,
            lambda: L.video_to_pose(d / "face.mp4", tmp_path / "o.mp4", size=(100.5, 90), progress=False),
        ),
    ]
    held = []
    for error, call in failures:
        with pytest.raises(error) as info:
            call()
        held.append(info)  # keep the traceback alive: the reader must be closed anyway
        assert not _ffmpeg_children(), (error, _ffmpeg_children())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.mp4", "taken"]


def test_video_to_pose_takes_any_iterable_of_frames(face_video, tmp_path):
    d, frames = face_video
    from_list = L.video_to_pose(list(frames[:3]), tmp_path / "a.gif", fps=10, progress=False)
    from_generator = L.video_to_pose((f for f in frames[:3]), tmp_path / "b.gif", fps=10, progress=False)
    np.testing.assert_array_equal(from_generator, from_list)
    np.testing.assert_array_equal(V.read_video(tmp_path / "b.gif")[0], V.read_video(tmp_path / "a.gif")[0])
    for bad in (5, frames[0], b"frames"):
        with pytest.raises(TypeError, match="iterable .* of \\(H, W, 3\\) uint8 frames"):
            L.video_to_pose(bad, tmp_path / "c.gif", fps=10, progress=False)
    with pytest.raises(ValueError, match="the video has no frames"):
        L.video_to_pose(iter([]), tmp_path / "c.gif", fps=10, progress=False)
    assert not (tmp_path / "c.gif").exists()
