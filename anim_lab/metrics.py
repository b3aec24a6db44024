"""Evaluation metrics: the one home for every number the project reports about pictures.

Images are ``(B, 3, H, W)`` in [-1, 1] and videos ``(B, 3, F, H, W)``; a video is scored as its ``B*F``
frames. Every function takes a reconstruction (or generation) first and the ground truth second.

- :func:`psnr`: ``10 log10(peak^2 / MSE)`` per frame, with peak-to-peak 2 for [-1, 1]. PSNR rewards blur
  (the mean of the plausible pictures has the least squared error), so report a sharpness beside it.
- :func:`sharpness_ratio`: the variance of the Laplacian of the luminance (a standard focus measure),
  reconstruction / ground truth, per frame, then averaged. 1 means as much fine detail (edges, texture,
  grain) as the ground truth; a blurry autoencoder scores well below 1 and a noisy one above.
- :func:`ssim`: the structural similarity of Wang et al. (2004) with their Gaussian window (11 taps, sigma
  1.5), K1 = 0.01, K2 = 0.03, on each RGB channel of the pictures in [0, 1] (SSIM is not shift-invariant:
  on [-1, 1] values it would be another number), averaged over the valid part of the map and the channels.
- :func:`colour_error`: how far the mean colour drifts, in 8-bit levels (the largest channel error of the
  per-frame mean colour, over the frame or inside a mask such as the face oval), averaged over frames.
- :func:`kid`: the kernel inception distance between two sets of pictures, on an image encoder's
  features: how far the generated pictures are, as a distribution, from real ones (blur and wrong colours
  both raise it).

Over time (videos ``(B, 3, F, H, W)``, in [0, 1] units of the picture's range):

- :func:`flicker`: the mean absolute change from one frame to the next, minus the ground truth's: how much
  more the video jitters than the motion it should show.
- :func:`seam_error`: the same change only at the frames where a new context window begins, minus the ground
  truth's: the jump that sampling in windows adds.

Identity (on embeddings, from any image encoder):

- :func:`identity_top1`: the share of generated frames whose most similar (cosine) ground-truth picture in a
  gallery of identities is their own.

Lip sync on 3D face meshes (``(F, V, 3)``, mediapipe's point order; prediction first, ground truth second):

- :func:`lip_vertex_error`: FaceFormer's LVE. Per frame, the largest error over the lip vertices
  (:func:`lip_vertices`, the 40 points of mediapipe's lip contours), then the mean over frames. As in the
  evaluation code of FaceFormer and CodeTalker (and torchmetrics' ``lip_vertex_error``), the per-vertex error
  is the *squared* L2 distance (``squared=False`` gives the distance itself), in the mesh's units squared.
- :func:`mouth_opening`: the inner-lip gap (points 13-14) over the face height (points 10-152), per frame.
- :func:`mouth_opening_correlation`: the Pearson correlation of two mouth-opening tracks (NaN when one of
  them never moves, as the mean face's).
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch.nn import functional as F

from .errors import InputError
from .vae import images_from_uint8

__all__ = [
    "BT601_WEIGHTS",
    "LAPLACIAN_3X3",
    "frames_of",
    "psnr",
    "video_psnr",
    "luminance",
    "laplacian_variance",
    "sharpness_ratios",
    "sharpness_ratio",
    "gaussian_window",
    "ssim",
    "colour_error",
    "kid_subset",
    "kid",
    "video_from_uint8",
    "frame_changes",
    "flicker",
    "seam_frames",
    "seam_error",
    "identity_top1",
    "lip_vertices",
    "lip_vertex_error",
    "mouth_opening",
    "mouth_opening_correlation",
]

# ITU-R BT.601 luma: Y = 0.299 R + 0.587 G + 0.114 B
BT601_WEIGHTS = (0.299, 0.587, 0.114)

# the 4-neighbour discrete Laplacian d2/dx2 + d2/dy2
LAPLACIAN_3X3 = (
    (0.0, 1.0, 0.0),
    (1.0, -4.0, 1.0),
    (0.0, 1.0, 0.0),
)


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) pass through; videos (B, 3, F, H, W) -> frames (B*F, 3, H, W)."""
    if x.ndim == 5:
        return rearrange(x, "b c f h w -> (b f) c h w")  # (B, 3, F, H, W) -> (B*F, 3, H, W)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"expected images (B, 3, H, W) or videos (B, 3, F, H, W), got {tuple(x.shape)}")
    return x


def _pair(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape != targets.shape:
        raise InputError(f"shapes differ: {tuple(images.shape)} vs {tuple(targets.shape)}")
    return frames_of(images).double(), frames_of(targets).double()  # float64: exact enough for any size


def psnr(images: torch.Tensor, targets: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-frame PSNR in dB: (B, 3, H, W) or (B, 3, F, H, W) -> (B,) or (B*F,) float32.

    ``data_range`` is the peak-to-peak range of the pixels (2 for [-1, 1], 255 for 8-bit levels)."""
    x, y = _pair(images, targets)
    mse = (x - y).pow(2).flatten(1).mean(1)  # (N,)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))).float()


def video_psnr(videos: torch.Tensor, targets: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-video PSNR in dB, one mean squared error over the whole clip: (B, 3, F, H, W) -> (B,) float32.
    (:func:`psnr` of a video is per frame; the two differ when the error varies from frame to frame.)"""
    if videos.ndim != 5:
        raise InputError(
            f"videos must be (B, 3, F, H, W), got shape {tuple(videos.shape)}; for images use psnr"
        )
    flat = lambda v: rearrange(v, "b c f h w -> b c (f h) w")  # noqa: E731  one tall picture per clip
    return psnr(flat(videos), flat(targets), data_range)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of frames in [-1, 1], itself in [-1, 1]: (N, 3, H, W) -> (N, 1, H, W)."""
    w = torch.tensor(BT601_WEIGHTS, dtype=images.dtype, device=images.device)
    return torch.einsum("nchw,c->nhw", images, w)[:, None]  # (N, 3, H, W) -> (N, 1, H, W)


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Variance of the 3x3 Laplacian of the luminance over the valid (unpadded) pixels of each frame:
    (B, 3, H, W) or (B, 3, F, H, W) -> (N,) float64, N frames."""
    x = frames_of(images).double()
    y = luminance(x)  # (N, 1, H, W)
    k = torch.tensor(LAPLACIAN_3X3, dtype=y.dtype, device=y.device)[None, None]  # (1, 1, 3, 3)
    lap = F.conv2d(y, k)  # (N, 1, H-2, W-2); the kernel is symmetric, so correlation = convolution
    return lap.flatten(1).var(1, unbiased=False)  # (N,)


def sharpness_ratios(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-frame Laplacian-variance ratio, reconstruction / ground truth: -> (N,) float32."""
    if images.shape != targets.shape:
        raise InputError(f"shapes differ: {tuple(images.shape)} vs {tuple(targets.shape)}")
    ref = laplacian_variance(targets)  # (N,)
    if (ref <= 0).any():
        raise InputError("a ground-truth frame is flat (its Laplacian has zero variance): no ratio exists")
    return (laplacian_variance(images) / ref).float()


def sharpness_ratio(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over frames of var(Laplacian(luma(reconstruction))) / var(Laplacian(luma(ground truth)))."""
    return float(sharpness_ratios(images, targets).mean())


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """The normalised 1D Gaussian (size,), sampled at integer offsets from the centre."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    images: torch.Tensor,
    targets: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-frame SSIM: (B, 3, H, W) or (B, 3, F, H, W) -> (N,) float32.

    Local statistics under a Gaussian window (separable, no padding), population (co)variances:
    ``SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))`` with
    ``C_i = k_i^2``; the map is averaged over valid positions and the 3 channels.

    SSIM is defined on intensities that start at 0 (its luminance term compares means, and is not the same
    after a shift), so the [-1, 1] frames are mapped to [0, 1] first: the value is that of the 8-bit
    pictures, as scikit-image and torchmetrics compute it on them."""
    x, y = _pair(images, targets)
    x, y = (x + 1) / 2, (y + 1) / 2  # [-1, 1] -> [0, 1], peak-to-peak 1
    n, c, h, w = x.shape
    if h < window or w < window:
        raise InputError(f"frames {h}x{w} are smaller than the SSIM window {window}")
    g = gaussian_window(window, sigma).to(x.device)
    gy, gx = g.view(1, 1, window, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, window).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H-win+1, W-win+1), per channel
        return F.conv2d(F.conv2d(t, gy, groups=c), gx, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2  # (k_i * data_range)^2 with data_range 1
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()  # (N, C, h', w') -> (N,)


def colour_error(
    images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-frame colour drift in 8-bit levels: max over RGB of |mean(reconstruction) - mean(ground truth)|,
    each mean over the frame's pixels, or over the pixels of ``masks`` (N, H, W) bool, one per frame (e.g. the
    face oval of the ground truth's landmarks, :func:`anim_lab.landmarks.face_mask`); (B, 3, H, W) or
    (B, 3, F, H, W) in [-1, 1] -> (N,) float32."""
    x, y = _pair(images, targets)
    if masks is None:
        diff = (x.mean((2, 3)) - y.mean((2, 3))).abs()  # (N, 3)
    else:
        m = torch.as_tensor(masks, device=x.device)
        if m.shape != (x.shape[0], *x.shape[2:]) or m.dtype != torch.bool:
            raise InputError(f"masks must be bool (N={x.shape[0]}, H, W), got {m.dtype} {tuple(m.shape)}")
        if not m.flatten(1).any(1).all():
            raise InputError("a mask is empty: there is no region to compare")
        w = m[:, None].double()  # (N, 1, H, W)
        mean = lambda t: (t * w).sum((2, 3)) / w.sum((2, 3))  # noqa: E731  (N, 3) mean inside the mask
        diff = (mean(x) - mean(y)).abs()
    return (diff * 127.5).amax(1).float()  # [-1, 1] -> levels


# --- distributions ------------------------------------------------------------------------------------------
def kid_subset(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The unbiased estimate of the squared MMD between two feature sets, real (m, D) and fake (m, D), with
    the polynomial kernel k(x, y) = (x . y / D + 1)^3 of Binkowski et al. (2018): the kernel inception
    distance of one subset."""
    x, y = real.double(), fake.double()
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise InputError(
            f"KID needs two feature sets of one shape (m >= 2, D), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda kk: (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))  # noqa: E731  mean over i != j
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    subset_size: int | None = None,
    subsets: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel inception distance between features of real (N, D) and generated (M, D) pictures: the mean and
    standard deviation over ``subsets`` random subsets of ``subset_size`` rows each (drawn without
    replacement within a subset, as torchmetrics does) of :func:`kid_subset`. With ``subset_size=None`` one
    subset of all rows (N = M). Lower is closer; 0 in expectation for one distribution. The features are any
    image encoder's (anim_lab uses the frozen toy image encoder, which needs no download)."""
    n, m = len(real), len(fake)
    if subset_size is None:
        if n != m:
            raise InputError(f"without subset_size the two sets must be equally large, got {n} and {m}")
        value = kid_subset(real, fake).item()
        return value, 0.0
    if not 2 <= subset_size <= min(n, m):
        raise InputError(
            f"subset_size must be between 2 and the smaller set's {min(n, m)} rows, got {subset_size}"
        )
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(n, generator=generator)[:subset_size]]
        f = fake[torch.randperm(m, generator=generator)[:subset_size]]
        values.append(kid_subset(r, f))
    values = torch.stack(values)
    return values.mean().item(), values.std(unbiased=False).item()


# --- over time --------------------------------------------------------------------------------------------
def video_from_uint8(frames) -> torch.Tensor:
    """One video as uint8 frames (F, H, W, 3) (numpy or torch) -> (1, 3, F, H, W) float32 in [-1, 1]."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"a video as uint8 frames (F, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return rearrange(images_from_uint8(x), "f c h w -> 1 c f h w")  # the one [0, 255] -> [-1, 1] map


def _video_pair(videos: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if videos.ndim != 5 or videos.shape != targets.shape:
        raise InputError(
            f"videos and ground truth must be (B, 3, F, H, W) of one shape, got {tuple(videos.shape)} and "
            f"{tuple(targets.shape)}"
        )
    return videos.double(), targets.double()


def frame_changes(videos: torch.Tensor) -> torch.Tensor:
    """Mean |x[t] - x[t-1]| per video and step, in [0, 1] units: (B, 3, F, H, W) -> (B, F-1)."""
    x = videos.double()
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 3, 4)) / 2  # [-1, 1] range 2 -> [0, 1] units


def flicker(videos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per video: mean frame-to-frame change of the video minus that of the ground truth -> (B,) float32."""
    x, y = _video_pair(videos, targets)
    return (frame_changes(x).mean(1) - frame_changes(y).mean(1)).float()


def seam_frames(windows) -> list[int]:
    """The frames where sampling in ``windows`` (lists of frame indices, ``context.context_windows``) jumps
    to a new window: the first frame of every window after the first, and every frame whose predecessor in
    its window is not the frame before it (a window that wraps around)."""
    starts = {w[0] for w in windows[1:]}
    starts |= {w[i + 1] for w in windows for i in range(len(w) - 1) if w[i + 1] != w[i] + 1}
    return sorted(s for s in starts if s > 0)


def seam_error(videos: torch.Tensor, targets: torch.Tensor, windows) -> torch.Tensor:
    """Per video: the mean change into each seam frame (:func:`seam_frames`) minus the ground truth's, in
    [0, 1] units -> (B,) float32; zero when there is no seam (one window)."""
    x, y = _video_pair(videos, targets)
    seams = seam_frames(windows)
    if not seams:
        return torch.zeros(x.shape[0])
    steps = torch.tensor(seams) - 1  # frame_changes[:, s - 1] is the change from frame s - 1 to frame s
    return (frame_changes(x)[:, steps] - frame_changes(y)[:, steps]).mean(1).float()


# --- identity ---------------------------------------------------------------------------------------------
def identity_top1(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    labels: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
) -> float:
    """Share of ``queries`` (n, D) whose most cosine-similar row of ``gallery`` (N, D) shows their own
    identity: ``labels`` (n,) names each query's identity and ``gallery_labels`` (N,) each gallery row's
    (default: query i is identity i, gallery row j is identity j). Chance is about 1 / (identities in the
    gallery)."""
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputError(
            "queries (n, D) and gallery (N, D) embeddings of one width, got "
            f"{tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    labels = torch.arange(len(queries)) if labels is None else torch.as_tensor(labels)
    gallery_labels = torch.arange(len(gallery)) if gallery_labels is None else torch.as_tensor(gallery_labels)
    if labels.shape != (len(queries),) or gallery_labels.shape != (len(gallery),):
        raise InputError(
            f"labels must be (n={len(queries)},) and gallery_labels (N={len(gallery)},), got "
            f"{tuple(labels.shape)} and {tuple(gallery_labels.shape)}"
        )
    sim = F.normalize(queries.double(), dim=-1) @ F.normalize(gallery.double(), dim=-1).T  # (n, N)
    return float((gallery_labels[sim.argmax(1)] == labels).double().mean())


# --- lip sync on 3D meshes ----------------------------------------------------------------------------------
def lip_vertices() -> tuple[int, ...]:
    """The 40 mediapipe face-mesh points on the lip contours (outer and inner, upper and lower), sorted."""
    from .landmarks import LIPS_INNER_LOWER, LIPS_INNER_UPPER, LIPS_OUTER_LOWER, LIPS_OUTER_UPPER

    return tuple(sorted(set(LIPS_OUTER_UPPER + LIPS_OUTER_LOWER + LIPS_INNER_UPPER + LIPS_INNER_LOWER)))


def _as_double(x) -> torch.Tensor:
    return x.double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.float64))


def _meshes(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_double(pred), _as_double(target)
    if x.shape != y.shape or x.ndim != 3 or x.shape[-1] != 3:
        raise InputError(f"meshes must be (F, V, 3) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def lip_vertex_error(pred, target, lip_indices=None, *, squared: bool = True) -> float:
    """FaceFormer's lip vertex error of ``(F, V, 3)`` meshes: per frame the largest (squared, by default)
    L2 error over ``lip_indices`` (default :func:`lip_vertices`), then the mean over the F frames."""
    x, y = _meshes(pred, target)
    index = torch.as_tensor(lip_vertices() if lip_indices is None else lip_indices)
    error = (x[:, index] - y[:, index]).pow(2).sum(-1)  # (F, L) squared distances
    if not squared:
        error = error.sqrt()
    return float(error.max(1).values.mean())


def mouth_opening(vertices) -> torch.Tensor:
    """``(F, V, 3)`` -> ``(F,)`` float64: the inner-lip gap (13-14) over the face height (10-152)."""
    v = _as_double(vertices)
    if v.ndim != 3 or v.shape[1] < 153 or v.shape[2] != 3:
        raise InputError(f"vertices must be (F, V ≥ 153, 3) in mediapipe's order, got {tuple(v.shape)}")
    return (v[:, 13] - v[:, 14]).norm(dim=-1) / (v[:, 10] - v[:, 152]).norm(dim=-1)


def mouth_opening_correlation(pred, target) -> float:
    """Pearson correlation of the mouth openings of two ``(F, V, 3)`` mesh sequences; NaN when either
    opening is constant (a correlation is then undefined)."""
    a, b = mouth_opening(pred), mouth_opening(target)
    if len(a) != len(b) or len(a) < 2:
        raise InputError(f"two tracks of one length ≥ 2 are needed, got {len(a)} and {len(b)} frames")
    a, b = a - a.mean(), b - b.mean()
    norm = a.norm() * b.norm()
    return float((a * b).sum() / norm) if norm > 0 else float("nan")
