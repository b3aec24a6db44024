"""What the program writes, and how: never over an input, never over what it did not write, never half.

One home for the rules every command, pipeline and training script follows (DESIGN.md §8):

- :func:`check_output_file` — before the work: the destination can really be created (a probe file is made
  and removed, so ``/sys/...`` or a read-only mount fails now, not after minutes of generation), it is not a
  folder, and it is not one of the inputs (``os.path.samefile``).
- :func:`check_output_folder` / :func:`publish_folder` — a folder output is built in a hidden temporary
  sibling and moved into place. An existing folder is replaced only when everything in it is something the
  same command writes (its ``own`` patterns); anything else is named and refused, and ``force=True``
  replaces only the program's own files, leaving the rest where it is.
- :func:`apply_umask` — files and folders made by ``mkstemp`` / ``mkdtemp`` / safetensors are private
  (0600 / 0700); written outputs get the modes any new file gets under the process umask.
- :func:`save_state` / :func:`load_state` — training state and caches as safetensors + JSON: loading them
  can never run code (no pickle anywhere outside the tests).
- :func:`write_result` — a benchmark's or evaluation's numbers as JSON, with :func:`environment` (when, on
  how many cores, with which library versions): the files in ``results/`` that the README quotes.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError

__all__ = [
    "OutputError",
    "current_umask",
    "check_writable",
    "check_output_file",
    "check_output_folder",
    "foreign_entries",
    "staging_folder",
    "publish_folder",
    "apply_umask",
    "save_state",
    "load_state",
    "environment",
    "write_result",
]


class OutputError(InputError):
    """An output the program refuses to write (it would destroy an input or a file it did not write, or it
    cannot be created). The message names the path and what to do."""


# --- permissions --------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; elsewhere it is set and put
    back at once, the only portable way)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes that new files (0o666) and folders
    (0o777) get under the process umask. For what mkstemp / mkdtemp / safetensors made private."""
    umask = current_umask()
    path = Path(path)
    items = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for item in items:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


# --- one output file ----------------------------------------------------------------------------------------
def check_writable(folder: str | os.PathLike, shown=None, what: str = "output") -> None:
    """Fail with :class:`OutputError` unless files can be created in ``folder`` (or in the first existing
    folder on its way: the missing ones will be made). ``shown``: the path named in the message.

    A file is really created and removed: the one sure test (``os.access`` says yes for root on /sys and on
    read-only mounts)."""
    existing = folder = Path(folder)
    shown = folder if shown is None else shown
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {shown}: {existing} is a file, not a folder; choose another {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".anim_lab-probe.", dir=existing)
    except OSError as err:
        raise OutputError(
            f"cannot write {shown}: the folder {existing} is not writable ({err.strerror}); "
            f"choose another {what}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _same_file(a: Path, b: str | os.PathLike | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist


def check_output_file(
    path: str | os.PathLike,
    suffixes: Iterable[str] | None = None,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    what: str = "output path",
) -> Path:
    """Check an output file before any work, and return it as a Path.

    Refused, each with a message that names the path and the fix: a folder; a suffix not in ``suffixes``;
    the same file as one of ``inputs`` (``{"--driving": path, ...}``; hard links and symlinks included); a
    destination that cannot be created (probed for real). An existing file of the right suffix is what the
    same command writes, and is replaced at the end (atomically) — never an input.
    """
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"the {what} {out} is a folder; give a file name such as {out / 'out.mp4'}")
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if out.suffix.lower() not in suffixes:
            raise OutputError(f"the {what} must end in {' or '.join(suffixes)}, got {out.name!r}")
    for name, source in (inputs or {}).items():
        if _same_file(out, source):
            raise OutputError(
                f"the {what} {out} is the input {name} ({source}); writing it would destroy the input: "
                "choose another output name"
            )
    check_writable(out.parent, out, what)
    return out


# --- one output folder --------------------------------------------------------------------------------------
def _is_own(rel: str, own: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in own)


def _is_own_folder(rel: str, own: Iterable[str]) -> bool:
    return any(pattern.startswith(rel + "/") for pattern in own)


def foreign_entries(folder: str | os.PathLike, own: Iterable[str]) -> list[str]:
    """What ``folder`` holds that the program would not write: relative paths of files (and links) that
    match none of the ``own`` glob patterns (``"vae/*.json"``; ``*`` crosses ``/`` as in fnmatch), and of
    folders no pattern reaches. Sorted; empty when the folder holds only the program's own files."""
    folder, own = Path(folder), tuple(own)
    foreign = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for d in list(dirs):
            rel = (rel_root / d).as_posix()
            if (Path(root) / d).is_symlink() or not _is_own_folder(rel, own):
                foreign.append(rel + "/")
                dirs.remove(d)  # not walked: it is foreign as a whole
        foreign += [(rel_root / f).as_posix() for f in files if not _is_own((rel_root / f).as_posix(), own)]
    return sorted(foreign)


def _describe(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_output_folder(
    path: str | os.PathLike,
    own: Iterable[str],
    *,
    force: bool = False,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    what: str = "output folder",
    force_hint: str = "--force",
) -> Path:
    """Check an output folder before any work, and return it as a Path.

    Refused: a file; one of ``inputs`` (or a folder that holds one); a destination that cannot be written;
    an existing folder that holds anything but the program's ``own`` files — unless ``force``, which later
    replaces only the program's own files (see :func:`publish_folder`)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"the {what} {out} is a file; give a folder")
    for name, source in (inputs or {}).items():
        if source is not None and out.is_dir() and Path(source).exists():
            inside = Path(source).resolve().is_relative_to(out.resolve())
            if inside or _same_file(out, source):
                raise OutputError(
                    f"the {what} {out} holds the input {name} ({source}); writing it would destroy the "
                    "input: choose another folder"
                )
    if out.is_dir() and not force:
        foreign = foreign_entries(out, own)
        if foreign:
            raise OutputError(
                f"the {what} {out} already holds files this program did not write: {_describe(foreign)}. "
                f"Choose a new or empty folder, or pass {force_hint} to replace only its own "
                "files there (the others are left as they are)"
            )
    check_writable(out.parent, out, what)  # the new folder is built beside it, then renamed
    if force and out.is_dir():
        check_writable(out, out, what)
    return out


def staging_folder(target: str | os.PathLike) -> Path:
    """A new hidden, empty folder beside ``target`` (same file system, so it can be renamed into place),
    where a folder output is built before :func:`publish_folder`. ``target`` may be ``.``."""
    parent = Path(target).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{Path(target).resolve().name}.", dir=parent))


def publish_folder(
    tmp: str | os.PathLike, target: str | os.PathLike, own: Iterable[str], force=False
) -> None:
    """Move the finished folder ``tmp`` (a sibling of ``target``) into place, with the umask's modes.

    - ``target`` missing: one rename.
    - ``target`` holds only the program's ``own`` files: the old folder is renamed aside, ``tmp`` renamed
      in, then the old one removed (a reader sees the old or the new folder, never a mix or none).
    - ``target`` empty, or the working folder: the files are moved in one by one.
    - ``target`` holds anything else: refused (:class:`OutputError`, ``tmp`` removed), or with ``force``
      each file of ``tmp`` replaces its namesake in ``target`` and every other file stays.
    """
    tmp, target = Path(tmp), Path(target)
    try:
        apply_umask(tmp)
        if not target.exists():
            os.replace(tmp, target)
            return
        foreign = foreign_entries(target, own)
        if foreign and not force:
            raise OutputError(
                f"{target} now holds files this program did not write ({_describe(foreign)}); nothing "
                "was replaced"
            )
        if foreign or not any(target.iterdir()) or target.resolve() == Path.cwd().resolve():
            # file by file: every other file stays, and the folder itself (its inode, its modes) is kept
            for item in sorted(tmp.rglob("*")):
                dest = target / item.relative_to(tmp)
                if item.is_dir():
                    dest.mkdir(exist_ok=True)
                else:
                    os.replace(item, dest)
            return
        # only the program's own files: swap the folders, so a reader sees the old or the new one, never a mix
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old)  # it held only the program's own files
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --- training state and caches: safetensors + JSON ----------------------------------------------------------
def _split(obj, tensors: dict, path: str):
    """Nested dicts / lists / tuples with tensors -> a JSON-able skeleton; tensors collected by path."""
    if isinstance(obj, torch.Tensor):
        key = path or "."
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):  # a dict, or transformers' BatchEncoding
        return {"__dict__": [[k, _split(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        items = [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(
        f"save_state: {path or 'the state'} is a {type(obj).__name__}; only tensors, numbers, "
        "strings, None and dicts / lists / tuples of them are stored"
    )


def _join(obj, tensors: dict):
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state(state, path: str | os.PathLike) -> Path:
    """Write ``state`` (nested dicts / lists / tuples of tensors, numbers, strings, None: a model's or an
    optimizer's state_dict, a generator's state, logs) as ``path`` (.safetensors, the tensors) and
    ``path`` with ``.json`` (the rest), each atomically. Dict keys keep their type (an optimizer's int
    keys). Returns the .safetensors path."""
    path = Path(path).with_suffix(".safetensors")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda p: save_file(tensors, p))
    _write_atomic(path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(skeleton)))
    return path


def _write_atomic(dest: Path, write) -> None:
    """``write(tmp)`` into a temporary sibling of ``dest``, give it the umask's modes, and move it into place:
    a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state(path: str | os.PathLike):
    """Read what :func:`save_state` wrote (``path``: the .safetensors or the .json, or their common stem).
    Nothing in these files can run code; a missing, truncated or foreign file raises ValueError naming it."""
    path = Path(path).with_suffix(".safetensors")
    meta = path.with_suffix(".json")
    for p in (path, meta):
        if not p.is_file():
            raise InputError(f"{p} is missing: a training state is a .safetensors file and a .json beside it")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise InputError(
            f"{path} is not a readable safetensors file ({err}); delete it and start again"
        ) from None
    try:
        return _join(json.loads(meta.read_text()), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{meta} is not a training state written by anim_lab ({err!r}); delete it") from None


# --- measured results ---------------------------------------------------------------------------------------
def environment() -> dict:
    """Where and when a measurement was made: UTC date, machine, CPU cores, torch threads, CUDA device, and
    the versions of Python and the libraries that compute the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("anim_lab", "torch", "diffusers", "transformers", "numpy", "mediapipe"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def write_result(path: str | os.PathLike, record: Mapping) -> Path:
    """Write ``record`` with ``"environment": environment()`` as indented JSON to ``path`` (a ``.json`` file),
    atomically: a temporary sibling is written and moved into place, so a reader never sees half a file.
    Non-finite numbers are written as null (JSON has no NaN)."""
    out = check_output_file(path, (".json",), what="result file")
    out.parent.mkdir(parents=True, exist_ok=True)

    def finite(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, Mapping):
            return {str(k): finite(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [finite(v) for v in obj]
        return obj

    text = json.dumps(finite({**record, "environment": environment()}), indent=1, allow_nan=False) + "\n"
    _write_atomic(out, lambda p: Path(p).write_text(text))
    return out
