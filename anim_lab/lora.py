"""LoRA on the project's networks, through peft, saved and loaded in diffusers' format.

LoRA (low-rank adaptation) freezes a linear layer's weight W (out, in) and learns a low-rank update:

    y = W x + b + (alpha / r) B A x          A (r, in) "down", B (out, r) "up", r << min(in, out)

so a layer of in x out weights trains only r (in + out) numbers. peft puts the update *around* the layer:
``unet.add_adapter(LoraConfig(...))`` replaces each targeted ``nn.Linear`` (here the attention projections
``to_q``, ``to_k``, ``to_v``, ``to_out.0``, as seed 002's notes target them) by a ``peft`` ``LoraLayer`` that
keeps the original as ``base_layer`` and adds ``lora_A[name]``, ``lora_B[name]`` per adapter name. With
``init_lora_weights="gaussian"`` A ~ N(0, 1/r) and B = 0, so a fresh adapter changes nothing.

Several adapters can sit on one layer; ``set_adapters([n1, n2], [w1, w2])`` makes the layer compute
``W x + b + sum_i w_i (alpha_i / r_i) B_i A_i x``. ``fuse_lora`` adds the (weighted) deltas into W (no extra
cost at inference), ``unfuse_lora`` subtracts them again.

Files are diffusers' LoRA format (what ``StableDiffusionPipeline.save_lora_weights`` writes): one
``pytorch_lora_weights.safetensors`` whose keys are ``<component>.<module path>.lora.down.weight`` (A) and
``...lora.up.weight`` (B), with the adapter's ``LoraConfig`` in the safetensors header so that alpha and the
targets come back as they were. The pipeline's loader is :class:`Pose2VideoLoraLoaderMixin` (components
``denoising_unet`` and ``reference_unet``); :func:`lora_layers` gives what its ``save_lora_weights`` takes
(``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers``, as the notes and diffusers' training
scripts do). Only safetensors are read or written (no pickle). A file whose keys do not fit the pipeline's
networks is refused before anything is loaded, with the keys named (:func:`check_lora_keys`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.utils import convert_state_dict_to_diffusers
from torch import nn

from .errors import InputError

__all__ = [
    "LORA_TARGETS",
    "LORA_WEIGHT_NAME",
    "lora_config",
    "lora_layers",
    "set_lora_weights",
    "lora_parameter_count",
    "sd15_lora_parameter_counts",
    "check_lora_keys",
    "Pose2VideoLoraLoaderMixin",
]

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the attention projections, as seed 002 targets them
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name
_DOWN_UP = {"lora.down.weight": 0, "lora.up.weight": 1, "lora_A.weight": 0, "lora_B.weight": 1}


def lora_config(rank: int, alpha: float | None = None, target_modules=LORA_TARGETS, **kwargs):
    """``LoraConfig(r=rank, lora_alpha=alpha (default rank), init_lora_weights="gaussian", target_modules)``:
    the notes' configuration. ``target_modules`` may also be a regular expression matched against whole
    module names (peft's rule), e.g. to keep the adapters out of some blocks."""
    from peft import LoraConfig

    if rank < 1:
        raise InputError(f"the LoRA rank must be >= 1, got {rank}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=targets,
        **kwargs,
    )


def lora_layers(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """(the adapter's weights in diffusers' key format, its LoraConfig as a dict): what
    ``save_lora_weights(..., <component>_lora_layers=, <component>_lora_adapter_metadata=)`` takes."""
    from peft import get_peft_model_state_dict

    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        have = sorted(getattr(model, "peft_config", {}))
        raise InputError(f"{type(model).__name__} has no adapter {adapter_name!r} (adapters: {have})")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)  # keys without the adapter name
    metadata = config.to_dict()
    metadata["target_modules"] = (
        sorted(metadata["target_modules"])
        if isinstance(metadata["target_modules"], set)
        else metadata["target_modules"]
    )
    return convert_state_dict_to_diffusers(state), metadata


def set_lora_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default", prefix: str = ""
) -> None:
    """Load diffusers-format LoRA weights into an adapter ``model`` already has (the notes' "the UNet has a
    LoRA of that name; load the saved weights as its weights"), with peft's ``set_peft_model_state_dict``.

    ``prefix``: the component name the keys carry in a pipeline file (``"denoising_unet"``); keys under other
    prefixes are ignored. Every key of the adapter must be given, and no other: else the keys are named."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if adapter_name not in getattr(model, "peft_config", {}):
        have = sorted(getattr(model, "peft_config", {}))
        raise InputError(f"{type(model).__name__} has no adapter {adapter_name!r} to fill (adapters: {have})")
    if prefix:
        state_dict = {
            k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")
        }
    check_lora_keys({"model": model}, {f"model.{k}": v for k, v in state_dict.items()}, "the LoRA weights")
    peft_state = convert_unet_state_dict_to_peft(state_dict)  # lora.down/up -> lora_A/B
    wanted = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    if set(peft_state) != wanted:
        missing, extra = sorted(wanted - set(peft_state)), sorted(set(peft_state) - wanted)
        raise InputError(
            f"the LoRA weights do not match adapter {adapter_name!r}: missing {missing[:4]} "
            f"({len(missing)} in all), not in the adapter {extra[:4]} ({len(extra)} in all); was it saved "
            "from an adapter with the same target_modules?"
        )
    set_peft_model_state_dict(model, peft_state, adapter_name=adapter_name)


def lora_parameter_count(model: nn.Module, rank: int, target_modules=LORA_TARGETS) -> int:
    """How many parameters LoRA at ``rank`` trains on ``model``: an adapter named ``count`` is added (on
    the ``meta`` device too), its ``lora_`` parameters counted, and deleted again (peft's wrappers stay). The
    sum equals ``rank * sum(in + out)`` over the targeted linear layers (tests/test_lora.py checks it)."""
    model.add_adapter(lora_config(rank, target_modules=target_modules), adapter_name="count")
    try:
        return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and ".count" in n)
    finally:
        model.delete_adapters("count")


def sd15_lora_parameter_counts(ranks=(4, 64), motion: bool = False) -> dict[int, int]:
    """{rank: trainable LoRA parameters} on Stable Diffusion 1.5's 2D UNet (the attention projections of
    every attn1 and attn2), built on the ``meta`` device: no weights, no memory. ``motion=True``: the
    AnimateDiff denoising UNet (``VideoUNet`` with SD1.5's motion modules), whose temporal attentions have
    the same projection names and so get adapters too."""
    from .configs import SD15
    from .unet import VideoUNet, build_unet2d

    with torch.device("meta"):
        unet = VideoUNet(SD15.unet, SD15.motion) if motion else build_unet2d(SD15.unet)
    return {r: lora_parameter_count(unet, r) for r in ranks}


def _module_and_slot(key: str) -> tuple[str, int] | None:
    """``a.b.to_q.lora.down.weight`` -> (``a.b.to_q``, 0 for down/A, 1 for up/B); None if not a LoRA key."""
    for suffix, slot in _DOWN_UP.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], slot
    return None


def check_lora_keys(components: dict[str, nn.Module], state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a LoRA state dict (diffusers' keys ``<component>.<module>.lora.down/up.weight``) that does not
    fit ``components`` ({name: network}): every key must name a component, a linear layer in it, and have
    the shapes (r, in) / (out, r) with one r per layer. The error names the keys (up to 6) and the fix."""
    unexpected, wrong_shape = [], []
    ranks: dict[str, int] = {}
    modules = {c: dict(m.named_modules()) for c, m in components.items()}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        parsed = _module_and_slot(rest) if component in modules else None
        if parsed is None:
            unexpected.append(key)
            continue
        path, slot = parsed
        layer = modules[component].get(path)
        layer = getattr(layer, "base_layer", layer)  # a layer that already holds adapters
        if not isinstance(layer, nn.Linear):
            unexpected.append(key)
            continue
        rank = value.shape[slot] if value.ndim == 2 else -1  # A (r, in), B (out, r)
        wanted = (rank, layer.in_features) if slot == 0 else (layer.out_features, rank)
        if (
            value.ndim != 2
            or tuple(value.shape) != wanted
            or ranks.setdefault(f"{component}.{path}", rank) != rank
        ):
            wrong_shape.append(
                f"{key} {tuple(value.shape)} (the layer is {layer.in_features} -> {layer.out_features})"
            )
    if unexpected or wrong_shape or not state_dict:
        show = lambda keys: f"{keys[:6]}{' ...' if len(keys) > 6 else ''} ({len(keys)} in all)"  # noqa: E731
        raise InputError(
            f"{what} is not a LoRA for these networks ({', '.join(components)}): "
            + (f"keys naming no linear layer of them: {show(unexpected)}; " if unexpected else "")
            + (f"keys whose shapes do not fit: {show(wrong_shape)}; " if wrong_shape else "")
            + ("it holds no keys; " if not state_dict else "")
            + "save the LoRA from networks built with the same config (anim_lab.lora.lora_layers)"
        )


class Pose2VideoLoraLoaderMixin(LoraBaseMixin):
    """diffusers' LoRA loader for :class:`~anim_lab.pipelines.Pose2VideoPipeline`: ``load_lora_weights``,
    ``save_lora_weights``, ``fuse_lora`` / ``unfuse_lora``, and (from diffusers' ``LoraBaseMixin``)
    ``set_adapters``, ``disable_lora``, ``delete_adapters``, ``unload_lora_weights``, ``get_list_adapters``.

    The LoRA-loadable components are the two UNets. Like ``StableDiffusionLoraLoaderMixin`` but with the
    pipeline's component names as key prefixes, safetensors only, and the keys checked before loading."""

    _lora_loadable_modules = ["denoising_unet", "reference_unet"]

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, weight_name: str | None = None, **kwargs):
        """(state dict, metadata {component.field: value} or None) from a folder (``weight_name``, default
        ``pytorch_lora_weights.safetensors``), a ``.safetensors`` file, or a dict (returned as it is)."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            return dict(pretrained_model_name_or_path_or_dict), kwargs.get("metadata")
        path = Path(pretrained_model_name_or_path_or_dict)
        if path.is_dir():
            path = path / (weight_name or LORA_WEIGHT_NAME)
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: LoRA weights are read from .safetensors files only (no pickle)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; save it with save_lora_weights(folder, ...)")
        from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

        from .weights import check_weight_file

        check_weight_file(path)  # a truncated file is named
        return safetensors.torch.load_file(path), _load_sft_state_dict_metadata(path)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kw):
        """Load a LoRA saved by :meth:`save_lora_weights` into the UNets it has keys for, as ``adapter_name``
        (default: peft's ``default_<i>``). Refused, with the keys named, if it does not fit them."""
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kw)
        source = "the LoRA state dict"
        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            source = Path(pretrained_model_name_or_path_or_dict)
            source = str(source / (kw.get("weight_name") or LORA_WEIGHT_NAME) if source.is_dir() else source)
        components = {c: getattr(self, c) for c in self._lora_loadable_modules}
        check_lora_keys(components, state_dict, source)
        for name, model in components.items():
            if not any(k.startswith(f"{name}.") for k in state_dict):
                continue
            own = metadata if metadata and any(k.startswith(f"{name}.") for k in metadata) else None
            model.load_lora_adapter(  # takes the keys and metadata under ``name.``
                state_dict, prefix=name, adapter_name=adapter_name, metadata=own, _pipeline=self
            )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        denoising_unet_lora_layers: dict[str, torch.Tensor] | None = None,
        reference_unet_lora_layers: dict[str, torch.Tensor] | None = None,
        denoising_unet_lora_adapter_metadata: dict | None = None,
        reference_unet_lora_adapter_metadata: dict | None = None,
        weight_name: str | None = None,
    ) -> Path:
        """Write ``save_directory/pytorch_lora_weights.safetensors`` (keys prefixed by component); return its
        path. The layers and metadata come from :func:`lora_layers`."""
        layers = {"denoising_unet": denoising_unet_lora_layers, "reference_unet": reference_unet_lora_layers}
        metadata = {
            "denoising_unet": denoising_unet_lora_adapter_metadata,
            "reference_unet": reference_unet_lora_adapter_metadata,
        }
        layers = {k: v for k, v in layers.items() if v}
        if not layers:
            raise InputError("give denoising_unet_lora_layers and/or reference_unet_lora_layers to save")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={k: v for k, v in metadata.items() if k in layers},
            weight_name=weight_name,
            safe_serialization=True,
        )
        return Path(save_directory) / (weight_name or LORA_WEIGHT_NAME)

    @staticmethod
    def write_lora_layers(
        state_dict: dict[str, torch.Tensor],
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        lora_adapter_metadata: dict | None = None,
    ) -> None:
        """diffusers' file (safetensors, the LoRA config as JSON in the header under diffusers' key),
        written as the project writes files: checked first, then atomically, with the umask's modes."""
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        from .files import _write_atomic, check_output_file

        if not safe_serialization or save_function is not None:
            raise InputError(
                "LoRA weights are written as safetensors only (no pickle, no custom save function)"
            )
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        dest = check_output_file(
            folder / (weight_name or LORA_WEIGHT_NAME), (".safetensors",), what="LoRA file"
        )
        header = {"format": "pt"}
        if lora_adapter_metadata:
            plain = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_adapter_metadata.items()}
            header[LORA_ADAPTER_METADATA_KEY] = json.dumps(plain, indent=2, sort_keys=True)
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
        _write_atomic(dest, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))

    def _with_adapters(self, components) -> list[str]:
        if components is not None:
            return list(components)
        return [c for c in self._lora_loadable_modules if getattr(getattr(self, c), "peft_config", None)]

    def fuse_lora(
        self, components=None, lora_scale: float = 1.0, safe_fusing=False, adapter_names=None, **kw
    ):
        """Add the LoRA deltas into the base weights of ``components`` (default: the UNets with adapters)."""
        super().fuse_lora(self._with_adapters(components), lora_scale, safe_fusing, adapter_names, **kw)

    def unfuse_lora(self, components=None, **kwargs):
        """Subtract the fused deltas again (the base weights come back to float rounding)."""
        super().unfuse_lora(self._with_adapters(components), **kwargs)
