"""The official checkpoints' key lists (copied from the reference notes into tests/data/checkpoint_keys/)."""

from pathlib import Path

CHECKPOINT_KEYS = Path(__file__).parent / "data" / "checkpoint_keys"


def read_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    """A checkpoint key list (``name<TAB>(d0, d1, ...)`` per line) -> {name: shape}."""
    keys = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        name, shape = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys
