"""Every chapters/chNN_*.py has an .ipynb with the same cells, executed in order in one kernel.

Strict nbval compares a notebook's committed outputs with a fresh run; it compares nothing for a cell that was
never executed, and it tests the .ipynb, not the .py a reader edits. These checks close both gaps.
"""

import json
import shutil
from pathlib import Path

import jupytext
import pytest

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
            f"({len(py_cells)} vs {len(nb_cells)} cells); run `make notebook CH={py.stem}`"
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
            f"{nb_path.name} was not executed top to bottom in one kernel: execution counts {counts}; "
            f"run `make notebook CH={py.stem}`"
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


def test_missing_notebook_fails(good_copy):
    good_copy.with_suffix(".ipynb").unlink()
    assert any("has no" in p for p in pair_problems(good_copy))
