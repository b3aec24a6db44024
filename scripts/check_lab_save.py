"""Check that a JupyterLab save keeps a chapter pair in sync, through the contents manager Lab's server uses.

    .venv/bin/python scripts/check_lab_save.py            # needs the [lab] extra (make lab installs it)

Copies one chapter pair and chapters/jupytext.toml into a temporary folder, opens the notebook with jupytext's
contents manager (as Lab does), adds a markdown cell and edits a code cell, saves, and checks that the .py
got both edits, that the pair passes the pairing test, and that the notebook kept its outputs. Exit status 0
when all hold. (The same check without a server, through ``jupytext --sync``, runs in ``make test``:
tests/test_chapters_paired.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_chapters_paired import pair_problems  # noqa: E402


async def check(chapter: str, folder: Path) -> list[str]:
    for name in (f"{chapter}.py", f"{chapter}.ipynb", "jupytext.toml"):
        shutil.copy(ROOT / "chapters" / name, folder / name)
    manager = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(root_dir=str(folder))
    nb = (await manager.get(f"{chapter}.ipynb"))["content"]
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("A note saved in Lab."))
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.source += "\nmine = 1  # an edit saved in Lab"
    await manager.save({"type": "notebook", "content": nb}, f"{chapter}.ipynb")
    text = (folder / f"{chapter}.py").read_text()
    failures = [
        f"the .py lacks the {what}"
        for what, line in (
            ("note", "# A note saved in Lab."),
            ("code edit", "mine = 1  # an edit saved in Lab"),
        )
        if line not in text
    ]
    failures += pair_problems(folder / f"{chapter}.py")
    cells = json.loads((folder / f"{chapter}.ipynb").read_text())["cells"]
    if not any(c.get("outputs") for c in cells if c["cell_type"] == "code"):
        failures.append("the notebook lost its outputs")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chapter", default="ch02_vae_latents")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        failures = asyncio.run(check(args.chapter, Path(tmp)))
    print("\n".join(failures) if failures else f"a Lab save of {args.chapter}.ipynb kept the pair in sync")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
