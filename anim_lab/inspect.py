"""Look inside models without weights: build on the ``meta`` device, trace shapes, count parameters and FLOPs.

A tensor on the ``meta`` device has a shape and a dtype but no storage, so a full-size model (SD1.5's
860M-parameter UNet) builds in a fraction of a second and runs a "forward" that computes every shape and no
number. That is enough for shape tables, parameter counts and FLOP counts (torch's ``FlopCounterMode`` counts
the matrix multiplications and convolutions that would run). :class:`PeakMemory` measures the other cost, the
tensor memory a block of code holds at its peak (on real tensors, any device).

    unet = build("SD15", "unet")                       # on meta
    rows = trace_shapes(unet, x, t, encoder_hidden_states=e, depth=1)
    n = count_parameters(unet); flops = count_flops(unet, x, t, encoder_hidden_states=e)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .configs import Preset, get_preset
from .pose_guider import PoseGuider
from .unet import ReferenceUNet, VideoUNet

__all__ = [
    "COMPONENTS",
    "build",
    "count_parameters",
    "weight_bytes",
    "count_flops",
    "flops_by_module",
    "ShapeRecord",
    "trace_shapes",
    "format_table",
    "human",
    "PeakMemory",
]


def _build_unet(p: Preset) -> nn.Module:
    return UNet2DConditionModel(**p.get("unet"))


def _build_vae(p: Preset) -> nn.Module:
    return AutoencoderKL(**p.get("vae"))


def _build_image_encoder(p: Preset) -> nn.Module:
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**p.get("image_encoder")))


def _build_pose_guider(p: Preset) -> nn.Module:
    return PoseGuider(**p.get("pose_guider"))


def _build_reference_unet(p: Preset) -> nn.Module:
    return ReferenceUNet(p.get("unet"))


def _build_denoising_unet(p: Preset) -> nn.Module:
    return VideoUNet(p.get("unet"), p.get("motion"))


# component name -> builder(preset) -> nn.Module.
COMPONENTS: dict[str, Callable[[Preset], nn.Module]] = {
    "unet": _build_unet,
    "vae": _build_vae,
    "image_encoder": _build_image_encoder,
    "pose_guider": _build_pose_guider,
    "reference_unet": _build_reference_unet,
    "denoising_unet": _build_denoising_unet,
}


def build(preset: str | Preset, component: str, device: str | torch.device = "meta") -> nn.Module:
    """Build one component of a preset, by default on the meta device (shapes only, no memory)."""
    p = get_preset(preset)
    if component not in COMPONENTS:
        raise KeyError(f"unknown component {component!r}; known: {sorted(COMPONENTS)}")
    with torch.device(device):
        model = COMPONENTS[component](p)
    return model.eval()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers are not parameters: the motion module's position encoding is a
    buffer)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def weight_bytes(module: nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Bytes the parameters take when stored in ``dtype`` (fp16: 2 bytes each)."""
    return count_parameters(module) * torch.finfo(dtype).bits // 8


def _detached(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # FlopCounterMode's module tracker hooks autograd; inputs that carry a graph from earlier calls confuse
    # it.
    d = lambda a: a.detach() if isinstance(a, torch.Tensor) else a  # noqa: E731
    return tuple(d(a) for a in args), {k: d(v) for k, v in kwargs.items()}


def count_flops(module: nn.Module | Callable, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``module(*args, **kwargs)``. A multiply-add counts as 2 FLOPs.

    Count on the meta device: there attention decomposes into matrix products that are counted, whereas on the
    CPU torch runs ``scaled_dot_product_attention`` as a fused kernel that ``FlopCounterMode`` has no formula
    for, and the attention FLOPs go missing (tests/test_inspect.py measures the gap).
    """
    args, kwargs = _detached(args, kwargs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


def flops_by_module(module: nn.Module, *args: Any, depth: int = 1, **kwargs: Any) -> dict[str, int]:
    """FLOPs of one call, split by submodule at the given depth below ``module`` (names as in
    ``named_modules``)."""
    args, kwargs = _detached(args, kwargs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    root = type(module).__name__
    counted = {
        name[len(root) + 1 :]: sum(per_op.values())
        for name, per_op in counter.get_flop_counts().items()
        if name.startswith(root + ".")
    }

    def total(name: str) -> int:
        # A ModuleList is never called itself, so it has no entry: add up its called children instead.
        if name in counted:
            return counted[name]
        return sum(total(f"{name}.{child}") for child, _ in module.get_submodule(name).named_children())

    names = [n for n, _ in module.named_modules() if n and n.count(".") == depth - 1]
    return {n: f for n in names if (f := total(n))}


@dataclass
class ShapeRecord:
    name: str  # module path, e.g. "down_blocks.1"
    kind: str  # class name
    inputs: list[tuple[int, ...]]  # shapes of the tensor positional inputs
    outputs: list[tuple[int, ...]]  # shapes of the tensor outputs (tuples and dataclass outputs flattened)
    params: int


def _tensor_shapes(obj: Any) -> list[tuple[int, ...]]:
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape)]
    if isinstance(obj, (list, tuple)):
        return [s for o in obj for s in _tensor_shapes(o)]
    if isinstance(obj, dict):
        return [s for o in obj.values() for s in _tensor_shapes(o)]
    if hasattr(obj, "to_tuple"):  # diffusers / transformers ModelOutput
        return _tensor_shapes(obj.to_tuple())
    return []


def trace_shapes(
    module: nn.Module,
    *args: Any,
    depth: int = 1,
    include: Callable[[str, nn.Module], bool] | None = None,
    **kwargs: Any,
) -> list[ShapeRecord]:
    """Run ``module(*args, **kwargs)`` once with forward hooks and record each submodule's input/output
    shapes.

    By default records the direct children (``depth=1``); ``include(name, module)`` selects other modules
    instead. Records are in call order, so a submodule called twice appears twice.
    """
    records: list[ShapeRecord] = []
    handles = []

    def want(name: str, m: nn.Module) -> bool:
        if include is not None:
            return include(name, m)
        return name != "" and name.count(".") == depth - 1

    for name, m in module.named_modules():
        if want(name, m):

            def hook(mod, inp, out, name=name):
                records.append(
                    ShapeRecord(
                        name,
                        type(mod).__name__,
                        _tensor_shapes(inp),
                        _tensor_shapes(out),
                        count_parameters(mod),
                    )
                )

            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'. For parameter counts, FLOPs and bytes in tables."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table with aligned columns (stable output for notebooks)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- memory --------------------------------------------------------------------------------------------
class PeakMemory(TorchDispatchMode):
    """Count the bytes of tensor storages created inside the block, live and at peak
    (any device, CPU included).

    Every tensor an operator returns is recorded by its storage; the count drops when the storage is freed. So
    ``peak`` is the most tensor memory the code held at once (inputs created before the block are not counted;
    an operator's internal scratch buffers are not tensors and are not seen). Deterministic, unlike process
    RSS.

        with PeakMemory() as mem:
            video = vae.decode(z)
        working = mem.peak - video.numel() * video.element_size()
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes == 0 or key in self.live:
                    continue  # a view or an in-place result: storage already counted
                self.live[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out
