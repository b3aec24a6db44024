"""Saved pipeline folders: what every anim_lab pipeline's ``save_pretrained`` / ``from_pretrained`` check.

A pipeline folder is diffusers' standard layout (``model_index.json``, one subfolder per component, each saved
by its own library's ``save_pretrained``; safetensors only). :class:`SavedPipelineMixin` wraps diffusers'
``DiffusionPipeline.save_pretrained`` / ``from_pretrained`` so that

- saving builds the folder in a temporary sibling and moves it into place (a failure leaves nothing
  half-written), replaces an existing folder only when it holds nothing but an earlier save of the same
  pipeline, and with ``force=True`` replaces only the files it writes;
- loading a local folder checks it first, so that a mistake is named rather than half-loaded: the pipeline's
  name, only diffusers / transformers / anim_lab classes, every config present and valid JSON, the library
  components' weights in a safe format, and the keys and shapes of each anim_lab component's weights against
  its config (a :class:`~anim_lab.weights.KeyMismatchError` lists what is missing, unexpected or of another
  shape); then every tensor is re-aligned, so that the loaded pipeline computes bit for bit what the saved one
  did.

A pipeline class lists its files and components in four class attributes (see the mixin).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from ..files import OutputError, check_output_folder, publish_folder, staging_folder
from ..weights import (
    WEIGHT_NAMES,
    KeyMismatchError,
    check_keys,
    check_weight_file,
    expected_shapes,
    realign,
    weight_files_in,
)

__all__ = ["SavedPipelineMixin", "MODEL_INDEX", "WEIGHTS", "read_json", "no_library_progress_bars"]

MODEL_INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"  # an anim_lab component's weights (diffusers' ModelMixin)
CONFIG_FILES = {"scheduler": "scheduler_config.json"}  # the others: config.json


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a malformed file raises InputError naming it and the place."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path} is not valid JSON ({err}); restore the file or save the folder again"
        ) from None
    if not isinstance(value, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def no_library_progress_bars():
    """diffusers' "Loading pipeline components" and transformers' "Writing model shards" bars, off for a
    moment (a small model loads in a blink; the bars would only add stderr lines), then as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in states:
            if was_enabled:
                lib.enable_progress_bar()


class SavedPipelineMixin:
    """``save_pretrained`` / ``from_pretrained`` with the checks of the module docstring. Put it before
    ``DiffusionPipeline`` among the bases. A pipeline class sets:

    - ``SAVED_FILES``: every file ``save_pretrained`` may write (relative paths);
    - ``LIBRARY_COMPONENTS``: the components saved by diffusers or transformers (their weights' format is
      checked before loading);
    - ``OWN_COMPONENTS``: the anim_lab components, name -> the classes that component may be;
    - ``NOT_SAVED_HINT``: what to say when a folder has no ``model_index.json`` (e.g. where the official
      weight folders load instead).
    """

    SAVED_FILES: tuple[str, ...] = ()
    LIBRARY_COMPONENTS: tuple[str, ...] = ()
    OWN_COMPONENTS: dict[str, tuple[type, ...]] = {}
    NOT_SAVED_HINT = ""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        force: bool = False,
        safe_serialization: bool = True,
        **kwargs,
    ) -> None:
        """Write the pipeline as a standard diffusers folder (``model_index.json``, one subfolder per
        component, each saved by its own ``save_pretrained``; safetensors only), with the umask's permissions.

        Built in a temporary sibling folder and moved into place, so a failure leaves nothing half-written.
        An existing folder is replaced only when it holds nothing but what this method writes (an earlier
        save); a folder with anything else (notes, samples, another pipeline's model_index.json) is refused,
        naming what is there, and ``force=True`` replaces only the files this method writes."""
        if kwargs:  # diffusers' other keywords would change which files are written: refused, by name
            raise InputError(
                f"save_pretrained does not take {', '.join(sorted(kwargs))}: it writes the whole pipeline, "
                "unsharded safetensors with no variant, to a local folder; its options are force= and "
                "safe_serialization=True"
            )
        if not safe_serialization:
            raise InputError("save_pretrained writes safetensors only (a pickle could run code when loaded)")
        target = Path(save_directory)
        index = target / MODEL_INDEX
        if index.is_file():  # even with force: that file is not ours to replace
            try:
                saved = json.loads(index.read_text()).get("_class_name")
            except (json.JSONDecodeError, AttributeError):
                saved = None
            if saved != type(self).__name__:
                raise OutputError(
                    f"{target} holds another pipeline ({index} names {saved!r}); choose a new or empty folder"
                )
        check_output_folder(target, self.SAVED_FILES, force=force, what="folder", force_hint="force=True")
        tmp = staging_folder(target)
        try:
            with no_library_progress_bars():
                super().save_pretrained(tmp, safe_serialization=True)
            publish_folder(tmp, target, self.SAVED_FILES, force=force)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype = torch.float32,
        **kwargs,
    ):
        """Load a pipeline folder (written by :meth:`save_pretrained`) or a hub id, through diffusers' own
        ``DiffusionPipeline.from_pretrained``; a local folder is checked first (:meth:`check_saved_folder`).
        ``kwargs`` go to diffusers."""
        folder = Path(pretrained_model_name_or_path)
        if folder.exists():
            cls.check_saved_folder(folder)
        with no_library_progress_bars():
            pipe = super().from_pretrained(pretrained_model_name_or_path, dtype=torch_dtype, **kwargs)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                # tensors read at the file's byte offsets would move CPU sums by ~1e-6; aligned copies make
                # the loaded pipeline compute bit for bit what the saved one did
                realign(module).eval()
        return pipe

    @classmethod
    def check_saved_folder(cls, folder: Path) -> None:
        """Everything :meth:`from_pretrained` checks before diffusers reads a local folder."""
        name_of = cls.__name__
        if not (folder / MODEL_INDEX).is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved pipeline (no {MODEL_INDEX}){cls.NOT_SAVED_HINT}"
            )
        index = read_json(folder / MODEL_INDEX)
        if index.get("_class_name") != name_of:
            raise InputError(
                f"{folder / MODEL_INDEX} names the pipeline {index.get('_class_name')!r}, not {name_of}; "
                "this folder holds another pipeline"
            )
        components = (*cls.LIBRARY_COMPONENTS, *cls.OWN_COMPONENTS)
        for name in components:
            entry = index.get(name)
            library = entry[0] if isinstance(entry, list) and len(entry) == 2 else ""
            if not (library in ("diffusers", "transformers") or library.startswith("anim_lab.")):
                raise InputError(
                    f"{folder / MODEL_INDEX}: the component {name!r} is {entry!r}; a {name_of} folder names "
                    "[library, class] pairs from diffusers, transformers or anim_lab only"
                )
        config_of = {n: folder / n / CONFIG_FILES.get(n, "config.json") for n in components}
        missing = [str(path.relative_to(folder)) for path in config_of.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is an incomplete saved pipeline: missing {', '.join(missing)}; save it again with "
                f"{name_of}.save_pretrained, or restore those subfolders"
            )
        configs = {n: read_json(path) for n, path in config_of.items()}
        for name in cls.LIBRARY_COMPONENTS:  # a truncated file or a planted pickle is named before diffusers
            if name == "scheduler":
                continue
            found = weight_files_in(folder / name)
            if not found:
                raise FileNotFoundError(
                    f"{folder / name} holds no weights (expected {' or '.join(WEIGHT_NAMES)}); save the "
                    "pipeline again or restore the file"
                )
            for path in found:
                check_weight_file(path)
        for name, classes in cls.OWN_COMPONENTS.items():
            model_cls = {c.__name__: c for c in classes}.get(index[name][1])
            if model_cls is None:
                raise InputError(
                    f"{folder / MODEL_INDEX}: unknown anim_lab class {index[name][1]!r} for {name}"
                )
            weights = folder / name / WEIGHTS
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} is missing; save the pipeline again or restore the file")
            check_weight_file(weights)  # a truncated file is named
            with torch.device("meta"):
                model = model_cls.from_config(configs[name])
            with safe_open(str(weights), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (the header)
            report = check_keys(expected_shapes(model), shapes)
            if not report.ok:
                raise KeyMismatchError(report, f"{name}/{WEIGHTS} (against {name}/config.json)")


def saved_files(library_files: tuple[str, ...], own: tuple[str, ...]) -> tuple[str, ...]:
    """A pipeline's ``SAVED_FILES``: ``model_index.json``, the library components' files, and each anim_lab
    component's ``config.json`` and weights."""
    return (MODEL_INDEX, *library_files, *(f"{name}/{f}" for name in own for f in ("config.json", WEIGHTS)))
