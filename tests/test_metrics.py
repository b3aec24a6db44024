"""anim_lab.metrics against independent computations: numpy loops written here, and scikit-image's SSIM."""

import numpy as np
import pytest
import torch
from einops import rearrange
from skimage.metrics import structural_similarity

from anim_lab import metrics as M


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 20, 24, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    noisy = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    return noisy, target


def _luma_loop(img: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W), pixel by pixel."""
    out = np.zeros(img.shape[1:])
    for i in range(img.shape[1]):
        for j in range(img.shape[2]):
            out[i, j] = 0.299 * img[0, i, j] + 0.587 * img[1, i, j] + 0.114 * img[2, i, j]
    return out


def _laplacian_variance_loop(img: np.ndarray) -> float:
    """Four neighbours minus four times the centre, at every interior pixel; population variance."""
    y = _luma_loop(img)
    h, w = y.shape
    vals = [
        y[i - 1, j] + y[i + 1, j] + y[i, j - 1] + y[i, j + 1] - 4 * y[i, j]
        for i in range(1, h - 1)
        for j in range(1, w - 1)
    ]
    vals = np.array(vals)
    return float(((vals - vals.mean()) ** 2).mean())


def test_psnr_matches_the_formula_in_8_bit_levels(pair):
    x, y = pair
    levels_x, levels_y = (x.double().numpy() + 1) * 127.5, (y.double().numpy() + 1) * 127.5
    mse = ((levels_x - levels_y) ** 2).reshape(3, -1).mean(1)
    expected = 10 * np.log10(255.0**2 / mse)
    np.testing.assert_allclose(M.psnr(x, y).numpy(), expected, rtol=1e-5)
    # a constant offset of 0.1 on [-1, 1] (peak-to-peak 2): MSE 0.01, PSNR 10 log10(4 / 0.01)
    assert M.psnr(y + 0.1, y) == pytest.approx(torch.full((3,), 10 * np.log10(400.0)), rel=1e-5)


def test_luminance_and_laplacian_variance_match_loops(pair):
    x, _ = pair
    np.testing.assert_allclose(M.luminance(x.double())[1, 0].numpy(), _luma_loop(x[1].double().numpy()))
    expected = [_laplacian_variance_loop(img) for img in x.double().numpy()]
    np.testing.assert_allclose(M.laplacian_variance(x).numpy(), expected, rtol=1e-10)


def test_sharpness_ratio_is_the_mean_of_per_frame_ratios(pair):
    x, y = pair
    per_frame = [
        _laplacian_variance_loop(a) / _laplacian_variance_loop(b)
        for a, b in zip(x.numpy(), y.numpy(), strict=True)
    ]
    assert M.sharpness_ratio(x, y) == pytest.approx(float(np.mean(per_frame)), rel=1e-6)
    # the Laplacian is linear and the variance quadratic: half the contrast gives a quarter of the ratio,
    # and a constant colour shift changes nothing
    assert M.sharpness_ratio(0.5 * y, y) == pytest.approx(0.25, rel=1e-6)
    assert M.sharpness_ratio(y + 0.3, y) == pytest.approx(1.0, rel=1e-6)


def test_blur_lowers_the_sharpness_ratio(pair):
    _, y = pair
    blurred = torch.nn.functional.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
    ratio = M.sharpness_ratio(blurred, y)
    assert 0.0 < ratio < 0.3
    assert M.psnr(blurred, y).mean() > 0  # finite


def test_flat_ground_truth_is_refused():
    flat = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="flat"):
        M.sharpness_ratio(torch.rand(1, 3, 8, 8), flat)


def test_ssim_matches_scikit_image_on_8_bit_pictures(pair):
    x, y = pair
    to_u8 = lambda t: ((t.double().numpy() + 1) * 127.5).round().astype(np.uint8)  # noqa: E731
    u8x, u8y = to_u8(x), to_u8(y)  # (B, 3, H, W) uint8
    expected = [
        structural_similarity(
            a,
            b,
            data_range=255,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(u8x, u8y, strict=True)
    ]
    back = lambda u: torch.from_numpy(u).double() / 127.5 - 1  # noqa: E731
    np.testing.assert_allclose(M.ssim(back(u8x), back(u8y)).numpy(), expected, rtol=1e-5)
    assert M.ssim(y, y) == pytest.approx(torch.ones(3))
    # SSIM is not shift-invariant: scikit-image on the [-1, 1] values themselves gives another number
    shifted = structural_similarity(
        x[0].double().numpy(), y[0].double().numpy(), data_range=2.0, channel_axis=0, gaussian_weights=True
    )
    assert abs(shifted - M.ssim(x[:1], y[:1]).item()) > 0.01


def test_colour_error_in_levels():
    y = torch.zeros(2, 3, 6, 6)
    x = y.clone()
    x[0, 1] += 4 / 127.5  # frame 0: green 4 levels brighter
    x[1, 2, :3] -= 2 / 127.5  # frame 1: half of blue 2 levels darker -> mean 1 level
    np.testing.assert_allclose(M.colour_error(x, y).numpy(), [4.0, 1.0], rtol=1e-5)


def test_videos_are_scored_frame_by_frame(pair):
    x, y = pair
    vx = rearrange(x, "(b f) c h w -> b c f h w", b=1)  # (3, 3, H, W) -> (1, 3, 3, H, W)
    vy = rearrange(y, "(b f) c h w -> b c f h w", b=1)
    for fn in (M.psnr, M.ssim, M.colour_error, M.sharpness_ratios):
        torch.testing.assert_close(fn(vx, vy), fn(x, y))
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr(x, y[:, :, :-1])


# --- over time and identity ------------------------------------------------------------------------------
def _u8_videos(seed: int, frames: int = 6):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, (frames, 8, 10, 3), dtype=np.uint8)
    video = np.clip(truth.astype(int) + rng.integers(-40, 41, truth.shape), 0, 255).astype(np.uint8)
    return video, truth


def _jump(v: np.ndarray, s: int) -> float:
    """Mean |frame s - frame s-1| of uint8 frames, in [0, 1] units, by numpy."""
    return float(np.abs(v[s].astype(np.float64) - v[s - 1].astype(np.float64)).mean() / 255)


def test_video_from_uint8_layout():
    video, _ = _u8_videos(0)
    x = M.video_from_uint8(video)
    assert x.shape == (1, 3, 6, 8, 10)
    np.testing.assert_allclose(x[0, 1, 2].numpy(), video[2, :, :, 1] / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 frames"):
        M.video_from_uint8(video.astype(np.float32))


def test_flicker_and_seam_error_match_frame_loops():
    video, truth = _u8_videos(1, frames=9)
    x, y = M.video_from_uint8(video), M.video_from_uint8(truth)
    expected = np.mean([_jump(video, s) for s in range(1, 9)]) - np.mean(
        [_jump(truth, s) for s in range(1, 9)]
    )
    assert M.flicker(x, y).item() == pytest.approx(expected, abs=1e-6)
    windows = [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 0]]  # the last wraps around to frame 0
    assert M.seam_frames(windows) == [3, 6]  # frame 0 ends a wrapped window but begins the video
    seams = [3, 6]
    expected = np.mean([_jump(video, s) - _jump(truth, s) for s in seams])
    assert M.seam_error(x, y, windows).item() == pytest.approx(expected, abs=1e-6)
    assert M.seam_error(x, y, [list(range(9))]).item() == 0.0
    assert M.flicker(y, y).item() == 0.0


def test_identity_top1_matches_a_nearest_neighbour_loop():
    g = torch.Generator().manual_seed(3)
    gallery = torch.randn(5, 16, generator=g)
    queries = gallery[[0, 1, 2, 3]] + 1.2 * torch.randn(4, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    hits = []
    for q, label in zip(queries, labels, strict=True):
        cos = [float(q @ r / (q.norm() * r.norm())) for r in gallery]
        hits.append(int(np.argmax(cos)) == int(label))
    assert M.identity_top1(queries, gallery) == pytest.approx(np.mean(hits))
    # several queries per identity, labelled
    many = torch.cat([gallery * 3.0, gallery])  # scaled copies: cosine-nearest to themselves
    assert M.identity_top1(many, gallery, torch.arange(5).repeat(2)) == 1.0
    # two gallery rows of one identity: the nearest of either counts as a hit
    other_view = gallery[:1] + 0.3 * torch.randn(1, 16, generator=g)  # identity 0 seen again
    twins = torch.cat([gallery, other_view])  # row 5 is identity 0 again, and the query's nearest
    assert M.identity_top1(other_view, twins, [0], [0, 1, 2, 3, 4, 0]) == 1.0
    assert M.identity_top1(other_view, twins) == 0.0  # without gallery labels row 5 is another identity
    with pytest.raises(ValueError, match="labels"):
        M.identity_top1(queries, gallery, torch.tensor([0, 1, 2]))


# --- face-region colour and KID ----------------------------------------------------------------------------
def test_colour_error_inside_a_mask_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 3, 10, 12, generator=g) * 2 - 1, torch.rand(2, 3, 10, 12, generator=g) * 2 - 1
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:6, 3:9], masks[1, 5:, :4] = True, True
    for i in range(2):
        inside = masks[i].numpy()
        a, b = x[i].numpy()[:, inside], y[i].numpy()[:, inside]  # (3, n)
        expected = np.abs(a.mean(1) - b.mean(1)).max() * 127.5
        assert M.colour_error(x, y, masks)[i].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        M.colour_error(x, y, torch.zeros(2, 10, 12, dtype=torch.bool))


def test_face_mask_is_the_filled_face_oval():
    from anim_lab import landmarks as L
    from anim_lab import toy

    image, points = toy.render(toy.identity_from_seed(3), toy.HeadPose(yaw=10), toy.Expression(), size=128)
    mask = L.face_mask(points, 128)
    assert mask.shape == (128, 128) and 0.1 < mask.mean() < 0.6
    oval = points[list(L.FACE_OVAL[:-1])]  # (36, 2)
    centre = np.round(oval.mean(0)).astype(int)
    assert mask[centre[1], centre[0]] and not mask[0, 0]  # the nose is inside, a corner is not
    from matplotlib.path import Path as Polygon

    ys, xs = np.mgrid[:128, :128]
    inside = Polygon(oval).contains_points(np.stack([xs.ravel(), ys.ravel()], 1)).reshape(128, 128)
    assert (mask != inside).mean() < 0.03  # the same region up to the rasterised border


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    torch.manual_seed(0)
    project = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16)).double().eval()
    real = torch.rand(40, 3, 8, 8, dtype=torch.float64)
    fake = real * 0.3  # darker pictures: another distribution

    class Features(torch.nn.Module):
        def forward(self, images):
            return project(images)

    metric = KernelInceptionDistance(feature=Features(), subsets=1, subset_size=40, normalize=True)  # noqa: E501
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs, _ = metric.compute()
    with torch.no_grad():
        ours, spread = M.kid(project(real), project(fake))  # one subset: every row, no sampling
    assert ours == pytest.approx(theirs.item(), rel=1e-6) and spread == 0.0
    with torch.no_grad():
        same, _ = M.kid(project(real[:20]), project(real[20:]))
    assert abs(same) < ours  # two halves of one set are closer than real vs fake
    mean, std = M.kid(project(real).detach(), project(fake).detach(), subset_size=10, subsets=50)
    assert std > 0 and abs(mean - ours) < 4 * std


def test_video_psnr_is_one_mse_per_clip():
    g = torch.Generator().manual_seed(6)
    truth = torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1
    video = truth + torch.randn(truth.shape, generator=g) * torch.tensor([0.01, 0.1, 0.2, 0.4]).view(
        1, 1, 4, 1, 1
    )
    mse = ((video.double() - truth.double()) ** 2).flatten(1).mean(1)
    np.testing.assert_allclose(M.video_psnr(video, truth).numpy(), 10 * np.log10(4 / mse.numpy()), rtol=1e-5)
    assert (
        M.video_psnr(video, truth) < M.psnr(video, truth).view(2, 4).mean(1)
    ).all()  # errors differ by frame
