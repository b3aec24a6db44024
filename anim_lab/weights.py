"""Loading weights: files, diffusers folders, official ``.pth``/``.ckpt`` checkpoints, key checks, key maps.

Published weights come in a few containers: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.
safetensors`` or ``.bin``, maybe sharded), a plain ``torch.save``d state dict (``denoising_unet.pth``,
``reference_unet.pth``, ``motion_module.pth``, ``pose_guider.pth``), or a training checkpoint wrapping one
(``{"state_dict": ...}``). ``load_checkpoint`` turns each into ``{key: tensor}``.

Loading is by key name. ``load_into`` compares the model's keys and shapes with the checkpoint's *before*
touching the model and raises ``KeyMismatchError`` naming the missing, unexpected and wrongly shaped keys, so
a wrong file never half-loads. Expected differences are declared, not silenced: ``ignore_missing`` (e.g.
motion modules when loading SD1.5), ``ignore_unexpected`` (e.g. ``conv_out`` when SD1.5 goes into the
reference UNet), ``subset`` (a checkpoint that holds only part of a model, like ``motion_module.pth``). A
pattern matches a key that contains it.

The last section builds anim_lab's models from the official layouts (``load_official_*``): the one place that
knows the AnimateAnyone / AniPortrait / AnimateDiff / Hallo files. Local diffusers folders and hub ids go
through ``resolve_pretrained`` and the libraries' own ``from_pretrained``.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .errors import InputError
from .motion import sinusoidal_position_encoding

__all__ = [
    "WEIGHT_NAMES",
    "DIFFUSERS_WEIGHTS",
    "TRANSFORMERS_WEIGHTS",
    "resolve_pretrained",
    "CorruptWeightsError",
    "UnsafeWeightsError",
    "check_weight_file",
    "weight_files_in",
    "KeyMismatchError",
    "KeyReport",
    "load_checkpoint",
    "read_config",
    "read_unet_config",
    "check_keys",
    "load_into",
    "realign",
    "expected_shapes",
    "fill_position_encodings",
    "motion_keys_to_diffusers",
    "motion_keys_from_diffusers",
    "OFFICIAL_LAYOUTS",
    "load_official_video_unet",
    "load_official_hallo",
    "load_official_reference_unet",
    "load_official_pose_guider",
    "load_official_pose_guider_multiscale",
    "load_official_pipeline",
    "weight_norm_keys",
    "load_official_audio2mesh",
    "load_official_audio2pose",
]

# The one list of weight-file names of a model folder, in order of preference: diffusers' names, then
# transformers'. (A sharded folder has ``<name>.index.json`` and shard files instead.)
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
DIFFUSERS_WEIGHTS = tuple(n for n in WEIGHT_NAMES if n.startswith("diffusion_pytorch_model."))
TRANSFORMERS_WEIGHTS = tuple(n for n in WEIGHT_NAMES if n not in DIFFUSERS_WEIGHTS)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CorruptWeightsError(InputError):
    """A weight file that cannot be read: truncated (an interrupted download or copy), empty, or not a weight
    file at all. The message names the file."""

    def __init__(self, path: Path, detail: str):
        super().__init__(
            f"{path}: the weight file is truncated or corrupt ({detail}); download or save it again "
            f"(its size is {path.stat().st_size if path.exists() else 0} bytes)"
        )


class UnsafeWeightsError(InputError):
    """A pickle-based weight file (``.pth``/``.bin``/``.ckpt``) that holds more than tensors: unpickling it
    could run code, so it is refused (every torch file is read with ``torch.load(weights_only=True)``)."""

    def __init__(self, path: Path, detail: str):
        super().__init__(
            f"refused to load {path}: its pickle holds objects other than tensors and containers "
            f"({detail}); unpickling them could run code. Use the .safetensors version of these weights, or "
            "convert the file to safetensors on a machine where you trust it"
        )


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__


def _torch_load(path: Path, device, mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)``; a refused pickle raises UnsafeWeightsError, a broken file
    CorruptWeightsError, both naming the file."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # weights_only refused a global (a class or function to call)
        raise UnsafeWeightsError(path, _first_line(err)) from None
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile) as err:
        raise CorruptWeightsError(path, f"{type(err).__name__}: {str(err)[:120]}") from err


class KeyMismatchError(InputError):
    """A checkpoint's keys do not fit the model. ``.report`` holds the lists."""

    def __init__(self, report: KeyReport, what: str = "checkpoint"):
        self.report = report
        super().__init__(report.describe(what))


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(
        default_factory=list
    )  # (key, model shape, checkpoint shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, what: str = "checkpoint", show: int = 8) -> str:
        def listing(keys: list) -> str:
            more = f", ... ({len(keys) - show} more)" if len(keys) > show else ""
            return ", ".join(str(k) for k in keys[:show]) + more

        lines = [f"the {what} does not fit the model:"]
        if self.missing:
            lines.append(
                f"  {len(self.missing)} missing keys (model has, {what} lacks): {listing(self.missing)}"
            )
        if self.unexpected:
            lines.append(
                f"  {len(self.unexpected)} unexpected keys ({what} has, model lacks): "
                f"{listing(self.unexpected)}"
            )
        if self.mismatched:
            items = [f"{k} model {tuple(a)} vs {what} {tuple(b)}" for k, a, b in self.mismatched]
            lines.append(f"  {len(self.mismatched)} keys with other shapes: {listing(items)}")
        lines.append(
            "  check that the file is the right component (and model size) for this model; a common prefix "
            "(e.g. 'module.' or 'unet.') can be removed with strip_prefix="
        )
        return "\n".join(lines)


# --- reading files --------------------------------------------------------------------------------
def weight_files_in(folder: Path) -> list[Path]:
    """The weight files a model folder holds, by :data:`WEIGHT_NAMES` preference (every shard of a sharded
    checkpoint, each checked to lie in the folder); empty when it has none."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"  # sharded: {"weight_map": {key: shard file}}
        if index.is_file():
            return _shards(index)
    return []


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's ``*.index.json`` names, each checked to lie inside its
    folder: an absolute path or a ``..`` that leads out of it is refused, never read."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CorruptWeightsError(index, f"not a sharded-checkpoint index ({err!r})") from None
    folder = index.parent.resolve()
    shards = []
    for name in names:
        shard = (index.parent / str(name)).resolve()
        if not isinstance(name, str) or Path(name).is_absolute() or not shard.is_relative_to(folder):
            raise InputError(
                f"refused to read {index}: it names the shard {name!r}, which lies outside {index.parent}; "
                "a shard must be a file in the same folder"
            )
        shards.append(index.parent / name)
    return shards


def check_weight_file(path: str | Path) -> Path:
    """Raise ``CorruptWeightsError`` (naming the file) unless ``path`` is a complete weight file, and
    ``UnsafeWeightsError`` if a torch file's pickle holds anything but tensors; cheap.

    ``.safetensors``: the header is read and the data it declares must fill the file exactly, which catches
    an empty or truncated file. ``torch.save`` files (``.bin``/``.pth``/``.pt``/``.ckpt``) are zip archives
    whose directory sits at the end, so a truncated one is not a readable zip; their pickle is then read with
    ``weights_only=True`` and the tensors memory-mapped, not read, so a planted pickle is refused here, before
    diffusers or transformers open the folder.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except SafetensorError as err:
            raise CorruptWeightsError(path, str(err)) from err
    elif path.suffix in TORCH_SUFFIXES:
        if not zipfile.is_zipfile(path):
            raise CorruptWeightsError(path, "not a complete torch.save zip archive")
        _torch_load(path, "cpu", mmap=True)
    return path


def _read_file(path: Path, device) -> dict:
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device=str(device))
        except SafetensorError as err:
            raise CorruptWeightsError(path, str(err)) from err
    if path.suffix in TORCH_SUFFIXES:
        return _torch_load(path, device)
    raise InputError(
        f"{path.name}: unknown weight file type {path.suffix!r}; "
        f"expected .safetensors or one of {TORCH_SUFFIXES}"
    )


def load_checkpoint(
    path: str | Path,
    *,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    strip_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` from a weight file, a diffusers model folder, or a folder with ``subfolder``
    (default: a ``unet/`` folder if the path itself holds no weights). Training wrappers ``{"state_dict":
    ...}`` are unwrapped; ``strip_prefix`` removes a prefix every key carries (e.g. ``"module."``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no weights at {path}: give a .safetensors/.pth/.ckpt file or a diffusers model folder"
        )
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        files = weight_files_in(folder)
        if not files and subfolder is None and (path / "unet").is_dir():
            files = weight_files_in(path / "unet")
        if not files:
            raise FileNotFoundError(
                f"no weights in folder {folder}: expected one of {', '.join(WEIGHT_NAMES)} (or a sharded "
                "*.index.json), or pass subfolder= for a pipeline folder (e.g. 'unet', 'vae')"
            )
    else:
        files = [path]

    state_dict: dict = {}
    for f in files:
        state_dict.update(_read_file(f, device))
    for wrapper in ("state_dict", "module"):  # Lightning / DeepSpeed style checkpoints
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: not a state dict; entries that are not tensors: {bad[:5]}")
    if strip_prefix:
        without = [k for k in state_dict if not k.startswith(strip_prefix)]
        if without:
            raise InputError(f"{path}: strip_prefix={strip_prefix!r}, but keys like {without[0]!r} lack it")
        state_dict = {k[len(strip_prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_config(path: str | Path, subfolder: str | None = None) -> dict:
    """A diffusers ``config.json`` as constructor kwargs (its ``_class_name``-style entries dropped)."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"no config.json in {folder}; give a diffusers model folder (or its parent + subfolder)"
        )
    return {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}


def read_unet_config(path: str | Path) -> dict:
    """``config.json`` of a UNet folder, or of the ``unet/`` subfolder of a pipeline folder."""
    path = Path(path)
    return read_config(path, None if (path / "config.json").is_file() else "unet")


# --- comparing and loading ------------------------------------------------------------------------
def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of all ``model.state_dict()`` holds (persistent buffers included); works on meta."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(p in key for p in patterns)


def check_keys(
    model: nn.Module | dict[str, tuple],
    state_dict: dict[str, torch.Tensor] | dict[str, tuple],
    *,
    ignore_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    subset: str | None = None,
) -> KeyReport:
    """Compare names and shapes. ``model`` may be a module or a ``{key: shape}`` dict (e.g. a reference key
    list); ``subset``: only the model keys containing it are expected (a partial checkpoint)."""
    want = expected_shapes(model) if isinstance(model, nn.Module) else dict(model)
    if subset is not None:
        want = {k: s for k, s in want.items() if subset in k}
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}
    report = KeyReport()
    report.missing = [k for k in want if k not in have and not _matches(k, ignore_missing)]
    report.unexpected = [k for k in have if k not in want and not _matches(k, ignore_unexpected)]
    report.mismatched = [(k, want[k], have[k]) for k in want if k in have and want[k] != have[k]]
    return report


def load_into(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    ignore_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    subset: str | None = None,
    assign: bool = False,
    what: str = "checkpoint",
) -> nn.Module:
    """Check every key, then load. On any mismatch raise ``KeyMismatchError`` and leave the model untouched.

    ``assign=True`` puts the checkpoint's tensors into the model as they are (their dtype and device); it is
    how a model built on the meta device gets real weights without first allocating its own.
    """
    report = check_keys(
        model, state_dict, ignore_missing=ignore_missing, ignore_unexpected=ignore_unexpected, subset=subset
    )
    if not report.ok:
        raise KeyMismatchError(report, what)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
    return model


def realign(model: nn.Module, alignment: int = 64) -> nn.Module:
    """Copy every parameter and buffer that does not start on an ``alignment``-byte boundary to a fresh
    allocation (PyTorch's CPU allocator aligns to 64 bytes).

    Tensors read from a safetensors file sit at the file's byte offsets. CPU kernels take other code paths on
    unaligned memory, so a model loaded that way computes the same sums in another order (about 1e-6 apart
    from the model that was saved). After ``realign`` a loaded model gives bit-identical outputs."""
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
                        fresh = tensor.detach().clone()
                        if isinstance(tensor, nn.Parameter):
                            fresh = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                        table[name] = fresh
    return model


# --- the motion module's position encodings and the diffusers layout ------------------------------
def fill_position_encodings(
    state_dict: dict[str, torch.Tensor], max_len: int, expected_keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Add ``...pos_encoder.pe`` entries a checkpoint lacks (diffusers' conversion drops them), computed from
    the formula; the width is read from the sibling ``to_q.weight``. Entries present are kept as they are."""
    out = dict(state_dict)
    for key in expected_keys:
        if key.endswith("pos_encoder.pe") and key not in out:
            sibling = key.replace("pos_encoder.pe", "to_q.weight")
            if sibling in out:
                ref = out[sibling]
                out[key] = sinusoidal_position_encoding(max_len, ref.shape[1]).to(ref.device, ref.dtype)
    return out


# Original AnimateDiff / AnimateAnyone motion-module names -> diffusers' MotionAdapter /
# AnimateDiffTransformer3D names.
_TO_DIFFUSERS = [
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
]


def motion_keys_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to diffusers' ``MotionAdapter`` layout: drop ``temporal_transformer.``, rename the attention
    blocks and norms, and keep one position encoding per block (``pos_embed.pe``; the two attention blocks'
    copies are the same formula). Works on full UNet paths and on the keys of one module."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attention_blocks.1.pos_encoder.pe"):
            continue  # diffusers holds one encoding per transformer block, used before both attentions
        new = "." + key.replace("temporal_transformer.", "").replace(
            ".attention_blocks.0.pos_encoder.", ".pos_embed."
        )
        for a, b in _TO_DIFFUSERS:
            new = new.replace(a, b)
        out[new[1:]] = value
    return out


def motion_keys_from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``motion_keys_to_diffusers``: ``pos_embed.pe`` goes to both attention blocks (a
    checkpoint without it is completed by ``fill_position_encodings``)."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(.*motion_modules\.\d+\.)?(.*)$", key)
        prefix, rest = m.group(1) or "", m.group(2)
        if rest.endswith(".pos_embed.pe"):
            block = rest[: -len("pos_embed.pe")]
            for i in (0, 1):
                out[f"{prefix}temporal_transformer.{block}attention_blocks.{i}.pos_encoder.pe"] = value
            continue
        new = "." + rest
        for a, b in _TO_DIFFUSERS:
            new = new.replace(b, a)
        out[f"{prefix}temporal_transformer.{new[1:]}"] = value
    return out


# --- pretrained folders (diffusers / transformers save_pretrained layout) -----------------------------------


def resolve_pretrained(
    path_or_id: str | Path, subfolder: str | None, what: str, weight_files: tuple[str, ...], example: str
) -> tuple[str | Path, dict]:
    """What ``from_pretrained`` should get: a checked local folder, or a hub id with its ``subfolder`` kwarg.

    A local path (it exists, is a Path, or starts with ``.``, ``/`` or ``~``) must be a folder holding
    config.json and one of ``weight_files``; otherwise a FileNotFoundError names what is missing. The weight
    file ``from_pretrained`` will read (the first of ``weight_files`` present) is checked with
    :func:`check_weight_file`, so a truncated one raises ``CorruptWeightsError`` naming it. Anything else is
    passed on as a hub id (which downloads only where the user's machine allows it).
    """
    path = Path(path_or_id).expanduser()
    if not (path.exists() or isinstance(path_or_id, Path) or str(path_or_id).startswith((".", "/", "~"))):
        return str(path_or_id), ({"subfolder": subfolder} if subfolder else {})
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} does not exist; pass a folder saved with save_pretrained (config.json + "
            f"{weight_files[0]}), e.g. {example}, or a hub id"
        )
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    present = [folder / name for name in weight_files if (folder / name).is_file()]
    for name in weight_files:  # a sharded checkpoint: every shard it names must lie in the folder
        if (folder / f"{name}.index.json").is_file():
            present += _shards(folder / f"{name}.index.json")
    if not present:
        missing.append(" or ".join(weight_files))
    if missing:
        raise FileNotFoundError(
            f"{what} folder {folder} is incomplete: missing {', '.join(missing)}; "
            f"save it with save_pretrained (if it is a whole pipeline folder, pass its subfolder, "
            f"e.g. subfolder='{example.rsplit('/', 1)[-1]}')"
        )
    check_weight_file(present[0])
    return folder, {}


# --- the official layouts: anim_lab models from the files the repositories ship -----------------------------
# (A folder written by ``save_pretrained`` loads with the class's own ``from_pretrained``; these functions
# read the ``.pth`` / ``.ckpt`` / diffusers files as AnimateAnyone, AniPortrait, AnimateDiff and Hallo ship
# them.)
# The model classes are imported inside each function: the models' own modules import this one.

# The files of the official repositories' weight folders (README "pretrained_weights" / "pretrained_model").
_BASE_UNET_DIRS = ("stable-diffusion-v1-5", "sd-image-variations-diffusers")
OFFICIAL_LAYOUTS = {
    "animate_anyone": "Moore-AnimateAnyone pretrained_weights/",
    "aniportrait": "AniPortrait pretrained_model/",
}
_LAYOUT_TREE = """{root}
|-- denoising_unet.pth
|-- reference_unet.pth
|-- pose_guider.pth            ({guider})
|-- motion_module.pth          (or an AnimateDiff mm_sd_v15_v2.ckpt)
|-- stable-diffusion-v1-5/     (or sd-image-variations-diffusers/)
|   `-- unet/config.json
|-- sd-vae-ft-mse/             (config.json + diffusion_pytorch_model.safetensors or .bin)
`-- image_encoder/             (config.json + model.safetensors or pytorch_model.bin)
(any .pth/.ckpt may be given as a .safetensors file of the same name instead; safetensors is preferred)"""


def _unet_kwargs(path: Path, unet_kwargs: dict | None) -> dict:
    from .configs import SD15

    if unet_kwargs is not None:
        return unet_kwargs
    return read_unet_config(path) if path.is_dir() else SD15.get("unet")


def load_official_video_unet(
    unet: str | Path,
    motion_module: str | Path | None = None,
    *,
    unet_kwargs: dict | None = None,
    motion_kwargs: dict | None = None,
    device: str | torch.device = "cpu",
):
    """The denoising :class:`~anim_lab.unet.VideoUNet` from the official files.

    ``unet``: a diffusers UNet folder (config.json + diffusion_pytorch_model.*), a model folder with a
    ``unet/`` subfolder, or a state-dict file (``denoising_unet.pth``; then ``unet_kwargs`` default to SD1.5).
    ``motion_module``: ``motion_module.pth`` / an AnimateDiff ``.ckpt``; with it, ``motion_kwargs`` default to
    ``MOTION_SD15``. Without it, ``motion_kwargs=None`` gives the image denoiser (stage 1); a dict gives
    zero-initialised motion modules (the start of stage 2).
    """
    from .motion import MOTION_SD15
    from .unet import VideoUNet

    path = Path(unet)
    unet_kwargs = _unet_kwargs(path, unet_kwargs)
    if motion_module is not None and motion_kwargs is None:
        motion_kwargs = MOTION_SD15
    # Built without memory when the files provide every tensor; otherwise initialised normally.
    all_from_files = motion_kwargs is None or motion_module is not None
    with torch.device("meta" if all_from_files else device):
        model = VideoUNet(unet_kwargs, motion_kwargs)
    model.load_2d_weights(load_checkpoint(path, device=device), assign=all_from_files)
    if motion_module is not None:
        model.load_motion_modules(load_checkpoint(motion_module, device=device), assign=True)
    return model.eval()


def load_official_reference_unet(
    unet: str | Path, *, unet_kwargs: dict | None = None, device: str | torch.device = "cpu"
):
    """The :class:`~anim_lab.unet.ReferenceUNet` from a diffusers UNet folder (SD1.5 / sd-image-variations) or
    ``reference_unet.pth`` (then ``unet_kwargs`` default to SD1.5)."""
    from .unet import ReferenceUNet

    path = Path(unet)
    with torch.device("meta"):
        model = ReferenceUNet(_unet_kwargs(path, unet_kwargs))
    model.load_weights(load_checkpoint(path, device=device), assign=True)
    return model.eval()


def load_official_pose_guider(
    path: str | Path, *, prefix: str = "", device: str | torch.device = "cpu", **kwargs
):
    """AnimateAnyone's ``pose_guider.pth`` (16 keys) as a :class:`~anim_lab.pose_guider.PoseGuider`;
    ``kwargs`` default to its (16, 32, 96, 256) config. ``prefix`` picks and strips one part of a bigger
    file: Hallo's face locator is
    ``load_official_pose_guider("net.pth", prefix="face_locator.", **FACE_LOCATOR_SD15)``."""
    from .pose_guider import PoseGuider

    state_dict = load_checkpoint(path, device=device)
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise InputError(f"{path}: no key starts with prefix {prefix!r}")
    with torch.device("meta"):
        model = PoseGuider(**kwargs)
    load_into(model, state_dict, what="pose guider checkpoint", assign=True)
    return model.eval()


def load_official_pose_guider_multiscale(path: str | Path, *, device: str | torch.device = "cpu", **kwargs):
    """AniPortrait's ``pose_guider.pth`` (184 keys) as a :class:`~anim_lab.pose_guider.PoseGuiderMultiScale`;
    ``kwargs`` default to the released SD1.5-size guider."""
    from .pose_guider import PoseGuiderMultiScale

    built_on = device if kwargs.get("reference_attention") else "meta"  # the extension's keys need memory
    with torch.device(built_on):
        model = PoseGuiderMultiScale(**kwargs)
    model.load_weights(load_checkpoint(path, device=device), assign=built_on == "meta")
    return model.eval()


def _official_pose_guider(
    state_dict: dict, layout: str, path: Path, unet_kwargs: dict, kwargs: dict | None
) -> nn.Module:
    """The layout's guider from its state dict. AnimateAnyone's file has no config: its sizes are read off
    the weights' shapes. AniPortrait's is built from ``kwargs`` (default: the released config)."""
    from .configs import POSE_GUIDER_MULTISCALE_SD15
    from .pose_guider import PoseGuider, PoseGuiderMultiScale

    if layout == "aniportrait":
        if "scale" not in state_dict:
            raise InputError(
                f"{path.name} is a single-scale AnimateAnyone pose guider ({len(state_dict)} keys, no "
                "'scale'), not AniPortrait's multi-scale one: is this an animate_anyone folder? "
                "Pass layout='animate_anyone'"
            )
        if kwargs is None:
            kwargs = dict(POSE_GUIDER_MULTISCALE_SD15, block_out_channels=unet_kwargs["block_out_channels"])
        with torch.device("meta"):
            guider = PoseGuiderMultiScale(**kwargs)
        try:
            guider.load_weights(state_dict, assign=True)
        except KeyMismatchError as err:
            raise KeyMismatchError(err.report, f"{path.name} (layout 'aniportrait')") from None
        return guider
    if "conv_in.weight" not in state_dict or "scale" in state_dict:
        raise InputError(
            f"{path.name} is not an AnimateAnyone single-scale pose guider (keys like "
            f"{sorted(state_dict)[:3]}); for AniPortrait weights pass layout='aniportrait'"
        )
    convs = [state_dict[f"blocks.{i}.weight"] for i in range(1, 64, 2) if f"blocks.{i}.weight" in state_dict]
    kwargs = dict(
        conditioning_channels=state_dict["conv_in.weight"].shape[1],
        block_out_channels=[state_dict["conv_in.weight"].shape[0]] + [w.shape[0] for w in convs],
        conditioning_embedding_channels=state_dict["conv_out.weight"].shape[0],
    )
    with torch.device("meta"):
        guider = PoseGuider(**kwargs)
    try:
        load_into(guider, state_dict, assign=True, what=path.name)
    except KeyMismatchError as err:
        raise KeyMismatchError(err.report, f"{path.name} (layout 'animate_anyone')") from None
    return guider


def _official_files(folder: Path, layout: str) -> dict[str, Path]:
    """The files of an official weights folder (see ``_LAYOUT_TREE``); a FileNotFoundError lists every one
    that is missing, with the expected tree."""
    if layout not in OFFICIAL_LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {sorted(OFFICIAL_LAYOUTS)}")
    guider_name = "AniPortrait multi-scale" if layout == "aniportrait" else "AnimateAnyone single-scale"
    tree = _LAYOUT_TREE.format(root=f"{folder}/", guider=guider_name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"weights folder {folder} does not exist; expected the {layout} layout:\n{tree}"
        )
    missing = []

    def weight_file(*stems: str) -> Path | None:
        for stem in stems:  # safetensors first: it cannot run code when loaded
            for suffix in (".safetensors", Path(stem).suffix or ".pth"):
                path = folder / (Path(stem).stem + suffix)
                if path.is_file():
                    return path
        missing.append(" or ".join(stems))
        return None

    def model_dir(names: Iterable[str], weight_names: Iterable[str], subfolder: str = "") -> Path | None:
        for name in names:
            d = folder / name / subfolder
            has_weights = not weight_names or any((d / w).is_file() for w in weight_names)
            if (d / "config.json").is_file() and has_weights:
                return d
        wanted = " or ".join(f"{n}/{subfolder}".rstrip("/") for n in names)
        missing.append(f"{wanted}/ (config.json + weights)")
        return None

    files = dict(
        denoising_unet=weight_file("denoising_unet.pth"),
        reference_unet=weight_file("reference_unet.pth"),
        pose_guider=weight_file("pose_guider.pth"),
        motion_module=weight_file("motion_module.pth", "mm_sd_v15_v2.ckpt"),
        base_unet=model_dir(_BASE_UNET_DIRS, (), "unet"),
        vae=model_dir(["sd-vae-ft-mse"], DIFFUSERS_WEIGHTS),
        image_encoder=model_dir(
            ["image_encoder", "sd-image-variations-diffusers/image_encoder"], TRANSFORMERS_WEIGHTS
        ),
    )
    if missing:
        raise FileNotFoundError(
            f"the {layout} weights folder {folder} is incomplete; missing: {'; '.join(missing)}.\n"
            f"Expected layout:\n{tree}"
        )
    return files


def load_official_pipeline(
    folder: str | Path,
    layout: str = "animate_anyone",
    *,
    torch_dtype: torch.dtype = torch.float32,
    motion_kwargs: dict | None = None,
    pose_guider_kwargs: dict | None = None,
):
    """A :class:`~anim_lab.pipelines.Pose2VideoPipeline` from an official weights folder (``layout``:
    ``"animate_anyone"`` or ``"aniportrait"``, see ``_LAYOUT_TREE``), strictly.

    The UNets' 2D configuration comes from the base model's ``unet/config.json`` (SD1.5 or
    sd-image-variations; its weights are not read: ``denoising_unet.pth`` and ``reference_unet.pth`` hold
    every 2D key), the motion modules from ``motion_module.pth`` (``motion_kwargs``: default the
    inference_v2.yaml values). The scheduler is the official one (``guidance.build_scheduler()``). The
    AnimateAnyone guider's sizes are read off its weights; AniPortrait's multi-scale guider is built with
    ``pose_guider_kwargs`` (default: the released ``configs.POSE_GUIDER_MULTISCALE_SD15`` with the UNet's
    widths).
    """
    from .clip import load_image_encoder
    from .guidance import build_scheduler
    from .motion import MOTION_SD15
    from .pipelines.pose2video import Pose2VideoPipeline
    from .vae import load_vae

    folder = Path(folder)
    files = _official_files(folder, layout)
    unet_kwargs = read_unet_config(files["base_unet"])
    reference_unet = load_official_reference_unet(files["reference_unet"], unet_kwargs=unet_kwargs)
    denoising_unet = load_official_video_unet(
        files["denoising_unet"],
        files["motion_module"],
        unet_kwargs=unet_kwargs,
        motion_kwargs=MOTION_SD15 if motion_kwargs is None else motion_kwargs,
    )
    pose_guider = _official_pose_guider(
        load_checkpoint(files["pose_guider"]), layout, files["pose_guider"], unet_kwargs, pose_guider_kwargs
    )
    return Pose2VideoPipeline(
        vae=load_vae(files["vae"], torch_dtype=torch_dtype),
        image_encoder=load_image_encoder(files["image_encoder"], torch_dtype=torch_dtype),
        reference_unet=reference_unet.to(torch_dtype).eval(),
        denoising_unet=denoising_unet.to(torch_dtype).eval(),
        pose_guider=pose_guider.to(torch_dtype).eval(),
        scheduler=build_scheduler(),
    )


# --- AniPortrait's audio models: audio2mesh.pt, audio2pose.pt ----------------------------------------------
# wav2vec2's positional convolution is weight-normalised. PyTorch's old ``nn.utils.weight_norm`` (torch < 2.1,
# as AniPortrait pins torch 2.0.1) stores it as ``weight_g`` / ``weight_v``; the parametrization that
# transformers uses on newer torch stores the same two tensors as ``parametrizations.weight.original0`` /
# ``original1``.
_WEIGHT_NORM_NAMES = (
    ("weight_g", "parametrizations.weight.original0"),
    ("weight_v", "parametrizations.weight.original1"),
)


def weight_norm_keys(
    state_dict: dict[str, torch.Tensor], model_keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Rename weight-norm keys (``conv.weight_g``/``weight_v`` <-> ``conv.parametrizations.weight.original0``/
    ``original1``) to the form the model has; every other key is left as it is."""
    model_keys = set(model_keys)
    out = {}
    for key, value in state_dict.items():
        new = key
        if key not in model_keys:
            for old_name, new_name in _WEIGHT_NORM_NAMES:
                for a, b in ((old_name, new_name), (new_name, old_name)):
                    if key.endswith("." + a) and key[: -len(a)] + b in model_keys:
                        new = key[: -len(a)] + b
        out[new] = value
    return out


def _load_audio_model(cls, path, device, what: str, kwargs: dict) -> nn.Module:
    state_dict = load_checkpoint(path, device=device)
    with torch.device("meta"):
        model = cls(**kwargs)
    state_dict = weight_norm_keys(state_dict, model.state_dict().keys())
    load_into(model, state_dict, assign=True, what=f"{Path(path).name} ({what})")
    return model


def load_official_audio2mesh(path: str | Path, *, device: str | torch.device = "cpu", **kwargs):
    """AniPortrait's ``audio2mesh.pt`` as an :class:`~anim_lab.audio2mesh.Audio2Mesh`, strictly by key.

    Keys (``Audio2MeshModel``): ``audio_encoder.*`` (a whole ``Wav2Vec2Model``: ``masked_spec_embed``,
    ``feature_extractor.conv_layers.{0..6}``, ``feature_projection``, ``encoder.pos_conv_embed``,
    ``encoder.layer_norm``, ``encoder.layers.{0..11}``), ``in_fn.{weight (512, 768), bias}``,
    ``out_fn.{weight (1404, 512), bias (1404,)}``. ``kwargs`` go to ``Audio2Mesh`` (default: the released
    size). The file is read with ``torch.load(weights_only=True)`` (or as safetensors)."""
    from .audio2mesh import Audio2Mesh

    return _load_audio_model(Audio2Mesh, path, device, "AniPortrait Audio2Mesh", kwargs).eval()


def load_official_audio2pose(path: str | Path, *, device: str | torch.device = "cpu", **kwargs):
    """AniPortrait's ``audio2pose.pt`` as an :class:`~anim_lab.audio2pose.Audio2Pose`, strictly by key.

    Keys (``Audio2PoseModel``): ``audio_encoder.*``, ``pose_map`` (6 -> 512), ``in_fn`` (768 -> 512),
    ``PPE.pe`` (1, 600, 512), ``transformer_decoder.layers.{0..7}.{self_attn, multihead_attn}.{in_proj_weight
    (1536, 512), in_proj_bias, out_proj.*}``, ``.linear1`` (1024, 512), ``.linear2`` (512, 1024),
    ``.norm{1,2,3}``, ``pose_map_r`` (512 -> 6), ``id_embed.weight`` (100, 512). The ALiBi mask is not in
    the file (a plain attribute in the reference): it is computed."""
    from .audio2pose import Audio2Pose, alibi_mask

    model = _load_audio_model(Audio2Pose, path, device, "AniPortrait Audio2Pose", kwargs)
    mask = alibi_mask(model.config.num_heads, model.config.max_len).to(device)
    model.register_buffer("biased_mask", mask, persistent=False)  # built on meta: computed here
    return model.eval()


def load_official_hallo(
    path: str | Path,
    *,
    unet_kwargs: dict | None = None,
    motion_kwargs: dict | None = None,
    audio_kwargs: dict | None = None,
    face_locator_kwargs: dict | None = None,
    image_proj_kwargs: dict | None = None,
    audio_proj_kwargs: dict | None = None,
    device: str | torch.device = "cpu",
):
    """Hallo's ``net.pth`` as a :class:`~anim_lab.hallo.HalloNet`, strictly by key (as Hallo's
    ``inference.py`` asserts: no key missing, none unexpected), read with ``torch.load(weights_only=True)``.

    The file is one state dict of ``Net(reference_unet, denoising_unet, face_locator, imageproj, audioproj)``:
    2656 keys; ``reference_unet.`` (682, a :class:`~anim_lab.unet.ReferenceUNet`), ``denoising_unet.``
    (1946: a :class:`~anim_lab.unet.VideoUNet` with motion modules, 588 keys, and audio modules, 672 keys),
    ``face_locator.`` (16, a :class:`~anim_lab.pose_guider.PoseGuider`), ``imageproj.`` (4), ``audioproj.``
    (8). The kwargs default to the released sizes (SD1.5, ``MOTION_SD15``, ``AUDIO_MODULES_SD15``,
    ``FACE_LOCATOR_SD15``, ``IMAGE_PROJ_SD15``, ``AUDIO_PROJ_SD15``)."""
    from .configs import SD15
    from .hallo import AUDIO_MODULES_SD15, AUDIO_PROJ_SD15, IMAGE_PROJ_SD15, HalloNet
    from .motion import MOTION_SD15

    path = Path(path)
    state_dict = load_checkpoint(path, device=device)
    with torch.device("meta"):  # every tensor comes from the file
        net = HalloNet(
            unet_kwargs or SD15.get("unet"),
            motion_kwargs or MOTION_SD15,
            audio_kwargs or AUDIO_MODULES_SD15,
            face_locator_kwargs,
            image_proj_kwargs or IMAGE_PROJ_SD15,
            audio_proj_kwargs or AUDIO_PROJ_SD15,
        )
    load_into(net, state_dict, assign=True, what=f"{path.name} (Hallo net.pth)")
    return net.eval()
