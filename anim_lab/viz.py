"""Figure helpers for the chapters. Each draws into a new figure with an explicit size and returns it
(or None)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["FIGURES", "pipeline_diagram", "image_grid", "save"]

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def save(fig, name: str) -> Path | None:
    """Write ``figures/<name>.png`` only when asked (``ANIM_LAB_SAVE_FIGURES=1``, set by ``make notebook``
    and ``make figures``) in a source checkout; otherwise do nothing, so that nbval runs and Lab sessions only
    display and leave the repository clean (the PNGs differ by a grey level or two from run to run)."""
    if os.environ.get("ANIM_LAB_SAVE_FIGURES") != "1" or not FIGURES.is_dir():
        return None
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path


def image_grid(images, titles=None, ncols=None, figsize=None, suptitle=None):
    """Show a list of (H, W, 3) uint8 / float [0, 1] images (or (H, W) maps) in a grid; returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = ncols or n
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (2.0 * ncols, 2.0 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap=None if np.asarray(images[i]).ndim == 3 else "viridis")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


# Boxes of the AnimateAnyone pipeline: (key, label, x, y, colour). Coordinates in a 16 x 9 canvas.
_BOXES = {
    "ref": ("reference image", 0.3, 7.0, "#dddddd"),
    "pose": ("pose video", 0.3, 1.0, "#dddddd"),
    "noise": ("noise latents", 0.3, 4.0, "#dddddd"),
    "vae_enc": ("VAE encoder", 3.6, 7.6, "#9ecae1"),
    "clip": ("CLIP image encoder", 3.6, 5.9, "#a1d99b"),
    "guider": ("PoseGuider", 3.6, 1.0, "#fdae6b"),
    "refnet": ("ReferenceNet\n(2D UNet, t = 0)", 7.0, 7.0, "#bcbddc"),
    "unet": ("denoising UNet\n(per-frame 2D + motion modules)\nx steps, CFG", 7.0, 3.3, "#fc9272"),
    "vae_dec": ("VAE decoder\n(frame by frame)", 10.9, 3.6, "#9ecae1"),
    "out": ("video", 14.7, 3.8, "#dddddd"),
}
_W, _H = {"ref": 2.4, "pose": 2.4, "noise": 2.4, "out": 1.1, "vae_dec": 2.6}, 1.1


def pipeline_diagram(
    shapes: dict[str, str] | None = None, chapters: dict[str, str] | None = None, figsize=(14, 7.5)
):
    """Draw the AnimateAnyone pipeline: boxes for each component, arrows labelled with the data shapes, and
    the chapter that builds each part. ``shapes`` maps an arrow name to a label, ``chapters`` a box key to a
    chapter."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    shapes = shapes or {}
    chapters = chapters or {}
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 9.6)
    ax.axis("off")
    geom = {}
    for key, (label, x, y, colour) in _BOXES.items():
        w = _W.get(key, 3.0)
        h = _H + (0.9 if key == "unet" else 0.4 if key in ("refnet", "vae_dec") else 0.0)
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="black", lw=1))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)
        if key in chapters:
            ax.text(
                x + w / 2,
                y - 0.22,
                chapters[key],
                ha="center",
                va="top",
                fontsize=7.5,
                color="#444444",
                style="italic",
            )
        geom[key] = (x, y, w, h)

    def arrow(a, b, name, side_a="r", side_b="l", dy_label=0.15, style="-|>"):
        xa, ya, wa, ha = geom[a]
        xb, yb, wb, hb = geom[b]
        pa = {"r": (xa + wa, ya + ha / 2), "t": (xa + wa / 2, ya + ha), "b": (xa + wa / 2, ya)}[side_a]
        pb = {"l": (xb, yb + hb / 2), "t": (xb + wb / 2, yb + hb), "b": (xb + wb / 2, yb)}[side_b]
        ax.add_patch(FancyArrowPatch(pa, pb, arrowstyle=style, mutation_scale=12, lw=1.2, color="#333333"))
        if name in shapes:
            ax.text(
                (pa[0] + pb[0]) / 2,
                (pa[1] + pb[1]) / 2 + dy_label,
                shapes[name],
                ha="center",
                va="bottom",
                fontsize=7.5,
                color="#08306b",
                bbox=dict(fc="white", ec="none", alpha=0.8, pad=1),
            )

    arrow("ref", "vae_enc", "ref_image")
    arrow("ref", "clip", "clip_pixels")
    arrow("vae_enc", "refnet", "ref_latents")
    arrow("clip", "refnet", "clip_tokens", dy_label=0.3)
    arrow("clip", "unet", "clip_tokens_unet", side_a="b", side_b="t", dy_label=-0.1)
    arrow("refnet", "unet", "bank", side_a="b", side_b="t", dy_label=-0.1)
    arrow("noise", "unet", "latents")
    arrow("pose", "guider", "pose_video")
    arrow("guider", "unet", "pose_fea")
    arrow("unet", "vae_dec", "denoised")
    arrow("vae_dec", "out", "frames")
    fig.tight_layout()
    return fig
