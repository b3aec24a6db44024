"""Every chapters/chNN_*.py has an .ipynb with the same cells, executed in order in one kernel.

Strict nbval compares a notebook's committed outputs with a fresh run; it compares nothing for a cell that was
never executed, and it tests the .ipynb, not the .py a reader edits. These checks close both gaps. The pair is
declared in chapters/jupytext.toml, so a save in JupyterLab writes both files and ``jupytext --sync`` brings
the older one up to date; the advice for a stale pair says so before it suggests rebuilding the notebook.
"""

import json
import shutil
import time
from pathlib import Path

import jupytext
import pytest
import tomllib
from jupytext.cli import jupytext as jupytext_cli

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
PY_FILES = sorted(CHAPTERS.glob("ch[0-9][0-9]_*.py"))


def _cells(path: Path) -> list[tuple[str, str]]:
    nb = jupytext.read(path)
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def pair_problems(py: Path) -> list[str]:
    """What is wrong with the pair (py, its .ipynb); an empty list when nothing is."""
    nb_path = py.with_suffix(".ipynb")
    if not nb_path.exists():
        return [f"{py.name} has no {nb_path.name}: run `make notebook CH={py.stem}`"]
    problems = []
    py_cells, nb_cells = _cells(py), _cells(nb_path)
    if py_cells != nb_cells:
        n = next(
            (i for i, (a, b) in enumerate(zip(py_cells, nb_cells, strict=False)) if a != b),
            min(len(py_cells), len(nb_cells)),
        )
        problems.append(
            f"{nb_path.name} is stale: its cells differ from {py.name} from cell {n} on "
            f"({len(py_cells)} vs {len(nb_cells)} cells). If you edited one of the two (in JupyterLab or an "
            f"editor), sync them without losing the edit: `.venv/bin/jupytext --sync chapters/{py.name}` "
            f"(the newer file wins); then re-execute with `make notebook CH={py.stem}`, which rebuilds the "
            f".ipynb from the .py (an edit made only in the .ipynb and not synced is lost)"
        )
    # JupyterLab's check (jupytext's contents manager) when the .ipynb is the newer file, as after `make
    # notebook`: the two files, written back as the .py, must be the same text, header included
    if not problems and jupytext.writes(jupytext.read(py), "py:percent") != jupytext.writes(
        jupytext.read(nb_path), "py:percent"
    ):
        problems.append(
            f"fix: .venv/bin/jupytext --to py:percent chapters/{nb_path.name} -- JupyterLab would refuse to "
            f"open {nb_path.name}: its header (kernelspec) differs from {py.name}'s (the cells are the same)"
        )
    raw = json.loads(nb_path.read_text())
    counts = [
        c.get("execution_count")
        for c in raw["cells"]
        if c["cell_type"] == "code" and "".join(c["source"]).strip()
    ]
    if not counts:
        problems.append(f"{nb_path.name} has no code cells")
    elif counts != list(range(1, len(counts) + 1)):
        problems.append(
            f"fix: make notebook CH={py.stem} -- {nb_path.name} was not executed top to bottom in one kernel "
            f"(a cell run twice?): execution counts {counts}"
        )
    return problems


def test_there_are_chapters():
    assert PY_FILES, "no chapters/chNN_*.py found"


@pytest.mark.parametrize("py", PY_FILES, ids=[p.stem for p in PY_FILES])
def test_chapter_pair_is_fresh_and_executed(py):
    assert pair_problems(py) == []


def test_every_notebook_has_its_py():
    orphans = [nb.name for nb in CHAPTERS.glob("ch[0-9][0-9]_*.ipynb") if not nb.with_suffix(".py").exists()]
    assert orphans == []


# The check must fail on bad copies: stale source, unexecuted cells, cells run out of order, missing notebook.
@pytest.fixture
def good_copy(tmp_path):
    py = PY_FILES[0]
    shutil.copy(py, tmp_path / py.name)
    shutil.copy(py.with_suffix(".ipynb"), tmp_path / py.with_suffix(".ipynb").name)
    return tmp_path / py.name


def _edit_nb(py: Path, edit):
    nb_path = py.with_suffix(".ipynb")
    raw = json.loads(nb_path.read_text())
    edit([c for c in raw["cells"] if c["cell_type"] == "code"])
    nb_path.write_text(json.dumps(raw))


def test_good_copy_passes(good_copy):
    assert pair_problems(good_copy) == []


def test_stale_notebook_fails(good_copy):
    good_copy.write_text(good_copy.read_text() + "\n# %%\nprint('a cell the notebook never saw')\n")
    assert any("stale" in p for p in pair_problems(good_copy))


def test_unexecuted_notebook_fails(good_copy):
    def clear(cells):
        for c in cells:
            c["execution_count"] = None
            c["outputs"] = []

    _edit_nb(good_copy, clear)
    assert any("not executed" in p for p in pair_problems(good_copy))


def test_out_of_order_notebook_fails(good_copy):
    def swap(cells):
        cells[0]["execution_count"], cells[1]["execution_count"] = (
            cells[1]["execution_count"],
            cells[0]["execution_count"],
        )

    _edit_nb(good_copy, swap)
    assert any("not executed" in p for p in pair_problems(good_copy))


def test_a_header_lab_would_refuse_fails(good_copy):
    """`display_name: Python 3` in the .py against `Python 3 (ipykernel)` in the .ipynb: JupyterLab refused to
    open a chapter rebuilt by `make notebook` ("... is more recent than ...")."""
    good_copy.write_text(
        good_copy.read_text().replace("display_name: Python 3 (ipykernel)", "display_name: Python 3")
    )
    assert any("JupyterLab would refuse" in p for p in pair_problems(good_copy))
    jupytext_cli(
        ["--to", "py:percent", "--quiet", str(good_copy.with_suffix(".ipynb"))]
    )  # the advice fixes it
    assert pair_problems(good_copy) == []


def test_missing_notebook_fails(good_copy):
    good_copy.with_suffix(".ipynb").unlink()
    assert any("has no" in p for p in pair_problems(good_copy))


# --- the pairing config, and a Lab edit kept by a sync -----------------------------------------------------
def test_jupytext_config_pairs_ipynb_and_percent_py():
    config = tomllib.loads((CHAPTERS / "jupytext.toml").read_text())
    assert config["formats"] == "ipynb,py:percent"


def test_stale_advice_syncs_before_it_rebuilds(good_copy):
    good_copy.write_text(good_copy.read_text() + "\n# %%\nprint('new')\n")
    (advice,) = [p for p in pair_problems(good_copy) if "stale" in p]
    assert "jupytext --sync" in advice and "make notebook" in advice
    assert advice.index("jupytext --sync") < advice.index("make notebook")


def test_an_edit_saved_in_the_notebook_reaches_the_py_with_sync(good_copy):
    """What a student does in Lab (edit the .ipynb) is carried into the .py by `jupytext --sync` with the
    chapters' config, and the pair is fresh again: nothing is lost and no cell is re-executed."""
    shutil.copy(CHAPTERS / "jupytext.toml", good_copy.parent / "jupytext.toml")
    nb_path = good_copy.with_suffix(".ipynb")
    raw = json.loads(nb_path.read_text())
    raw["cells"].insert(
        1, {"cell_type": "markdown", "id": "note", "metadata": {}, "source": ["My own note."]}
    )
    code = next(c for c in raw["cells"] if c["cell_type"] == "code")
    code["source"] = "".join(code["source"]) + "\nanswer = 42  # my exercise"
    time.sleep(1.1)  # the sync keeps the newer file's content: make the edit clearly newer
    nb_path.write_text(json.dumps(raw))
    assert any("stale" in p for p in pair_problems(good_copy))
    jupytext_cli(["--sync", "--quiet", str(nb_path)])
    text = good_copy.read_text()
    assert "# My own note." in text and "answer = 42  # my exercise" in text
    assert pair_problems(good_copy) == []
    outputs = [c.get("outputs") for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]
    assert any(outputs)  # the executed outputs are still there
