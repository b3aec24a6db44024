"""anim_lab.files: outputs never land on an input or on what the program did not write; written files follow
the umask; training state round-trips through safetensors + JSON without pickle."""

import json
import os
from pathlib import Path

import pytest
import torch

from anim_lab import files
from anim_lab.files import OutputError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_current_umask_reads_without_changing(umask_022):
    assert files.current_umask() == 0o022
    os.umask(0o027)
    assert files.current_umask() == 0o027
    assert files.current_umask() == 0o027  # reading twice leaves it as it was


def test_output_file_refuses_an_input_a_folder_and_a_bad_suffix(tmp_path):
    source = tmp_path / "talk.mp4"
    source.write_bytes(b"the user's video")
    (tmp_path / "link.mp4").symlink_to(source)
    os.link(source, tmp_path / "hard.mp4")
    (tmp_path / "sub").mkdir()
    for same in (source, tmp_path / "link.mp4", tmp_path / "hard.mp4", tmp_path / "sub" / ".." / "talk.mp4"):
        with pytest.raises(OutputError, match="is the input --driving .* destroy the input"):
            files.check_output_file(same, (".mp4",), inputs={"--driving": source})
    assert source.read_bytes() == b"the user's video"
    with pytest.raises(OutputError, match="is a folder"):
        files.check_output_file(tmp_path, (".mp4",))
    with pytest.raises(OutputError, match=r"must end in \.mp4 or \.gif, got 'x.avi'"):
        files.check_output_file(tmp_path / "x.avi", (".mp4", ".gif"))
    # an existing output of the right kind that is not an input is what the command writes: accepted
    (tmp_path / "old_out.mp4").write_bytes(b"an earlier output")
    assert files.check_output_file(tmp_path / "old_out.mp4", (".mp4",), inputs={"--driving": source})


def test_unwritable_destinations_are_found_by_a_real_probe(tmp_path):
    for path in ("/sys/anim_lab_out.mp4", "/proc/anim_lab/out.mp4"):
        with pytest.raises(OutputError, match="not writable|is a file"):
            files.check_output_file(path, (".mp4",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        files.check_output_file(tmp_path / "file" / "out.mp4", (".mp4",))
    files.check_output_file(tmp_path / "new" / "deeper" / "out.mp4", (".mp4",))  # made later: fine
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


OWN = ("a.txt", "sub/b.bin")


def _staged(tmp_path, content: str) -> Path:
    tmp = files.staging_folder(tmp_path / "out")
    (tmp / "sub").mkdir()
    (tmp / "a.txt").write_text(content)
    (tmp / "sub" / "b.bin").write_text(content)
    return tmp


def test_foreign_entries_names_what_the_program_does_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("1")
    (out / "sub" / "b.bin").write_text("1")
    assert files.foreign_entries(out, OWN) == []
    (out / "thesis.txt").write_text("mine")
    (out / "photos").mkdir()
    (out / "photos" / "p.jpg").write_text("mine")
    (out / "sub" / "notes.md").write_text("mine")
    assert files.foreign_entries(out, OWN) == ["photos/", "sub/notes.md", "thesis.txt"]


def test_publish_folder_new_own_foreign_and_force(tmp_path, umask_022):
    out = tmp_path / "out"
    files.publish_folder(_staged(tmp_path, "1"), out, OWN)  # new
    assert (out / "a.txt").read_text() == "1"
    assert oct(out.stat().st_mode & 0o777) == "0o755"  # mkdtemp's 0700 became a new folder's mode
    assert oct((out / "sub" / "b.bin").stat().st_mode & 0o777) == "0o644"
    files.publish_folder(_staged(tmp_path, "2"), out, OWN)  # only its own files: replaced
    assert (out / "sub" / "b.bin").read_text() == "2"
    (out / "thesis.txt").write_text("mine")
    with pytest.raises(OutputError, match="thesis.txt"):
        files.check_output_folder(out, OWN)
    with pytest.raises(OutputError, match="thesis.txt.*nothing was replaced"):
        files.publish_folder(_staged(tmp_path, "3"), out, OWN)
    assert (out / "a.txt").read_text() == "2"
    files.check_output_folder(out, OWN, force=True)
    files.publish_folder(_staged(tmp_path, "4"), out, OWN, force=True)
    assert (out / "a.txt").read_text() == "4" and (out / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_publish_into_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    files.publish_folder(_staged(tmp_path, "1"), Path("."), OWN)  # '.' empty: files moved in
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["a.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_check_output_folder_refuses_a_folder_holding_an_input(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.txt").write_text("weights")
    with pytest.raises(OutputError, match="holds the input --weights"):
        files.check_output_folder(tmp_path / "w", OWN, inputs={"--weights": tmp_path / "w" / "a.txt"})
    with pytest.raises(OutputError, match="is a file"):
        files.check_output_folder(tmp_path / "w" / "a.txt", OWN)


def test_state_round_trip_keeps_types_and_values(tmp_path, umask_022):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(5)
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),  # int keys, tuples (betas), None, bools
        "gen": g.get_state(),
        "log": [{"step": 1, "loss": 0.5}],
        "weird": {"nan": float("nan"), "inf": float("-inf"), "big": 2**100, 3: "int key", "t": (1, (2, 3))},
    }
    path = files.save_state(state, tmp_path / "ckpt.pt")
    assert path == tmp_path / "ckpt.safetensors" and (tmp_path / "ckpt.json").is_file()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    back = files.load_state(tmp_path / "ckpt")
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    g2 = torch.Generator()
    g2.set_state(back["gen"])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    weird = back["weird"]
    assert weird[3] == "int key" and weird["big"] == 2**100 and weird["t"] == (1, (2, 3))
    assert weird["inf"] == float("-inf") and weird["nan"] != weird["nan"]
    assert back["log"] == state["log"]


def test_state_refuses_objects_and_names_bad_files(tmp_path):
    with pytest.raises(TypeError, match="/obj is a object"):
        files.save_state({"obj": object()}, tmp_path / "s")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="s.safetensors is missing"):
        files.load_state(tmp_path / "s")
    files.save_state({"x": torch.ones(2)}, tmp_path / "s")
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ValueError, match="s.json is not a training state"):
        files.load_state(tmp_path / "s")
    (tmp_path / "s.json").write_text(json.dumps({"__tensor__": "missing"}))
    with pytest.raises(ValueError, match="s.json is not a training state"):
        files.load_state(tmp_path / "s")
