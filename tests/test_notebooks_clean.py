"""Committed notebooks are clean: no stderr outputs (warnings, native logs, progress bars) and no absolute
paths in any output (they name the author's machine, and nbval would compare them on the reader's).

A chapter that prints to stderr is fixed at the source: the library quiets its dependencies (mediapipe's
native logs in ``landmarks``, transformers' loading bars in ``clip``), tqdm finds ipywidgets (a [test] and
[lab] dependency), and a chapter passes ``progress=False``.
"""

import json
import re
from pathlib import Path

import pytest

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("ch[0-9][0-9]_*.ipynb"))

# An absolute path: a POSIX path under a usual top-level folder, a home folder (~user/...), a Windows drive
# path, or any path into a Python installation.
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~])/(?:home|root|tmp|work|Users|usr|opt|var|private|mnt|srv|data|nix|etc)/\S*"
    r"|~\w*/\S+"
    r"|\b[A-Za-z]:\\\S+"
    r"|site-packages\S*"  # from the keyword on: a leading \S* backtracks quadratically over base64 data
)


def _output_text(output: dict) -> str:
    """Everything a reader sees of one output: stream text, every text-like mime bundle, a traceback."""
    parts = [output.get("text", "")]
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            parts.append(value if isinstance(value, str) else json.dumps(value))
    parts += output.get("traceback", [])
    return "\n".join("".join(p) if isinstance(p, list) else str(p) for p in parts)


def notebook_problems(path: Path) -> list[str]:
    """What is unclean in a notebook: stderr outputs and absolute paths in outputs, one line per finding."""
    problems = []
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                first = "".join(output.get("text", "")).strip().splitlines()[:1]
                problems.append(f"{path.name} cell {i}: stderr output {first[0][:100] if first else ''!r}")
            for match in ABSOLUTE_PATH.findall(_output_text(output)):
                problems.append(f"{path.name} cell {i}: absolute path {match[:100]!r} in an output")
    return problems


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_clean(nb):
    assert notebook_problems(nb) == []


# The check must catch what it is for.
def _write(tmp_path: Path, outputs: list[dict]) -> Path:
    nb = {
        "cells": [
            {"cell_type": "code", "execution_count": 1, "metadata": {}, "source": "x", "outputs": outputs}
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "ch99_test.ipynb"
    path.write_text(json.dumps(nb))
    return path


@pytest.mark.parametrize(
    "output, found",
    [
        ({"output_type": "stream", "name": "stderr", "text": ["INFO: Created TensorFlow Lite\n"]}, "stderr"),
        (
            {"output_type": "stream", "name": "stdout", "text": "/work/main/.venv/lib/python3.11/x.py:21\n"},
            "absolute path",
        ),
        (
            {
                "output_type": "execute_result",
                "execution_count": 1,
                "metadata": {},
                "data": {"text/plain": "'/home/ann/x.png'"},
            },
            "absolute path",
        ),
        (
            {"output_type": "error", "ename": "E", "evalue": "", "traceback": ["C:\\Users\\ann\\x.py"]},
            "absolute path",
        ),
    ],
)
def test_the_check_catches_unclean_outputs(tmp_path, output, found):
    problems = notebook_problems(_write(tmp_path, [output]))
    assert problems and found in problems[0], problems


def test_the_check_passes_clean_outputs(tmp_path):
    clean = [
        {
            "output_type": "stream",
            "name": "stdout",
            "text": "latents (1, 4, 8, 8); ratio 1/8; see figures/ch02.png\n",
        },
        {
            "output_type": "display_data",
            "metadata": {},
            "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"},
        },
    ]
    assert notebook_problems(_write(tmp_path, clean)) == []
