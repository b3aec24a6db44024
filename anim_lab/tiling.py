"""Tiled encode/decode for the causal video VAE: overlapping tiles in space and time, blended linearly.

A VAE's activations grow with T*H*W, so a long or large video may not fit in memory. Tiling runs the VAE on
pieces:

- **space**: tiles of ``tile_sample_min_height x tile_sample_min_width`` pixels every ``tile_sample_stride_*``
  pixels; neighbours overlap by ``min - stride``. In the overlap the new tile fades in linearly over the old
  one (``blend``), each tile keeps its first ``stride`` rows/columns, and the result is cropped to the exact
  size.
- **time**: windows of ``tile_sample_min_num_frames + 1`` frames (``min/4 + 1`` latents) every ``stride``
  frames. A window that starts later in the clip encodes its first frame *alone* (like frame 0 of a clip), so
  that extra first latent / decoded frame is dropped; the rest is blended with the previous window over
  ``min - stride`` frames (``(min - stride) / 4`` latents when encoding) and cropped to ``4 (T_lat - 1) + 1``
  frames / ``T_lat`` latents.

The tile geometry, the order in which tiles are blended and the dispatch (time first, each window tiled in
space when it is larger than a tile) follow diffusers' ``AutoencoderKLHunyuanVideo``
(``_temporal_tiled_encode/decode``, ``tiled_encode/decode``), so both give the same numbers on the same
weights and settings. What differs is memory: diffusers keeps every decoded tile and concatenates them at the
end (working memory grows with the video); here each tile's kept part goes straight into a preallocated output
and only the strips still needed for blending are kept, so working memory stays at about one tile whatever the
video's length or size.

A quirk kept for equality: tiles and windows start at every multiple of the stride up to the edge, so the last
ones can be thin, or even redundant (at 17 frames with the defaults, latents 3..4 are decoded a second time
and blended into the last 4 frames; at 128 px with 64/48 px tiles the last row and column are 32 px wide).
Each tile is decoded with its own GroupNorm statistics, and a thin tile of plain background comes out with
shifted colours (chapter 08); choose sizes that leave no slivers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "PeakMemory",
    "TileSettings",
    "blend",
    "spatial_tiled_decode",
    "spatial_tiled_encode",
    "temporal_tiled_decode",
    "temporal_tiled_encode",
    "tiled_decode",
    "tiled_encode",
]


@dataclass(frozen=True)
class TileSettings:
    """Tile sizes and strides in *pixels / frames* (diffusers' names); overlap = min - stride.

    ``spatial``: tile in space when a frame is larger than a tile. ``temporal``: tile in time when the clip
    has more than ``tile_sample_min_num_frames`` frames. ``blend=False`` keeps the overlaps but cuts hard at
    the stride (to see what blending buys). Defaults: diffusers' (256/192 px, 16/12 frames).
    """

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_num_frames: int = 12
    spatial: bool = True
    temporal: bool = True
    blend: bool = True

    def validate(self, spatial_ratio: int = 8, temporal_ratio: int = 4) -> None:
        pairs = [
            ("height", self.tile_sample_min_height, self.tile_sample_stride_height, spatial_ratio, "pixels"),
            ("width", self.tile_sample_min_width, self.tile_sample_stride_width, spatial_ratio, "pixels"),
            (
                "num_frames",
                self.tile_sample_min_num_frames,
                self.tile_sample_stride_num_frames,
                temporal_ratio,
                "frames",
            ),
        ]
        for name, size, stride, ratio, unit in pairs:
            if stride <= 0 or size <= 0:
                raise ValueError(
                    f"tile_sample_min_{name}={size} and tile_sample_stride_{name}={stride} must be > 0"
                )
            if stride > size:
                raise ValueError(
                    f"tile_sample_min_{name}={size} is smaller than its stride {stride} "
                    f"(overlap {size - stride} < 0): tiles would leave gaps; "
                    f"use a stride <= the tile size (overlap = size - stride >= 0)"
                )
            if size % ratio or stride % ratio:
                raise ValueError(
                    f"tile_sample_min_{name}={size} and tile_sample_stride_{name}={stride} "
                    f"must be multiples of the VAE's compression ratio {ratio} ({unit}), "
                    f"so tiles start on latent boundaries"
                )

    @property
    def overlap(self) -> tuple[int, int, int]:
        """(frames, height, width) overlap in samples."""
        return (
            self.tile_sample_min_num_frames - self.tile_sample_stride_num_frames,
            self.tile_sample_min_height - self.tile_sample_stride_height,
            self.tile_sample_min_width - self.tile_sample_stride_width,
        )


def blend(prev_tail: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade ``tile`` in over the end of the previous tile along ``dim`` (in place on ``tile``, which is
    returned).

    For y < E = min(extent, both lengths):  tile[y] = prev[-E + y] * (1 - y/E) + tile[y] * (y/E).
    ``prev_tail`` only needs the previous tile's last ``extent`` entries along ``dim``.
    """
    e = min(prev_tail.shape[dim], tile.shape[dim], extent)
    if e <= 0:
        return tile
    w = torch.arange(e, dtype=tile.dtype, device=tile.device) / e  # (E,) ramp 0, 1/E, ..., (E-1)/E
    w = w.view([-1 if d == dim % tile.ndim else 1 for d in range(tile.ndim)])  # broadcast along dim
    a = prev_tail.narrow(dim, prev_tail.shape[dim] - e, e)
    b = tile.narrow(dim, 0, e)
    b.copy_(a * (1 - w) + b * w)
    return tile


def _tail(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """A copy of the last n entries along dim (a copy, so the rest of the tile can be freed)."""
    n = min(n, t.shape[dim])
    return t.narrow(dim, t.shape[dim] - n, n).clone()


def _spatial_tiles(
    fn,
    x: torch.Tensor,
    out: torch.Tensor,
    tile_in: tuple[int, int],
    stride_in: tuple[int, int],
    tile_out: tuple[int, int],
    stride_out: tuple[int, int],
    blend_extent: tuple[int, int],
    do_blend: bool,
) -> torch.Tensor:
    """Run ``fn`` on overlapping (H, W) tiles of x (B, C, T, H, W) and write the blended result into ``out``.

    Input tiles start every ``stride_in``; each output tile keeps its first ``stride_out`` rows/columns
    (cropped to ``out``'s size). Rows are processed top to bottom, tiles left to right; a tile is blended with
    the (already blended) tile above, then with the (already blended) tile to its left, as diffusers does.
    """
    out_h, out_w = out.shape[-2:]
    above: dict[int, torch.Tensor] = {}  # column index -> bottom strip of the tile above (after its blending)
    for r, i in enumerate(range(0, x.shape[-2], stride_in[0])):
        left = None
        below: dict[int, torch.Tensor] = {}
        for c, j in enumerate(range(0, x.shape[-1], stride_in[1])):
            # (B, C, T, <=tile_h, <=tile_w) -> (B, C', T', <=tile_out_h, <=tile_out_w)
            tile = fn(x[:, :, :, i : i + tile_in[0], j : j + tile_in[1]])
            if do_blend:
                if r > 0:
                    tile = blend(above[c], tile, blend_extent[0], dim=-2)
                if c > 0:
                    tile = blend(left, tile, blend_extent[1], dim=-1)
                left = _tail(tile, blend_extent[1], dim=-1)
                below[c] = _tail(tile, blend_extent[0], dim=-2)
            y0, x0 = r * stride_out[0], c * stride_out[1]
            kept = tile[:, :, :, : min(stride_out[0], out_h - y0), : min(stride_out[1], out_w - x0)]
            out[:, :, :, y0 : y0 + kept.shape[-2], x0 : x0 + kept.shape[-1]] = kept
            del tile, kept
        above = below
    return out


def spatial_tiled_encode(vae, x: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """(B, 3, T, H, W) -> moments (B, 2C, T_lat, H/8, W/8), encoding overlapping spatial tiles."""
    s = vae.spatial_compression_ratio
    th, tw = tiles.tile_sample_min_height, tiles.tile_sample_min_width
    sh, sw = tiles.tile_sample_stride_height, tiles.tile_sample_stride_width
    b, _, t, h, w = x.shape
    out = x.new_empty(
        b, 2 * vae.config["latent_channels"], (t - 1) // vae.temporal_compression_ratio + 1, h // s, w // s
    )
    return _spatial_tiles(
        vae.encode_moments,
        x,
        out,
        (th, tw),
        (sh, sw),
        (th // s, tw // s),
        (sh // s, sw // s),
        ((th - sh) // s, (tw - sw) // s),
        tiles.blend,
    )


def spatial_tiled_decode(vae, z: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """(B, C, T_lat, h, w) -> (B, 3, 4 (T_lat - 1) + 1, 8h, 8w), decoding overlapping spatial tiles."""
    s = vae.spatial_compression_ratio
    th, tw = tiles.tile_sample_min_height, tiles.tile_sample_min_width
    sh, sw = tiles.tile_sample_stride_height, tiles.tile_sample_stride_width
    b, _, t, h, w = z.shape
    out = z.new_empty(
        b, vae.config["out_channels"], vae.temporal_compression_ratio * (t - 1) + 1, h * s, w * s
    )
    return _spatial_tiles(
        vae.decode_latents,
        z,
        out,
        (th // s, tw // s),
        (sh // s, sw // s),
        (th, tw),
        (sh, sw),
        (th - sh, tw - sw),
        tiles.blend,
    )


def _needs_spatial(tiles: TileSettings, h: int, w: int, scale: int) -> bool:
    """diffusers' rule: tile in space when the frame is larger than one tile (sizes given in latents if
    scale=8)."""
    return tiles.spatial and (
        h > tiles.tile_sample_min_height // scale or w > tiles.tile_sample_min_width // scale
    )


def temporal_tiled_encode(vae, x: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """(B, 3, T, H, W) -> moments (B, 2C, T_lat, h, w), encoding overlapping windows of frames (each one tiled
    in space if it is larger than a tile)."""
    r = vae.temporal_compression_ratio
    b, _, t, h, w = x.shape
    t_lat = (t - 1) // r + 1
    window, stride = tiles.tile_sample_min_num_frames, tiles.tile_sample_stride_num_frames
    extent, keep = (window - stride) // r, stride // r  # in latents
    s = vae.spatial_compression_ratio
    out = x.new_empty(b, 2 * vae.config["latent_channels"], t_lat, h // s, w // s)
    prev, pos = None, 0
    for k, i in enumerate(range(0, t, stride)):
        clip = x[
            :, :, i : i + window + 1
        ]  # (B, 3, <= window + 1, H, W): 1 + window frames -> 1 + window/4 latents
        if _needs_spatial(tiles, h, w, 1):
            moments = spatial_tiled_encode(vae, clip, tiles)
        else:
            moments = vae.encode_moments(clip)
        if k > 0:
            moments = moments[
                :, :, 1:
            ]  # the window's first frame, encoded alone, duplicates a frame already covered
            if tiles.blend:
                moments = blend(prev, moments, extent, dim=2)
        prev = _tail(moments, extent, dim=2)
        kept = moments[:, :, : min(keep + (k == 0), t_lat - pos)]
        out[:, :, pos : pos + kept.shape[2]] = kept
        pos += kept.shape[2]
        del moments, kept
    return out


def temporal_tiled_decode(vae, z: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """(B, C, T_lat, h, w) -> (B, 3, 4 (T_lat - 1) + 1, 8h, 8w), decoding overlapping windows of latent
    frames."""
    r = vae.temporal_compression_ratio
    b, _, t_lat, h, w = z.shape
    t = r * (t_lat - 1) + 1
    window, stride = (
        tiles.tile_sample_min_num_frames // r,
        tiles.tile_sample_stride_num_frames // r,
    )  # in latents
    extent, keep = (
        tiles.tile_sample_min_num_frames - tiles.tile_sample_stride_num_frames,
        tiles.tile_sample_stride_num_frames,
    )
    s = vae.spatial_compression_ratio
    out = z.new_empty(b, vae.config["out_channels"], t, h * s, w * s)
    prev, pos = None, 0
    for k, i in enumerate(range(0, t_lat, stride)):
        latents = z[:, :, i : i + window + 1]  # (B, C, <= window + 1, h, w) -> 1 + 4 window frames
        if _needs_spatial(tiles, h, w, s):
            frames = spatial_tiled_decode(vae, latents, tiles)
        else:
            frames = vae.decode_latents(latents)
        if k > 0:
            frames = frames[
                :, :, 1:
            ]  # decoded "first frame" of this window: already covered by the previous one
            if tiles.blend:
                frames = blend(prev, frames, extent, dim=2)
        prev = _tail(frames, extent, dim=2)
        kept = frames[:, :, : min(keep + (k == 0), t - pos)]
        out[:, :, pos : pos + kept.shape[2]] = kept
        pos += kept.shape[2]
        del frames, kept
    return out


def tiled_encode(vae, x: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """Encoder moments of x (B, 3, T, H, W), tiled in time when T > window, else in space when a frame > a
    tile."""
    tiles.validate(vae.spatial_compression_ratio, vae.temporal_compression_ratio)
    if tiles.temporal and x.shape[2] > tiles.tile_sample_min_num_frames:
        return temporal_tiled_encode(vae, x, tiles)
    if _needs_spatial(tiles, *x.shape[-2:], 1):
        return spatial_tiled_encode(vae, x, tiles)
    return vae.encode_moments(x)


def tiled_decode(vae, z: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """Decoded video of z (B, C, T_lat, h, w), tiled in time when T_lat > window/4, else in space when h, w >
    a tile."""
    tiles.validate(vae.spatial_compression_ratio, vae.temporal_compression_ratio)
    if tiles.temporal and z.shape[2] > tiles.tile_sample_min_num_frames // vae.temporal_compression_ratio:
        return temporal_tiled_decode(vae, z, tiles)
    if _needs_spatial(tiles, *z.shape[-2:], vae.spatial_compression_ratio):
        return spatial_tiled_decode(vae, z, tiles)
    return vae.decode_latents(z)


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
