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

from dataclasses import dataclass

import torch

from .errors import InputError
from .inspect import PeakMemory  # measures the working memory tiling saves; defined with the other meters

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

    def __post_init__(self):
        """What can be checked without a VAE: whole positive sizes, strides no larger than their tiles,
        boolean switches. (Multiples of the compression ratios are checked by :meth:`validate`, with the
        VAE's ratios, before every tiled pass.)"""
        for name in ("spatial", "temporal", "blend"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TileSettings.{name} must be True or False, got {getattr(self, name)!r}")
        for name, size, stride, _, _ in self._pairs(1, 1):
            for field_name, value in (
                (f"tile_sample_min_{name}", size),
                (f"tile_sample_stride_{name}", stride),
            ):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"TileSettings.{field_name} must be an int, got {value!r}")
        self.validate(1, 1)

    def _pairs(self, spatial_ratio: int, temporal_ratio: int) -> list[tuple[str, int, int, int, str]]:
        return [
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

    def validate(self, spatial_ratio: int = 8, temporal_ratio: int = 4) -> None:
        """Raise a ValueError unless every size and stride is positive, no stride exceeds its tile (tiles
        would leave gaps), and all are multiples of the VAE's compression ratios (tiles start on latent
        boundaries)."""
        for name, size, stride, ratio, unit in self._pairs(spatial_ratio, temporal_ratio):
            if stride <= 0 or size <= 0:
                raise InputError(
                    f"tile_sample_min_{name}={size} and tile_sample_stride_{name}={stride} must be > 0"
                )
            if stride > size:
                raise InputError(
                    f"tile_sample_min_{name}={size} is smaller than its stride {stride} "
                    f"(overlap {size - stride} < 0): tiles would leave gaps; "
                    f"use a stride <= the tile size (overlap = size - stride >= 0)"
                )
            if size % ratio or stride % ratio:
                raise InputError(
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
    tiles.validate(vae.spatial_compression_ratio, vae.temporal_compression_ratio)
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
    tiles.validate(vae.spatial_compression_ratio, vae.temporal_compression_ratio)
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


def _temporal_tiles(
    fn, x: torch.Tensor, out: torch.Tensor, window: int, stride: int, extent: int, keep: int, do_blend: bool
) -> torch.Tensor:
    """Run ``fn`` on overlapping windows of x (B, C, T, H, W) along time and write the result into ``out``.

    Windows of ``window + 1`` entries start every ``stride``. Every window after the first drops its first
    output (its first frame, encoded or decoded alone, repeats one the previous window covered), fades in
    over the previous window's last ``extent`` outputs, and keeps ``keep`` outputs (the first window keeps
    ``keep + 1``), cropped to ``out``'s length. Shared by the encoder (entries are frames, outputs latents)
    and the decoder (entries are latents, outputs frames).
    """
    prev, pos, n_out = None, 0, out.shape[2]
    for k, i in enumerate(range(0, x.shape[2], stride)):
        # (B, C, <= window + 1, H, W) -> (B, C', <= 1 + window', H', W')
        piece = fn(x[:, :, i : i + window + 1])
        if k > 0:
            piece = piece[:, :, 1:]  # the window's own "first frame": already covered by the previous one
            if do_blend:
                piece = blend(prev, piece, extent, dim=2)
        prev = _tail(piece, extent, dim=2)
        kept = piece[:, :, : min(keep + (k == 0), n_out - pos)]
        out[:, :, pos : pos + kept.shape[2]] = kept
        pos += kept.shape[2]
        del piece, kept
    return out


def temporal_tiled_encode(vae, x: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """(B, 3, T, H, W) -> moments (B, 2C, T_lat, h, w), encoding overlapping windows of frames (each one tiled
    in space if it is larger than a tile)."""
    tiles.validate(vae.spatial_compression_ratio, vae.temporal_compression_ratio)
    r, s = vae.temporal_compression_ratio, vae.spatial_compression_ratio
    b, _, t, h, w = x.shape
    window, stride = tiles.tile_sample_min_num_frames, tiles.tile_sample_stride_num_frames  # in frames
    out = x.new_empty(b, 2 * vae.config["latent_channels"], (t - 1) // r + 1, h // s, w // s)
    spatial = _needs_spatial(tiles, h, w, 1)
    return _temporal_tiles(
        (lambda clip: spatial_tiled_encode(vae, clip, tiles)) if spatial else vae.encode_moments,
        x,
        out,
        window,
        stride,
        (window - stride) // r,  # blend extent, in latents
        stride // r,  # latents kept per window
        tiles.blend,
    )


def temporal_tiled_decode(vae, z: torch.Tensor, tiles: TileSettings) -> torch.Tensor:
    """(B, C, T_lat, h, w) -> (B, 3, 4 (T_lat - 1) + 1, 8h, 8w), decoding overlapping windows of latent
    frames."""
    tiles.validate(vae.spatial_compression_ratio, vae.temporal_compression_ratio)
    r, s = vae.temporal_compression_ratio, vae.spatial_compression_ratio
    b, _, t_lat, h, w = z.shape
    window, stride = tiles.tile_sample_min_num_frames, tiles.tile_sample_stride_num_frames  # in frames
    out = z.new_empty(b, vae.config["out_channels"], r * (t_lat - 1) + 1, h * s, w * s)
    spatial = _needs_spatial(tiles, h, w, s)
    return _temporal_tiles(
        (lambda latents: spatial_tiled_decode(vae, latents, tiles)) if spatial else vae.decode_latents,
        z,
        out,
        window // r,  # in latents
        stride // r,
        window - stride,  # blend extent, in frames
        stride,  # frames kept per window
        tiles.blend,
    )


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
