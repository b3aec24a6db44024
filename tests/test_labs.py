"""The course labs (issue 27): every chapter's graded exercises, run through nbgrader itself.

For each chapter, one temporary nbgrader course is generated from the committed (solved) notebook, and three
submissions are autograded in it, each executing only the lab section (its own setup cell and the exercises;
they are self-contained, so the chapter's other cells and their runtime are not needed):
- the solved lab: full marks;
- the student version as nbgrader releases it: 0 on every "implement it" exercise, each check failing on the
  stub's NotImplementedError, no cell failing before the first check (so the check calls the student's
  function, never the library's);
- the student version with one exercise's solution put back and a deliberately wrong answer (WRONG) in
  another: exactly the first exercise's points, none for the wrong one.
The whole student version (what `make labs` writes) holds no line of any solution block and no hidden test.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

import anim_lab

labs = anim_lab.load_script("labs")
# the grader's kernels: one thread each, as the chapters' kernels under xdist
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHAPTERS = labs.chapter_paths()
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"

# A deliberately wrong answer per chapter: (solution's grade_id, text in the solution, its wrong version).
WRONG = {
    "ch00": ("ch00_conv2d_flops", "return 2 * out.numel()", "return out.numel()"),  # a multiply-add is 2
    "ch01": ("ch01_path_edges", "tuple(sorted(pair))", "tuple(pair)"),  # ordered pairs
    "ch02": ("ch02_sample_latents", "torch.exp(0.5 * ", "torch.exp("),  # the variance as the std
    "ch03": ("ch03_cosine_similarity_matrix", "F.normalize(b.float(), dim=-1).T", "b.float().T"),
    "ch04": ("ch04_position_encoding", "torch.sin(position * inv_freq)", "torch.cos(position * inv_freq)"),
    "ch05": ("ch05_self_attention_names", '("mid_block.", "up_blocks.")', '("up_blocks.",)'),
    "ch06": ("ch06_prepare_pose_images", "x * 2 - 1 if faithful", "x / 255 * 2 - 1 if faithful"),
    # the example: guidance with the sign of (cond - uncond) flipped
    "ch07": ("ch07_cfg_combine", "guidance_scale * (cond - uncond)", "guidance_scale * (uncond - cond)"),
    "ch08": ("ch08_causal_conv3d", "kt - 1, 0)", "0, kt - 1)"),  # padded behind: it sees the future
    "ch09": ("ch09_x0_from_v", "a.sqrt() * x_t - (1 - a).sqrt()", "a.sqrt() * x_t + (1 - a).sqrt()"),
    "ch10": (  # min-SNR without the +1 of v-prediction (0 / 0 at the zero-SNR step)
        "ch10_diffusion_loss",
        "torch.clamp(snr_plus_one, max=snr_gamma) / snr_plus_one",
        "torch.clamp(snr_plus_one - 1, max=snr_gamma) / (snr_plus_one - 1)",
    ),
    "ch11": ("ch11_euler", "np.arctan2(-rotation[2, 0]", "np.arctan2(rotation[2, 0]"),  # yaw's sign
    "ch12": ("ch12_flow_euler", "(sigma_next - sigma)", "(sigma - sigma_next)"),  # steps away from the data
}


def _solution_cells(nb) -> dict[str, object]:
    return {
        c.metadata["nbgrader"]["grade_id"]: c
        for c in nb.cells
        if c.metadata.get("nbgrader", {}).get("solution", False)
    }


def _blocks(source: str, begin: str, end: str) -> list[str]:
    """The lines inside every begin ... end block of ``source``."""
    lines, inside = [], False
    for line in source.splitlines():
        if line.strip() == begin:
            inside = True
        elif line.strip() == end:
            inside = False
        elif inside:
            lines.append(line)
    return lines


def _put_back(student, solved, grade_id: str, edit=None):
    """``student`` with the solved source of solution cell ``grade_id`` (optionally edited) put back."""
    nb = nbformat.from_dict(json.loads(json.dumps(student)))
    source = _solution_cells(solved)[grade_id].source
    if edit is not None:
        old, new = edit
        assert old in source, f"{grade_id}: the wrong answer's text {old!r} is not in the solution"
        source = source.replace(old, new)
    source = "\n".join(
        line for line in source.splitlines() if line.strip() not in (BEGIN, END)
    )  # as a student types it
    _solution_cells(nb)[grade_id].source = source
    return nb


def _errors(nb) -> list[tuple[int, str | None, str]]:
    """(cell index, grade_id or None, exception name) of every cell that raised."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append((i, cell.metadata.get("nbgrader", {}).get("grade_id"), out["ename"]))
    return found


class Lab:
    def __init__(self, path: Path, course):
        self.path, self.key = path, path.stem.split("_")[0]
        self.solved = nbformat.read(path, as_version=4)
        self.student = course.student_version()  # the whole chapter, as `make labs` releases it
        self.solutions = _solution_cells(self.solved)
        self.implement = [
            gid for gid, c in self.solutions.items() if "implement" in c.metadata.get("tags", [])
        ]
        self.checks = {g["grade_id"]: g for g in labs.graded_cells(self.solved)}
        lab_student = labs.lab_cells_only(self.student)
        self.graded_solved = course.autograde(labs.lab_cells_only(self.solved), "solved")
        self.graded_student = course.autograde(lab_student, "stub")
        wrong_id, old, new = WRONG[self.key]
        first = next(gid for gid in self.solutions if gid != wrong_id)
        mixed = _put_back(lab_student, self.solved, first)
        mixed = _put_back(mixed, self.solved, wrong_id, (old, new))
        self.put_back, self.wrong = first, wrong_id
        self.graded_mixed = course.autograde(mixed, "mixed")


def lab_fixture(chapters: list[Path]):
    """The per-chapter fixture: a temporary nbgrader course and its three autogrades. This file runs chapters
    00-06; tests/test_labs_late.py runs 07-12 with the same tests, so that `make test`'s two workers
    (``--dist loadfile``: a file per worker) share the autograder's minutes."""

    @pytest.fixture(scope="module", params=chapters, ids=[p.stem.split("_")[0] for p in chapters])
    def lab(request):
        path = request.param
        with labs.course(nbformat.read(path, as_version=4), path.stem) as course:
            yield Lab(path, course)

    return lab


EARLY = [p for p in CHAPTERS if p.stem < "ch07"]
lab = lab_fixture(EARLY)


def test_every_chapter_has_a_lab():
    assert [p.stem.split("_")[0] for p in CHAPTERS] == [f"ch{i:02d}" for i in range(13)]


def test_exercises_are_in_nbgrader_format(lab):
    checks, solutions = lab.checks, lab.solutions
    assert len(checks) >= 3 and len(lab.implement) >= 2, (lab.key, list(checks), lab.implement)
    for gid in lab.implement:  # every implement-it solution has its check right after it
        assert f"{gid}_check" in checks, gid
    for meta in checks.values():
        assert meta["locked"] and not meta["solution"] and meta["points"] > 0 and meta["schema_version"] == 3
    for gid, cell in solutions.items():
        meta = cell.metadata["nbgrader"]
        assert not meta["grade"] and not meta["locked"] and gid.startswith(lab.key)
        assert BEGIN in cell.source and END in cell.source, gid
    assert all(gid.startswith(lab.key) for gid in checks)


def test_the_solved_chapter_scores_full_marks(lab):
    grades, graded = lab.graded_solved
    assert [(g.grade_id, g.score) for g in grades] == [(g.grade_id, g.max_score) for g in grades]
    assert _errors(graded) == []


def test_the_student_version_holds_no_solution_and_no_hidden_test(lab):
    student_text = "\n".join(c.source for c in lab.student.cells)
    for marker in (BEGIN, END, HIDDEN_BEGIN, HIDDEN_END):
        assert marker not in student_text
    # a line of a solution or hidden block survives only where the chapter itself has it outside those blocks
    secret = set()
    public = set()
    for cell in lab.solved.cells:
        hidden = _blocks(cell.source, BEGIN, END) + _blocks(cell.source, HIDDEN_BEGIN, HIDDEN_END)
        secret.update(line.strip() for line in hidden if line.strip())
        public.update(line.strip() for line in cell.source.splitlines() if line not in hidden)
    student_lines = {line.strip() for line in student_text.splitlines()}
    leaked = sorted((secret - public) & student_lines)
    assert leaked == [], leaked
    for cell in lab.student.cells:
        assert cell.cell_type != "code" or not cell.get("outputs"), "the student version has outputs"


def test_the_student_version_scores_zero_and_fails_on_the_stubs(lab):
    grades, graded = lab.graded_student
    scores = {g.grade_id: g.score for g in grades}
    for gid in lab.implement:
        assert scores[f"{gid}_check"] == 0, gid
    errors = _errors(graded)
    first_check = min(i for i, c in enumerate(graded.cells) if c.metadata.get("nbgrader", {}).get("grade"))
    # nothing fails before the first check; every implement-it check fails on the stub, not on anything else
    assert all(i >= first_check or gid in lab.solutions for i, gid, _ in errors), errors
    by_id = {gid: name for _, gid, name in errors}
    for gid in lab.implement:
        assert by_id.get(f"{gid}_check") == "NotImplementedError", (gid, errors)
        assert gid not in by_id, f"{gid}: the solution cell itself failed"
    assert sum(scores.values()) == 0


def test_one_solution_put_back_scores_its_points_and_a_wrong_answer_none(lab):
    grades, _ = lab.graded_mixed
    scores = {g.grade_id: g.score for g in grades}
    points = lab.checks[f"{lab.put_back}_check"]["points"]
    assert scores[f"{lab.put_back}_check"] == points
    assert sum(scores.values()) == points, scores
    assert scores[f"{lab.wrong}_check"] == 0


def test_every_chapter_has_a_wrong_answer():
    assert sorted(WRONG) == [p.stem.split("_")[0] for p in CHAPTERS]


def test_chapter_lines_fit_110_columns_but_cell_headers():
    """ruff's E501 is off for chapters/*.py only because a lab cell's `# %% nbgrader={...}` header cannot be
    wrapped; every other line keeps the project's 110 columns."""
    long = [
        f"{py.name}:{n}"
        for py in sorted(labs.CHAPTERS.glob("ch[0-9][0-9]_*.py"))
        for n, line in enumerate(py.read_text().splitlines(), 1)
        if len(line) > 110 and not line.startswith("# %%")
    ]
    assert long == []


def test_core_path_is_tagged():
    for path in CHAPTERS:
        nb = nbformat.read(path, as_version=4)
        core = labs.core_cells_only(nb)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code in core.cells, f"{path.name}: the setup cell is not on the core path"
        lab_section = labs.lab_cells_only(nb).cells
        assert all(c in core.cells for c in lab_section), f"{path.name}: the lab section is not all core"
        assert len(core.cells) < len(nb.cells), f"{path.name}: everything is core"
        # the chapter's own (ungraded) exercises and their solutions are not on the core path
        after_exercises = False
        for cell in nb.cells:
            if labs.is_lab_heading(cell):
                break
            if after_exercises:
                assert cell not in core.cells, f"{path.name}: a cell after '## Exercises' is tagged core"
            after_exercises = after_exercises or (
                cell.cell_type == "markdown" and "\n## Exercises" in "\n" + cell.source
            )


def test_release_never_overwrites_an_edited_copy(tmp_path):
    out = tmp_path / "labs"
    (first,) = labs.release(["ch00"], out)
    target = out / f"{CHAPTERS[0].stem}.ipynb"
    assert "wrote" in first and target.exists()
    assert "wrote" in labs.release(["ch00"], out)[0]  # its own, unedited copy is replaced
    nb = json.loads(target.read_text())
    nb["cells"][0]["source"] = "my notes"
    target.write_text(json.dumps(nb))
    edited = target.read_bytes()
    (again,) = labs.release(["ch00"], out)
    assert "kept your edited" in again and target.read_bytes() == edited
    beside = out / f"{CHAPTERS[0].stem}.new.ipynb"
    assert beside.exists() and re.search(r"raise NotImplementedError", beside.read_text())


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_labs_and_grade_call_the_script(tmp_path):
    """`make labs` / `make grade` (dry runs in a scratch copy with fresh install stamps: nothing runs)."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(labs.REPO / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    later = os.stat(tmp_path / "Makefile").st_mtime + 10
    (tmp_path / ".venv" / ".installed").touch()
    os.utime(tmp_path / ".venv" / ".installed", (later, later))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}

    def make_n(*args):
        out = subprocess.run(
            ["make", "-n", "--no-print-directory", *args],
            cwd=tmp_path,
            env=env,
            text=True,
            capture_output=True,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()

    assert make_n("labs") == [".venv/bin/python scripts/labs.py release --out labs"]
    assert make_n("labs", "CORE=1", "LABS=ch07") == [
        ".venv/bin/python scripts/labs.py release --out labs --core ch07"
    ]
    assert (
        make_n("grade", "LAB=ch07", "SUBMISSION=a b.ipynb")[-1]
        == '.venv/bin/python scripts/labs.py grade ch07 "a b.ipynb"'
    )
