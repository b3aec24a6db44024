"""anim_lab: learn portrait animation diffusion by building it.

One module per concept (see README.md); chapters in chapters/ import from here.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"


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
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
