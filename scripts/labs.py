"""Course labs with nbgrader: student versions of the chapters, and autograding of one submission.

    python scripts/labs.py release [--out labs] [--core] [chNN ...]   (make labs)
    python scripts/labs.py grade chNN path/to/submission.ipynb         (make grade LAB=chNN SUBMISSION=...)

Every step is nbgrader's own: ``generate_assignment`` (LockCells, ClearSolutions, ClearOutput,
ClearHiddenTests, ComputeChecksums, SaveCells ...) writes a student version from the solved chapter, and
``autograde`` (OverwriteCells restores the locked checks and hidden tests, Execute runs the notebook in a
fresh kernel, SaveAutoGrades scores each graded cell) grades a submission. Both run in a temporary nbgrader
course folder with nbgrader's own SQLite gradebook inside it; nothing is written anywhere else except the
output folder of ``release``.

``release`` never overwrites a student's copy that was edited: it keeps a manifest (``.labs-manifest.json``)
of the SHA-256 of every file it wrote; a file that differs from it (or that it did not write) is left alone
and the new version is written beside it as ``chNN_topic.new.ipynb``.

``--lab-cells`` (used by the tests) keeps only the lab section (from the ``## Lab`` heading on): the graded
exercises are self-contained, so grading them needs neither the chapter's other cells nor its runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = REPO / "chapters"
MANIFEST = ".labs-manifest.json"
LAB_HEADING = "## Lab"
CORE_TAG = "core"
STUDENT = "student"
# nbgrader's default is 30 s a cell; a chapter's trained-model cells take longer on a laptop
CELL_TIMEOUT_S = 600


def chapter_paths() -> list[Path]:
    return sorted(CHAPTERS.glob("ch[0-9][0-9]_*.ipynb"))


def find_chapter(name: str) -> Path:
    """``ch07`` or ``ch07_guidance_and_sampling`` -> chapters/ch07_guidance_and_sampling.ipynb."""
    matches = [p for p in chapter_paths() if p.stem == name or p.stem.split("_")[0] == name]
    if len(matches) != 1:
        known = ", ".join(p.stem.split("_")[0] for p in chapter_paths())
        raise SystemExit(f"unknown lab {name!r}: give a chapter such as ch07 (known: {known})")
    return matches[0]


def is_lab_heading(cell) -> bool:
    return cell.cell_type == "markdown" and cell.source.lstrip().startswith(LAB_HEADING)


def lab_cells_only(nb):
    """A copy of ``nb`` with only its lab section: the cells from the ``## Lab`` heading to the end."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))  # a deep copy that stays a NotebookNode
    start = next((i for i, c in enumerate(nb.cells) if is_lab_heading(c)), None)
    if start is None:
        raise ValueError("the notebook has no '## Lab' section")
    nb.cells = nb.cells[start:]
    return nb


def core_cells_only(nb):
    """A copy of ``nb`` with the cells tagged ``core`` (the path a 45-minute lab keeps)."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    nb.cells = [c for c in nb.cells if CORE_TAG in c.metadata.get("tags", [])]
    return nb


def graded_cells(nb) -> list[dict]:
    """The nbgrader metadata of every graded cell, in notebook order."""
    return [
        dict(c.metadata["nbgrader"]) for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade", False)
    ]


# --- nbgrader in a temporary course folder -----------------------------------------------------------------
def _config(root: Path):
    from traitlets.config import Config

    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.course_id = "anim_lab"
    c.CourseDirectory.db_url = f"sqlite:///{root / 'gradebook.db'}"
    c.Execute.timeout = CELL_TIMEOUT_S
    # chapters print only stable things; any stderr (a warning) must not break grading
    c.Execute.kernel_name = "python3"
    return c


def _api(root: Path):
    import nbgrader.api as nbgrader_api
    from nbgrader.apps import NbGraderAPI

    # nbgrader's gradebook runs the `alembic` command (installed beside this Python) for its schema version
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # ... each time a Gradebook opens: a subprocess of seconds whose answer the installed nbgrader fixes
    if not hasattr(nbgrader_api.get_alembic_version, "cache_info"):
        nbgrader_api.get_alembic_version = functools.cache(nbgrader_api.get_alembic_version)
    logging.getLogger("traitlets").setLevel(logging.ERROR)
    # SQLAlchemy 2 warns inside nbgrader's gradebook on every autograde (nbgrader 0.9.6); the grades are saved
    warnings.filterwarnings("ignore", message=r"Object of type <Submitted\w+> not in session")
    return NbGraderAPI(config=_config(root))


def _check(result: dict, what: str) -> None:
    if not result.get("success"):
        raise RuntimeError(f"nbgrader {what} failed:\n{result.get('error') or ''}\n{result.get('log') or ''}")


@dataclass
class Grade:
    grade_id: str
    score: float
    max_score: float


class Course:
    """A temporary nbgrader course with one assignment generated from a solved notebook (generate_assignment);
    grade as many submissions in it as needed, one student id each. The gradebook (SQLite) lives in the
    course folder."""

    def __init__(self, solved_nb, name: str, root: Path):
        self.name, self.root = name, root
        self.order = [g["grade_id"] for g in graded_cells(solved_nb)]
        source = root / "source" / name
        source.mkdir(parents=True)
        nbformat.write(solved_nb, source / f"{name}.ipynb")
        self.api = _api(root)
        _check(self.api.generate_assignment(name, force=True, create=True), "generate_assignment")

    def student_version(self):
        """nbgrader's student version (what generate_assignment wrote into release/)."""
        return nbformat.read(self.root / "release" / self.name / f"{self.name}.ipynb", as_version=4)

    def autograde(self, submission_nb, student: str = STUDENT) -> tuple[list[Grade], object]:
        """nbgrader's autograde of one submission: the grades in notebook order and the autograded (executed)
        notebook."""
        from nbgrader.api import Gradebook

        submitted = self.root / "submitted" / student / self.name
        submitted.mkdir(parents=True, exist_ok=True)
        nbformat.write(submission_nb, submitted / f"{self.name}.ipynb")
        _check(self.api.autograde(self.name, student, force=True, create=True), "autograde")
        with Gradebook(f"sqlite:///{self.root / 'gradebook.db'}") as gb:
            notebook = gb.find_submission_notebook(self.name, self.name, student)
            by_id = {g.name: Grade(g.name, float(g.score or 0), float(g.max_score)) for g in notebook.grades}
        graded_path = self.root / "autograded" / student / self.name / f"{self.name}.ipynb"
        return [by_id[i] for i in self.order], nbformat.read(graded_path, as_version=4)


@contextlib.contextmanager
def course(solved_nb, name: str):
    """A :class:`Course` for ``solved_nb`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="anim_lab_labs_") as tmp:
        yield Course(solved_nb, name, Path(tmp))


def student_version(solved_nb, name: str):
    """nbgrader's student version of a solved notebook."""
    with course(solved_nb, name) as c:
        return c.student_version()


def autograde(solved_nb, submission_nb, name: str) -> tuple[list[Grade], object]:
    """Grade ``submission_nb`` against the assignment made from ``solved_nb`` with nbgrader's autograde."""
    with course(solved_nb, name) as c:
        return c.autograde(submission_nb)


def format_scores(grades: list[Grade]) -> str:
    width = max(len(g.grade_id) for g in grades)
    lines = [f"{g.grade_id:<{width}}  {g.score:g} / {g.max_score:g}" for g in grades]
    total, most = sum(g.score for g in grades), sum(g.max_score for g in grades)
    lines.append(f"{'total':<{width}}  {total:g} / {most:g}")
    return "\n".join(lines)


# --- release: student versions, never over an edited copy ---------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release(names: list[str], out: Path, core: bool = False) -> list[str]:
    """Write the student version of each chapter into ``out``; returns one line per chapter saying what was
    written. A copy the student edited (it differs from what this command last wrote there) is kept, and the
    new version goes beside it as ``<stem>.new.ipynb``."""
    if out.exists() and out.resolve() == CHAPTERS.resolve():
        raise SystemExit(f"--out {out} is the chapters' own folder: give another folder (default: labs/)")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    report = []
    for path in [find_chapter(n) for n in names] if names else chapter_paths():
        solved = nbformat.read(path, as_version=4)
        if core:
            solved = core_cells_only(solved)
        student = student_version(solved, path.stem)
        student.metadata.pop("jupytext", None)  # the student copy is a plain notebook, not a jupytext pair
        target = out / f"{path.stem}.ipynb"
        if target.exists() and manifest.get(target.name) != _sha256(target):
            target = out / f"{path.stem}.new.ipynb"
            report.append(
                f"{path.stem}: kept your edited {path.stem}.ipynb; the new version is {target.name}"
            )
        else:
            report.append(f"{path.stem}: wrote {target.name}")
        tmp = target.with_name(f".{target.name}.tmp")
        nbformat.write(student, tmp)
        os.replace(tmp, target)
        manifest[target.name] = _sha256(target)
    tmp = manifest_path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="write the student versions (make labs)")
    rel.add_argument("chapters", nargs="*", help="chNN names; all chapters when none")
    rel.add_argument("--out", type=Path, default=REPO / "labs")
    rel.add_argument("--core", action="store_true", help="only the cells tagged 'core' (a 45-minute lab)")
    gr = sub.add_parser("grade", help="autograde one submission (make grade)")
    gr.add_argument("lab", help="the chapter, e.g. ch07")
    gr.add_argument("submission", type=Path, help="the student's notebook (.ipynb)")
    gr.add_argument("--lab-cells", action="store_true", help="execute only the lab section's cells")
    args = parser.parse_args(argv)

    if args.command == "release":
        for line in release(args.chapters, args.out, core=args.core):
            print(line)
        return 0
    path = find_chapter(args.lab)
    if not args.submission.is_file():
        raise SystemExit(f"submission {args.submission} not found: give the student's .ipynb")
    solved = nbformat.read(path, as_version=4)
    submission = nbformat.read(args.submission, as_version=4)
    if args.lab_cells:
        solved, submission = lab_cells_only(solved), lab_cells_only(submission)
    grades, _ = autograde(solved, submission, path.stem)
    print(f"{path.stem}: {args.submission}")
    print(format_scores(grades))
    return 0


if __name__ == "__main__":
    sys.exit(main())
