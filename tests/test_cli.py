"""The ``anim-lab`` command: video2pose and animate end to end on tiny random weights, and every user error
(each with its message, and nothing written)."""

import os

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from helpers import tone
from test_pipeline import tiny_pipeline

from anim_lab import cli
from anim_lab import video as V

SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A saved tiny pipeline, a reference portrait (the astronaut, 512 px: resized with a notice), a driving
    video (a moving crop of the astronaut, 12.5 fps, with a tone) and a folder of pose images."""
    d = tmp_path_factory.mktemp("cli")
    tiny_pipeline().save_pretrained(d / "weights")
    img = skimage.data.astronaut()
    PIL.Image.fromarray(img).save(d / "ref.png")
    frames = np.stack(
        [img[30 + i : 286 + i, 100 + 2 * i : 356 + 2 * i] for i in range(5)]
    )  # (5, 256, 256, 3)
    V.write_video(d / "driving.mp4", frames, fps=12.5, audio_from=tone(d / "tone.wav"), quality=9)
    (d / "poses").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            d / "poses" / f"{i:03d}.png"
        )
    return d


def animate_args(data, out, *extra):
    return [
        "animate",
        "--ref",
        str(data / "ref.png"),
        "--driving",
        str(data / "poses"),
        "--out",
        str(out),
        "--weights",
        str(data / "weights"),
        "--steps",
        "1",
        "--context-frames",
        "4",
        "--context-overlap",
        "1",
        *extra,
    ]


def run_animate(argv):
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_help_texts_explain_the_commands(capsys):
    for argv, words in (
        (["--help"], ["animate", "video2pose"]),
        (
            ["animate", "--help"],
            ["--ref", "--driving", "--weights", "--layout", "--steps", "--cfg", "--seed"],
        ),
        (["video2pose", "--help"], ["IN", "OUT", "same frame rate"]),
    ):
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words), (argv, text)


def test_video2pose_keeps_fps_and_audio(data, tmp_path):
    out = tmp_path / "pose.mp4"
    assert cli.main(["video2pose", str(data / "driving.mp4"), str(out), "--size", "64"]) == 0
    frames, fps = V.read_video(out)
    assert frames.shape == (5, 64, 64, 3) and fps == 12.5 and V.has_audio(out)
    assert leftovers(tmp_path) == ["pose.mp4"]


def test_animate_with_a_pose_folder(data, tmp_path, capsys):
    out = tmp_path / "out.gif"
    run_animate(animate_args(data, out, "--fps", "5"))
    frames, fps = V.read_video(out)
    assert frames.shape == (3, SIZE, SIZE, 3) and fps == 5
    assert "resizing the reference image from 512x512 to 64x64" in capsys.readouterr().err  # a notice
    assert leftovers(tmp_path) == ["out.gif"]


def test_animate_with_a_driving_video_keeps_fps_and_audio(data, tmp_path):
    out = tmp_path / "out.mp4"
    argv = animate_args(data, out, "--frames", "4", "--seed", "3")
    argv[argv.index("--driving") + 1] = str(data / "driving.mp4")
    assert cli.main(argv) == 0
    frames, fps = V.read_video(out)
    assert frames.shape == (4, SIZE, SIZE, 3) and fps == 12.5 and V.has_audio(out)
    # the same seed gives the same video
    again = tmp_path / "again.mp4"
    argv[argv.index("--out") + 1] = str(again)
    cli.main(argv)
    assert np.array_equal(V.read_video(again)[0], frames)


# --- errors: each names the problem, and nothing is written ---------------------------------------------
def _error(argv, tmp_path, match):
    before = leftovers(tmp_path)
    with pytest.raises(cli.CliError, match=match):
        run_animate(argv)
    assert leftovers(tmp_path) == before  # nothing half-written


def test_no_face_in_the_reference(data, tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(tmp_path / "noface.png")
    argv = animate_args(data, tmp_path / "out.mp4")
    argv[argv.index("--ref") + 1] = str(tmp_path / "noface.png")
    _error(argv, tmp_path, "no face found in the reference image noface.png")


def test_driving_frames_of_mixed_sizes(data, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    PIL.Image.new("RGB", (64, 64)).save(folder / "a.png")
    PIL.Image.new("RGB", (64, 48)).save(folder / "b.png")
    argv = animate_args(data, tmp_path / "out.mp4")
    argv[argv.index("--driving") + 1] = str(folder)
    _error(argv, tmp_path, "b.png is 64x48 but a.png is 64x64; all pose images must have the same size")


def test_zero_driving_frames(data, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = animate_args(data, tmp_path / "out.mp4")
    argv[argv.index("--driving") + 1] = str(tmp_path / "empty")
    _error(argv, tmp_path, "has no pose images .* zero frames")
    argv[argv.index("--driving") + 1] = str(tmp_path / "missing.mp4")
    _error(argv, tmp_path, "no such video file or folder")


def test_weights_missing_wrong_layout_or_toy(data, tmp_path, monkeypatch):
    argv = animate_args(data, tmp_path / "out.mp4")
    argv[argv.index("--weights") + 1] = str(tmp_path / "nowhere")
    _error(argv, tmp_path, "nowhere: no such folder")
    argv[argv.index("--weights") + 1] = str(data / "weights")
    _error(
        argv + ["--layout", "animate_anyone"],
        tmp_path,
        r"(?s)animate_anyone\) \(this folder was saved by anim_lab: use --layout anim_lab.*Expected",
    )
    _error(argv + ["--layout", "aniportrait"], tmp_path, r"(?s)layout aniportrait.*incomplete")
    argv[argv.index("--weights") + 1] = "toy"
    monkeypatch.setattr(cli, "TOY_ANIMATOR_DIR", tmp_path / "no_toy_animator")
    _error(argv, tmp_path, r"toy animator folder .*no_toy_animator does not exist; train it")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU refusal")
def test_half_precision_on_cpu(data, tmp_path):
    argv = animate_args(data, tmp_path / "out.mp4", "--device", "cpu")
    _error(argv + ["--dtype", "fp16"], tmp_path, "--dtype fp16 needs a CUDA GPU; on the CPU use --dtype fp32")
    _error(argv + ["--dtype", "bf16"], tmp_path, "--dtype bf16 needs a CUDA GPU")
    _error(animate_args(data, tmp_path / "o.mp4", "--device", "cuda"), tmp_path, "no CUDA GPU is available")


def test_output_not_writable(data, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    _error(animate_args(data, blocker / "out.mp4"), tmp_path, "file.txt is a file, not a folder")
    _error(animate_args(data, "/sys/out.mp4"), tmp_path, "the folder /sys is not writable")  # even as root
    _error(animate_args(data, tmp_path / "out.avi"), tmp_path, r"must end in .mp4 or .gif")
    _error(animate_args(data, tmp_path), tmp_path, "is a folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _error(animate_args(data, locked / "out.mp4"), tmp_path, "is not writable")


def test_bad_numbers(data, tmp_path):
    _error(animate_args(data, tmp_path / "o.mp4", "--size", "60"), tmp_path, "--size must be a multiple of 8")
    _error(animate_args(data, tmp_path / "o.mp4", "--size", "big"), tmp_path, "--size must be N or HxW")
    _error(animate_args(data, tmp_path / "o.mp4", "--frames", "9"), tmp_path, "has only 3 frames")
    _error(animate_args(data, tmp_path / "o.mp4", "--steps", "0"), tmp_path, "--steps must be at least 1")


def test_main_prints_the_error_and_exits_2(data, tmp_path, capsys):
    argv = animate_args(data, tmp_path / "out.mp4")
    argv[argv.index("--weights") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("anim-lab animate: error: --weights ") and "no such folder" in message
    assert "Traceback" not in message
    with pytest.raises(SystemExit) as err:
        cli.main(["video2pose", str(tmp_path / "missing.mp4"), str(tmp_path / "p.mp4")])
    assert err.value.code == 2 and "no such video file" in capsys.readouterr().err
