"""Shared test setup: fixed seeds, few threads, and the gpu marker's skip."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).parent / "data"
CHECKPOINT_KEYS = DATA / "checkpoint_keys"


def read_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    """A checkpoint key list (``name<TAB>(d0, d1, ...)`` per line) -> {name: shape}."""
    keys = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, shape = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
