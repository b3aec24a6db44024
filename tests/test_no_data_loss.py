"""Nothing lost: no command, pipeline method or training script deletes or overwrites what it did not write.

Each test here reproduces a reported loss (the user's files are planted first) and checks that they are all
still there, byte for byte, after the command: refused with a message that names them, or, with --force,
only the program's own files replaced.
"""

import json

import pytest
from test_cli import animate_args, data  # noqa: F401  (the module fixture: saved weights, ref, driving)
from test_pipeline import tiny_pipeline

from anim_lab import cli
from anim_lab.files import OutputError


def plant_user_files(folder):
    """A user's folder: a thesis and a photo album. Returns {relative path: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "photos").mkdir()
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    return snapshot(folder)


def snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def kept(before, folder):
    now = snapshot(folder)
    return all(now.get(k) == v for k, v in before.items())


def _cli_error(argv, capsys, match):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    message = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in message
    assert __import__("re").search(match, message), message
    return message


# --- anim-lab demo --out-dir --------------------------------------------------------------------------------
def test_demo_refuses_a_folder_with_the_users_files(tiny_animator_weights, tmp_path, capsys):
    out = tmp_path / "mine"
    before = plant_user_files(out)
    argv = ["demo", "--weights", str(tiny_animator_weights), "--frames", "2", "--steps", "1", "--no-progress"]
    _cli_error([*argv, "--out-dir", str(out)], capsys, r"already holds files .*photos/, thesis\.txt.*--force")
    assert snapshot(out) == before
    # --force: the demo's three files join the user's, which stay as they were
    assert cli.main([*argv, "--out-dir", str(out), "--force"]) == 0
    assert kept(before, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "demo.gif",
        "demo.mp4",
        "photos",
        "strip.png",
        "thesis.txt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left


def test_demo_out_dir_dot_keeps_the_working_folder(tiny_animator_weights, tmp_path, capsys, monkeypatch):
    before = plant_user_files(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    argv = ["demo", "--weights", str(tiny_animator_weights), "--frames", "2", "--steps", "1", "--no-progress"]
    _cli_error([*argv, "--out-dir", "."], capsys, "already holds files")
    assert snapshot(tmp_path / "work") == before
    assert cli.main([*argv, "--out-dir", ".", "--force"]) == 0
    assert kept(before, tmp_path / "work") and (tmp_path / "work" / "demo.mp4").is_file()


def test_demo_replaces_its_own_earlier_output(tiny_animator_weights, tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--weights", str(tiny_animator_weights), "--out-dir", str(out), "--steps", "1"]
    assert cli.main([*argv, "--frames", "2", "--no-progress"]) == 0
    first = snapshot(out)
    assert cli.main([*argv, "--frames", "3", "--no-progress"]) == 0  # only its own files there: replaced
    assert sorted(snapshot(out)) == sorted(first) and snapshot(out) != first


def test_demo_refuses_to_write_into_its_weights(tiny_animator_weights, tmp_path, capsys):
    before = snapshot(tiny_animator_weights)
    argv = [
        "demo",
        "--weights",
        str(tiny_animator_weights),
        "--out-dir",
        str(tiny_animator_weights),
        "--force",
    ]
    _cli_error(argv, capsys, "holds the input --weights")
    assert snapshot(tiny_animator_weights) == before


# --- Pose2VideoPipeline.save_pretrained ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_save_pretrained_keeps_the_users_files(pipe, tmp_path):
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    pipe.save_pretrained(folder)  # an earlier save holds only its own files: replaced
    (folder / "my_notes.txt").write_text("notes")
    (folder / "samples").mkdir()
    (folder / "samples" / "a.mp4").write_bytes(b"video")
    before = snapshot(folder)
    with pytest.raises(OutputError, match=r"my_notes\.txt, samples/.*force=True"):
        pipe.save_pretrained(folder)
    assert snapshot(folder) == before
    pipe.save_pretrained(folder, force=True)
    assert (folder / "my_notes.txt").read_text() == "notes" and (folder / "samples" / "a.mp4").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_save_pretrained_refuses_a_stable_diffusion_folder(pipe, tmp_path):
    sd = tmp_path / "sd15"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights")
    (sd / "README.md").write_text("model card")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    before = snapshot(sd)
    for force in (False, True):
        with pytest.raises(OutputError, match="holds another pipeline .*StableDiffusionPipeline"):
            pipe.save_pretrained(sd, force=force)
    assert snapshot(sd) == before


# --- an output equal to an input ----------------------------------------------------------------------------
def test_animate_out_equal_to_driving_is_refused(data, tmp_path, capsys):  # noqa: F811
    driving = tmp_path / "driving.mp4"
    driving.write_bytes((data / "driving.mp4").read_bytes())
    before = driving.read_bytes()
    argv = animate_args(data, driving)
    argv[argv.index("--driving") + 1] = str(driving)
    _cli_error(argv, capsys, "is the input --driving")
    assert driving.read_bytes() == before


def test_video2pose_out_equal_to_in_is_refused(data, tmp_path, capsys):  # noqa: F811
    video = tmp_path / "talk.mp4"
    video.write_bytes((data / "driving.mp4").read_bytes())
    before = video.read_bytes()
    _cli_error(["video2pose", str(video), str(video)], capsys, "is the input IN")
    (tmp_path / "alias.mp4").symlink_to(video)
    _cli_error(["video2pose", str(video), str(tmp_path / "alias.mp4")], capsys, "is the input IN")
    assert video.read_bytes() == before


def test_video2video_out_equal_to_driving_is_refused(data, tmp_path, capsys):  # noqa: F811
    video = tmp_path / "talk.mp4"
    video.write_bytes((data / "driving.mp4").read_bytes())
    before = video.read_bytes()
    argv = ["video2video", "--ref", str(data / "ref.png"), "--driving", str(video), "--out", str(video)]
    _cli_error(argv, capsys, "is the input --driving")
    assert video.read_bytes() == before
    # the API refuses it too
    from anim_lab.cli import video2video_command

    with pytest.raises(OutputError, match="is the input"):
        video2video_command(data / "ref.png", video, video, progress=False)
    from anim_lab.landmarks import video_to_pose

    with pytest.raises(OutputError, match="is the input"):
        video_to_pose(video, video, progress=False)
    assert video.read_bytes() == before


# --- training scripts ---------------------------------------------------------------------------------------
def test_train_animator_refuses_a_foreign_output_folder(tmp_path):
    """write_weights never removes a folder that holds files the script does not write."""
    import torch
    from test_train_animator import TINY

    import anim_lab

    T = anim_lab.load_script("train_animator")
    torch.manual_seed(0)
    animator = T.Animator(TINY, stage=1)
    target = tmp_path / "toy_animator"
    before = plant_user_files(target)
    with pytest.raises(T.TrainError, match=r"photos/, thesis\.txt.*use a new --out"):
        T.write_weights(animator, target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_animator"]
    T.write_weights(animator, tmp_path / "fresh", state={"step": 3, "w": torch.ones(2)})
    T.write_weights(animator, tmp_path / "fresh", state={"step": 4, "w": torch.ones(2)})  # its own: replaced
    assert T.files.load_state(tmp_path / "fresh" / "state.safetensors")["step"] == 4


def test_train_toy_clip_refuses_a_foreign_output_folder(tmp_path):
    import anim_lab

    T = anim_lab.load_script("train_toy_clip")
    before = plant_user_files(tmp_path / "clip")
    with pytest.raises(OutputError, match="thesis.txt"):
        T.train(out=tmp_path / "clip", encoder_out=None, max_steps=1, data={}, progress=False)
    assert snapshot(tmp_path / "clip") == before
