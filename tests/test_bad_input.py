"""Every bad input is named before the work starts; nothing is silent or misleading.

Each test is one case a new user reported: a bad argument found only after minutes of generation, a
traceback instead of a message, or a result that was quietly wrong (a black video, a stretched face, held
poses). The pipeline runs on tiny random weights (tests/test_cli.py's saved folder).
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from test_cli import animate_args, data  # noqa: F401  (module fixture: weights, ref.png, driving.mp4, poses/)
from test_pipeline import tiny_pipeline

from anim_lab import cli, retarget
from anim_lab import video as V
from anim_lab.errors import AnimLabError, InputError
from anim_lab.pipelines import NonFiniteError, Pose2VideoPipeline


def _error(argv, capsys, match, code=2):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    message = capsys.readouterr().err
    assert err.value.code == code, message
    assert "Traceback" not in message
    assert re.search(match, message), message
    return message


def _run(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the weights is the first slow step: a check that comes after it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_pipeline", refuse)


# --- 3. checked before the work -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fps", "0"], "--fps must be a positive number of frames per second, got 0"),  # not the video's
        (["--fps", "-5"], "--fps must be a positive number"),
        (["--fps", "nan"], "--fps must be a positive number"),
        (["--device", "meta"], "--device meta: anim-lab generates on cpu or cuda"),
        (["--seed", str(2**64)], r"--seed must be between 0 and 2\*\*64 - 1"),
        (["--seed", "-1"], r"--seed must be between 0"),
        (["--cfg", "nan"], "--cfg must be a number >= 0"),
        (["--cfg", "-1"], "--cfg must be a number >= 0"),
        (["--context-overlap", "24"], "--context-overlap in"),
        (["--weights", "toy", "--layout", "aniportrait"], "--layout aniportrait is for a --weights folder"),
    ],
)
def test_animate_arguments_are_checked_before_loading(data, tmp_path, capsys, no_loading, extra, message):  # noqa: F811
    argv = animate_args(data, tmp_path / "out.mp4")
    if "--weights" in extra:
        i = argv.index("--weights")
        del argv[i : i + 2]
    _error([*argv, *extra], capsys, message)
    assert not list(tmp_path.iterdir())


def test_unwritable_destination_is_found_before_loading(data, capsys, no_loading):  # noqa: F811
    _error(animate_args(data, "/sys/anim_lab.mp4"), capsys, "the folder /sys is not writable")


def test_unknown_failures_are_one_line_and_debug_shows_the_traceback(data, tmp_path, capsys, monkeypatch):  # noqa: F811
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "_read_reference", broken)
    argv = animate_args(data, tmp_path / "o.mp4")
    _error(argv, capsys, "internal error: RuntimeError: something inside broke\n.*--debug", code=1)
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(["--debug", *argv])


@pytest.mark.parametrize(
    "error, code, shown",
    [
        (
            ValueError("a library's own ValueError"),
            1,
            "internal error: ValueError: a library's own ValueError",
        ),
        (InputError("--reference: this is why, and what to do"), 2, "error: --reference: this is why"),
    ],
)
def test_only_the_projects_own_errors_are_user_errors(
    data,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
    error,
    code,
    shown,
):
    """A ValueError from somewhere inside is a bug, shown as one; an anim_lab error is the user's to fix."""

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "_read_reference", failing)
    _error(animate_args(data, tmp_path / "o.mp4"), capsys, shown, code=code)
    assert issubclass(InputError, ValueError) and issubclass(InputError, AnimLabError)


def test_an_unreadable_pose_image_is_named(data, tmp_path, capsys):  # noqa: F811
    poses = tmp_path / "poses"
    shutil.copytree(data / "poses", poses)
    (poses / "001.png").write_bytes(b"not a png")
    argv = animate_args(data, tmp_path / "o.mp4")
    argv[argv.index("--driving") + 1] = str(poses)
    _error(argv, capsys, r"--driving .*poses: 001.png is not a readable image")


def test_version(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["--version"])
    assert err.value.code == 0 and re.fullmatch(r"anim-lab \d+\.\d+\.\d+\n", capsys.readouterr().out)


# --- 4. broken weights, wrong folders ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _poses(n=3, size=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _ref(size=64):
    return np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("component", ["denoising_unet", "vae"])
def test_a_nan_weight_is_named_not_a_black_video(pipe, component):
    module = getattr(pipe, component)
    name, param = next((n, p) for n, p in module.named_parameters() if "decoder" in n or component != "vae")
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        with pytest.raises(
            NonFiniteError, match=rf"weights of {component} hold NaN .*\({component}\.{name}\)"
        ):
            pipe(_ref(), _poses(), num_inference_steps=2, guidance_scale=1.0, output_type="np")
    finally:
        with torch.no_grad():
            param.copy_(saved)
    frames = pipe(_ref(), _poses(), num_inference_steps=2, guidance_scale=1.0, output_type="np").frames
    assert np.isfinite(frames).all()


def test_from_pretrained_names_a_wrong_or_broken_folder(pipe, tmp_path):
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        ValueError, match="names the pipeline 'StableDiffusionPipeline', not Pose2VideoPipeline"
    ):
        Pose2VideoPipeline.from_pretrained(other)
    no_scheduler = tmp_path / "no_scheduler"
    shutil.copytree(folder, no_scheduler)
    shutil.rmtree(no_scheduler / "scheduler")
    with pytest.raises(FileNotFoundError, match=r"missing scheduler/scheduler_config.json"):
        Pose2VideoPipeline.from_pretrained(no_scheduler)
    bad_json = tmp_path / "bad_json"
    shutil.copytree(folder, bad_json)
    (bad_json / "pose_guider" / "config.json").write_text('{"_class_name": "PoseGuider",')
    with pytest.raises(ValueError, match=r"pose_guider/config.json is not valid JSON \(.*line 1"):
        Pose2VideoPipeline.from_pretrained(bad_json)


def test_pose_images_of_another_size_and_wrong_generators_are_refused(pipe):
    poses = _poses(3)
    poses[1] = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="pose image 1 is 64x48 but pose image 0 is 64x64"):
        pipe(_ref(), poses, num_inference_steps=1)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match="a list of 2 generators for a batch of 1 video"):
        pipe(_ref(), _poses(), num_inference_steps=1, generator=gens)


def test_landmark_counts_must_match():
    ref = np.random.default_rng(0).normal(size=(468, 3)) * 20 + 100
    drv = np.random.default_rng(1).normal(size=(2, 478, 3)) * 20 + 100
    with pytest.raises(ValueError, match="the reference has 468 landmarks but the driving frames have 478"):
        retarget.retarget(ref, drv, 128)


# --- 4. the driving video -----------------------------------------------------------------------------------
def _face_frames(n):
    img = skimage.data.astronaut()
    return np.stack([img[30 + 2 * i : 286 + 2 * i, 100 + 2 * i : 356 + 2 * i] for i in range(n)])


def test_a_truncated_video_says_how_many_frames_were_decoded(data, tmp_path, capsys):  # noqa: F811
    V.write_video(tmp_path / "whole.mp4", _face_frames(12), fps=12.5)
    cut = tmp_path / "cut.mp4"
    whole = (tmp_path / "whole.mp4").read_bytes()
    cut.write_bytes(whole[: int(0.9 * len(whole))])  # ffmpeg still reads its header, then 1 frame
    argv = animate_args(data, tmp_path / "o.mp4")
    argv[argv.index("--driving") + 1] = str(cut)
    notice = _run(argv, capsys)
    assert re.search(r"decoded 1 frames where its container promises 12; the file may be truncated", notice)


def test_frames_without_a_face_are_counted_and_refused_above_the_share(data, tmp_path, capsys):  # noqa: F811
    frames = _face_frames(6)
    frames[1::2] = 0  # every other frame blank: 3 of 6 without a face
    V.write_video(tmp_path / "half.mp4", frames, fps=12.5)
    argv = animate_args(data, tmp_path / "o.mp4")
    argv[argv.index("--driving") + 1] = str(tmp_path / "half.mp4")
    _error(
        argv, capsys, r"no face in 3 of 6 driving frames \(1, 3, 5\); .*more than 25%; pass --allow-missing"
    )
    assert not (tmp_path / "o.mp4").exists()
    notice = _run([*argv, "--allow-missing"], capsys)
    assert "no face in 3 of 6 driving frames (1, 3, 5); each holds the last pose" in notice
    assert V.read_video(tmp_path / "o.mp4")[0].shape[0] == 6


def test_frames_stops_reading_the_video_at_the_frames_needed(data, tmp_path, capsys, monkeypatch):  # noqa: F811
    read = []
    real_iter = V.VideoReader.__iter__

    def counting(self):
        for frame in real_iter(self):
            read.append(1)
            yield frame

    monkeypatch.setattr(V.VideoReader, "__iter__", counting)
    argv = animate_args(data, tmp_path / "o.mp4", "--frames", "2")
    argv[argv.index("--driving") + 1] = str(data / "driving.mp4")  # 5 frames
    _run(argv, capsys)
    assert len(read) == 2


def test_tiny_pose_inputs_are_refused(data, tmp_path, capsys):  # noqa: F811
    V.write_video(tmp_path / "tiny.gif", np.zeros((3, 5, 7, 3), np.uint8), fps=10)
    _error(
        ["video2pose", str(tmp_path / "tiny.gif"), str(tmp_path / "p.mp4")],
        capsys,
        r"is 7x5 px; .* at least 32",
    )
    argv = animate_args(data, tmp_path / "o.mp4")
    argv[argv.index("--driving") + 1] = str(tmp_path / "tiny.gif")
    _error(argv, capsys, r"--driving tiny.gif is 7x5 px")
    _error(
        ["video2pose", str(data / "driving.mp4"), str(tmp_path / "p.mp4"), "--size", "16"],
        capsys,
        "at least 32",
    )


# --- 4. the reference image ---------------------------------------------------------------------------------
def test_sixteen_bit_grey_is_scaled_not_whitened(capsys):
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    PIL.Image.fromarray(grey).save(buf, format="PNG")
    with PIL.Image.open(buf) as im:
        assert im.mode.startswith("I")
        rgb = cli._image_to_rgb(im, "ref")
    expected = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert (rgb == 255).mean() < 0.01  # the old conversion made 99% of it white


def test_exif_orientation_is_applied():
    img = skimage.data.astronaut()[:64, :96]  # (64, 96, 3)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="JPEG", exif=exif, quality=100)
    with PIL.Image.open(buf) as im:
        rgb = cli._image_to_rgb(im, "ref")
    assert rgb.shape == (96, 64, 3)  # shown upright, as a phone shows it
    assert np.abs(rgb.astype(int) - np.rot90(img, -1).astype(int)).mean() < 4  # JPEG's loss only


def test_alpha_is_dropped_with_a_notice(capsys):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 120
    rgb = cli._image_to_rgb(PIL.Image.fromarray(rgba, "RGBA"), "--ref x.png")
    assert (rgb == 120).all()
    assert "x.png has an alpha channel; it is dropped" in capsys.readouterr().err
    cli._image_to_rgb(PIL.Image.fromarray(rgba), "r")  # alpha all zero: the image shows nothing
    assert "every pixel is fully transparent" in capsys.readouterr().err


def test_two_faces_and_a_stretch_are_announced(capsys):
    face = skimage.data.astronaut()[0:256, 100:356]
    two = np.concatenate([face, face], axis=1)  # 512x256, two faces
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"two_faces_{os.getpid()}.png")
    PIL.Image.fromarray(two).save(path)
    try:
        ref = cli._read_reference(path, (128, 128))
    finally:
        os.unlink(path)
    notice = capsys.readouterr().err
    assert ref.shape == (128, 128, 3)
    assert re.search(
        r"shows 2 faces; .* crop the image to it \(mediapipe's first face spans x \d+-\d+", notice
    )
    assert "from 512x256 to 128x128, stretched (its aspect ratio 2.00 becomes 1.00" in notice


# --- 4. minor ----------------------------------------------------------------------------------------------
def test_minor_cases_are_named(data, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        cli.main(["animate", "--help"])
    assert "0 and 1 give the same video" in " ".join(capsys.readouterr().out.split())
    notice = _run(animate_args(data, tmp_path / "a.mp4", "--cfg", "1e6"), capsys)
    assert "--cfg 1e+06 is far above the usual 1-7.5" in notice
    notice = _run(animate_args(data, tmp_path / "b.mp4", "--size", "8"), capsys)
    assert "--size 8x8 is below the 64 px this model was trained at" in notice
    argv = ["video2video", "--ref", str(data / "ref.png"), "--driving", str(data / "driving.mp4")]
    _error([*argv, "--out", str(tmp_path / "v.mp4"), "--smooth", "0"], capsys, "--smooth must be at least 1")
    _error(["demo", "--identity", "-1", "--out-dir", str(tmp_path / "d")], capsys, "--identity must be >= 0")


# --- 5. files written ---------------------------------------------------------------------------------------
def test_saved_pipeline_follows_the_umask(pipe, tmp_path):
    old = os.umask(0o022)
    try:
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes["saved"] == 0o755
    assert all(m == (0o755 if (tmp_path / k).is_dir() else 0o644) for k, m in modes.items()), modes


def _sigterm_leaves_nothing(tmp_path, argv, wait_for):
    """Start ``anim-lab argv``, wait until ``wait_for(tmp_path)`` (its temporary output exists), send SIGTERM,
    and return (exit code, what is left in tmp_path)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "anim_lab.cli", *argv], stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not wait_for(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode(), sorted(p.name for p in tmp_path.iterdir())


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    V.write_video(work / "long.mp4", np.concatenate([_face_frames(40)] * 5), fps=25)
    code, err, left = _sigterm_leaves_nothing(
        work,
        ["video2pose", str(work / "long.mp4"), str(work / "poses.mp4")],
        lambda d: any(p.name.startswith(".poses.") for p in d.iterdir()),
    )
    assert code == 143 and "interrupted; nothing was written" in err
    assert left == ["long.mp4"]  # no .poses.XXXX.mp4 beside it
