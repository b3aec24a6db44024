"""The setup path: the Makefile, environment.yml, constraints.txt and pyproject.toml must agree."""

import re
from pathlib import Path

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
    assert pip_lines == ["-c constraints.txt", "-e .[faces,test]"]
    # The Makefile installs the same package+extras with the same constraints ...
    assert '$(PIP) install -q -c constraints.txt -e ".[faces,test]"' in make
    # ... and mediapipe apart, with --no-deps, at the pinned version, which environment.yml tells conda users
    # to run.
    mediapipe = _makefile_var("MEDIAPIPE")
    assert mediapipe == f"mediapipe=={_pins()['mediapipe']}"
    assert f"pip install --no-deps {mediapipe}" in env
    assert "python=3.11" in env


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines()]
    assert "make test" in commands, "README must show `make test`"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"


def test_jupyterlab_stays_out_of_the_test_path():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    everything_tested = (
        meta["dependencies"] + meta["optional-dependencies"]["test"] + meta["optional-dependencies"]["faces"]
    )
    assert not any(r.startswith("jupyterlab") for r in everything_tested)
    assert any(r.startswith("jupyterlab") for r in meta["optional-dependencies"]["lab"])
