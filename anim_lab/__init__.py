"""anim_lab: learn portrait animation diffusion by building it.

One module per concept (see README.md); chapters in chapters/ import from here.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

REPO_DIR = Path(__file__).resolve().parents[1]  # the source checkout (the package's parent folder)
SCRIPTS_DIR = REPO_DIR / "scripts"


def repo_relative(path: str | Path) -> str:
    """``path`` as a training log records it: relative to the repository when inside it, so that a committed
    log holds no machine's absolute path; any other path as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)


def load_script(name: str) -> ModuleType:
    """The repository's ``scripts/<name>.py`` (training and evaluation code) as a module, so that chapters and
    tests call the very functions the scripts run. Needs a source checkout (the scripts are not installed)."""
    path = SCRIPTS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: load_script needs a source checkout of anim_lab (the scripts/ folder is not "
            "part of an installed wheel); clone the repository and install it with `make test` or "
            "`pip install -e .`"
        )
    qualified = (
        f"anim_lab.scripts.{name}"  # in anim_lab's namespace: a generic name such as "eval" stays free
    )
    spec = importlib.util.spec_from_file_location(qualified, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
