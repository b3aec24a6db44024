"""The setup path: the Makefile, environment.yml, constraints.txt and pyproject.toml must agree."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _makefile_var(name: str) -> str:
    return re.search(rf"^{name}\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()


def test_constraints_pin_the_tested_versions():
    pins = _pins()
    assert pins["torch"] == "2.13.0" and pins["mediapipe"] == "0.10.21"
    for name in [
        "diffusers",
        "transformers",
        "einops",
        "jupytext",
        "nbval",
        "nbclient",
        "ipykernel",
        "matplotlib",
        "opencv-python-headless",
        "scikit-image",
        "numpy",
        "protobuf",
        "jupyterlab",
        # the Lab tree, not just JupyterLab itself
        "jupyter-server",
        "jupyterlab-server",
        "jupyter-lsp",
        "notebook-shim",
        "tornado",
        "ipywidgets",
        "widgetsnbextension",
        "jupyterlab-widgets",
    ]:
        assert name in pins, f"constraints.txt does not pin {name}"


def test_pyproject_ranges_admit_the_pinned_versions():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    reqs = [Requirement(r) for r in meta["dependencies"]]
    reqs += [Requirement(r) for extra in meta["optional-dependencies"].values() for r in extra]
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} has a range in pyproject.toml but no tested pin in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"{req} excludes the pinned {pins[name]}"
        )
        assert "==" not in str(req.specifier), f"pyproject.toml keeps ranges, not pins: {req}"


def test_environment_yml_installs_the_same_set_as_the_makefile():
    env = (ROOT / "environment.yml").read_text()
    make = (ROOT / "Makefile").read_text()
    pip_lines = re.findall(r"^\s+- (-[ce] .+)$", env, re.M)
    assert pip_lines == ["-c constraints.txt", "-e .[faces,test,labs]"]
    # The Makefile installs the same package+extras with the same constraints ...
    assert '$(PIP) install -q -c constraints.txt -e ".[faces,test,labs]"' in make
    # ... and mediapipe apart, with --no-deps, at the pinned version, which environment.yml tells conda users
    # to run.
    mediapipe = _makefile_var("MEDIAPIPE")
    assert mediapipe == f"mediapipe=={_pins()['mediapipe']}"
    assert f"pip install --no-deps {mediapipe}" in env
    assert "python=3.11" in env


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = [line.split(" #")[0].strip() for b in blocks for line in b.splitlines()]  # without comments
    assert "make test" in commands, "README must show `make test`"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"
    assert "git status --porcelain" in ci


def test_jupyterlab_stays_out_of_the_test_path():
    """No tested extra asks for JupyterLab itself. (The [labs] extra's nbgrader, which the lab tests run,
    brings jupyter_server and JupyterLab along: nbgrader imports its server extensions when imported. What
    that costs the tests was measured: jupyter-events' jsonschema format checkers add about 1 s to the first
    nbformat import of each test process, not per notebook.)"""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    everything_tested = meta["dependencies"] + extras["test"] + extras["faces"] + extras["labs"]
    assert not any(r.startswith("jupyterlab") for r in everything_tested)
    assert any(r.startswith("jupyterlab") for r in meta["optional-dependencies"]["lab"])


# --- make: dry runs in a scratch copy (nothing is installed or started) -------------------------------------
def _fake_bin(tmp_path: Path, name: str, script: str) -> None:
    (tmp_path / "bin").mkdir(exist_ok=True)
    path = tmp_path / "bin" / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


@pytest.fixture
def scratch(tmp_path):
    """The Makefile and what its stamps depend on, two chapter stubs, installed stamps newer than both."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "chapters").mkdir()
    for ch in ("ch00_map.py", "ch01_faces.py"):
        (tmp_path / "chapters" / ch).write_text("# %%\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    for stamp in (".installed", ".installed-lab"):
        (tmp_path / ".venv" / stamp).touch()
    later = os.stat(tmp_path / "Makefile").st_mtime + 10
    for stamp in (".installed", ".installed-lab"):
        os.utime(tmp_path / ".venv" / stamp, (later, later))
    return tmp_path


def _make_n(scratch: Path, *args: str, uid: int | None = None) -> list[str]:
    # a top-level make even under `make test` (an inherited MAKELEVEL/MAKEFLAGS prints "Entering directory")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    if uid is not None:  # `id -u` answers this uid
        _fake_bin(scratch, "id", f'[ "$1" = "-u" ] && echo {uid} || /usr/bin/id "$@"')
        env["PATH"] = f"{scratch / 'bin'}:{env['PATH']}"
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=scratch, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_lab_as_root_adds_allow_root_and_passes_options(scratch):
    (line,) = _make_n(scratch, "lab", "LAB_OPTS=--port 8890 --no-browser", uid=0)
    assert line == ".venv/bin/jupyter lab --notebook-dir=chapters --allow-root --port 8890 --no-browser"


@needs_make
def test_lab_as_a_user_has_no_allow_root(scratch):
    (line,) = _make_n(scratch, "lab", uid=1000)
    assert line.split() == [".venv/bin/jupyter", "lab", "--notebook-dir=chapters"]


@needs_make
def test_lab_installs_the_lab_extra_once(scratch):
    """With both stamps fresh, `make lab` only starts Jupyter; without the lab stamp it installs [lab] first;
    a changed pyproject.toml reinstalls both."""
    assert len(_make_n(scratch, "lab", uid=1000)) == 1
    (scratch / ".venv" / ".installed-lab").unlink()
    lines = _make_n(scratch, "lab", uid=1000)
    assert any('install -q -c constraints.txt -e ".[faces,test,labs,lab]"' in x for x in lines)
    assert not any('-e ".[faces,test,labs]"' in x for x in lines)  # the base install is not redone
    assert lines[-1].startswith(".venv/bin/jupyter lab")
    newer = os.stat(scratch / ".venv" / ".installed").st_mtime + 10
    os.utime(scratch / "pyproject.toml", (newer, newer))
    lines = _make_n(scratch, "lab", uid=1000)
    assert any('-e ".[faces,test,labs]"' in x for x in lines) and any(
        "[faces,test,labs,lab]" in x for x in lines
    )


@needs_make
def test_figures_reexecutes_every_chapter_with_the_switch(scratch):
    loop = " ".join(_make_n(scratch, "figures"))
    assert "ANIM_LAB_SAVE_FIGURES=1" in loop and "--execute $py" in loop
    assert "for py in ch00_map.py ch01_faces.py" in loop
    assert "anim-lab demo --out-dir out/demo && cp out/demo/strip.png figures/demo_strip.png" in loop
    (note,) = _make_n(scratch, "notebook", "CH=ch00_map")[-1:]
    assert "ANIM_LAB_SAVE_FIGURES=1" in note and note.endswith("--execute ch00_map.py")


def test_ci_fails_on_a_dirty_tree_and_names_the_change(tmp_path):
    """.ci/run in a scratch git repository, with `make` replaced: clean after the tests -> 0; a file written
    by the tests -> 1, and the file is named."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "figures").mkdir()
    (repo / "figures" / "a.png").write_bytes(b"1")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True, capture_output=True)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    _fake_bin(tmp_path, "make", "exit 0")
    ok = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    _fake_bin(tmp_path, "make", "echo 2 > figures/a.png")  # a test run that rewrites a tracked figure
    dirty = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, env=env)
    assert dirty.returncode == 1 and "figures/a.png" in dirty.stderr, dirty.stderr


def test_ipywidgets_where_chapters_run():
    """tqdm.auto warns on stderr in a kernel without ipywidgets: nbval ([test]) and Lab both have it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("test", "lab"):
        assert any(Requirement(r).name == "ipywidgets" for r in extras[extra]), extra


def test_load_script_gives_the_scripts_functions_and_names_a_missing_one(tmp_path, monkeypatch):
    import anim_lab

    sys.modules.pop("train_animator", None)
    T = anim_lab.load_script("train_animator")
    assert T.__file__ == str(anim_lab.SCRIPTS_DIR / "train_animator.py") and callable(T.diffusion_loss)
    # registered in anim_lab's namespace, not under the script's bare name
    assert sys.modules["anim_lab.scripts.train_animator"] is T and "train_animator" not in sys.modules
    monkeypatch.setattr(anim_lab, "SCRIPTS_DIR", tmp_path / "no_scripts")
    with pytest.raises(FileNotFoundError, match=r"no_scripts/eval_animator.py not found: .*source checkout"):
        anim_lab.load_script("eval_animator")


def test_repo_relative_paths_for_committed_logs(tmp_path):
    import anim_lab

    inside = anim_lab.REPO_DIR / "runs" / "toy_animator" / "cache.pt"
    assert anim_lab.repo_relative(inside) == str(Path("runs") / "toy_animator" / "cache.pt")
    assert anim_lab.repo_relative(tmp_path / "x.pt") == str(tmp_path / "x.pt")  # outside: as given
