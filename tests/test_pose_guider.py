"""Pose guiders: AnimateAnyone's single-scale guider, AniPortrait's multi-scale guider (checked against a
plain implementation written here from the released architecture), the input range, Hallo's face locator,
strict loading of the official checkpoint layouts, and the zero-init property through the denoising UNet."""

import math

import cv2
import numpy as np
import pytest
import skimage
import torch
from keylists import CHECKPOINT_KEYS, read_key_list
from torch.nn import functional as F

from anim_lab.configs import (
    FACE_LOCATOR_SD15,
    POSE_GUIDER_MULTISCALE_SD15,
    POSE_GUIDER_MULTISCALE_TINY,
    SD15,
    TINY,
)
from anim_lab.inspect import build, count_parameters
from anim_lab.landmarks import FACE_OVAL, FaceLandmarker
from anim_lab.motion import MOTION_TINY
from anim_lab.plain import randomize
from anim_lab.pose_guider import (
    PoseGuider,
    PoseGuiderMultiScale,
    face_region_bbox,
    face_region_mask,
    prepare_pose_images,
)
from anim_lab.unet import VideoUNet
from anim_lab.weights import (
    KeyMismatchError,
    load_official_pose_guider,
    load_official_pose_guider_multiscale,
)

MS_TINY = POSE_GUIDER_MULTISCALE_TINY


def escape(text: str) -> str:
    return "".join("\\" + c if c in "()[]." else c for c in text)


# --- AnimateAnyone's single-scale guider ------------------------------------------------------------------
def test_keys_and_shapes_equal_the_official_checkpoint():
    official = read_key_list(CHECKPOINT_KEYS / "aa" / "pose_guider.txt")
    ours = {k: tuple(v.shape) for k, v in build(SD15, "pose_guider").state_dict().items()}
    assert ours == official
    assert count_parameters(build(SD15, "pose_guider")) == sum(
        torch.Size(s).numel() for s in official.values()
    )


def test_zero_init_and_shapes():
    g = PoseGuider(**TINY.pose_guider)
    pose = torch.rand(2, 3, 5, 64, 48)
    out = g(pose)
    assert out.shape == (2, TINY.pose_guider["conditioning_embedding_channels"], 5, 8, 6)
    assert torch.count_nonzero(out) == 0  # an untrained guider leaves the UNet as it was


def test_per_frame_equals_a_slow_loop_of_plain_convolutions():
    g = PoseGuider(**TINY.pose_guider)
    torch.nn.init.normal_(g.conv_out.weight, std=0.1)
    pose = torch.rand(2, 3, 3, 32, 32)
    out = g(pose)
    for b in range(2):
        for f in range(3):
            x = F.silu(F.conv2d(pose[b, :, f][None], g.conv_in.weight, g.conv_in.bias, padding=1))
            for i, conv in enumerate(g.blocks):
                x = F.silu(F.conv2d(x, conv.weight, conv.bias, stride=1 + i % 2, padding=1))
            x = F.conv2d(x, g.conv_out.weight, g.conv_out.bias, padding=1)
            torch.testing.assert_close(out[b, :, f], x[0], rtol=1e-5, atol=1e-6)
    # a single image (B, 3, H, W) gives the frame's features
    torch.testing.assert_close(g(pose[:, :, 1]), out[:, :, 1])


# --- AniPortrait's multi-scale guider: keys, sizes ----------------------------------------------------------
def test_multiscale_keys_shapes_and_size_equal_the_official_checkpoint():
    official = read_key_list(CHECKPOINT_KEYS / "ap" / "pose_guider.txt")
    with torch.device("meta"):
        g = PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_SD15)
    ours = {k: tuple(v.shape) for k, v in g.state_dict().items()}
    assert len(ours) == 184 and ours == official  # BatchNorm buffers included
    assert count_parameters(g) == sum(
        torch.Size(s).numel() for k, s in official.items() if "running" not in k and "num_batches" not in k
    )
    assert round(count_parameters(g) / 1e6, 1) == 167.5
    fea = g(torch.empty(1, 3, 2, 512, 512, device="meta"))
    assert [tuple(f.shape) for f in fea] == [
        (1, 320, 2, 64, 64),
        (1, 320, 2, 32, 32),
        (1, 640, 2, 16, 16),
        (1, 1280, 2, 8, 8),
        (1, 1280, 2, 8, 8),
    ]


def test_the_released_blocks_have_no_cross_attention():
    with torch.device("meta"):
        g = PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_SD15)
        ext = PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_SD15, reference_attention=True)
    for k in range(1, 5):
        block = getattr(g, f"cross_attn{k}").transformer_blocks[0]
        assert block.attn2 is None and block.attn1.heads == 16 and block.attn1.inner_dim == 1408
    new = sorted(set(ext.state_dict()) - set(g.state_dict()))
    assert len(new) == 28 and all(".attn2." in k or ".norm2." in k for k in new)  # 7 keys x 4 blocks
    assert set(g.state_dict()) < set(ext.state_dict())


# --- a plain implementation of the released architecture ---------------------------------------------------
TRUNK = [(0, 1), (3, 2), (6, 1), (9, 2), (12, 1), (15, 2), (18, 1), (21, 1)]  # (conv index, stride)
LEVELS = {1: [(0, 1), (3, 2)], 2: [(0, 1), (3, 2)], 3: [(0, 1), (3, 2)], 4: [(0, 1)]}


def plain_bn(p, name, x, training, momentum=0.1, eps=1e-5):
    """BatchNorm2d by hand; in training mode it also updates the running statistics in ``p``."""
    if training:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() / x.shape[1]
        p[f"{name}.running_mean"] = (1 - momentum) * p[f"{name}.running_mean"] + momentum * mean
        p[f"{name}.running_var"] = (1 - momentum) * p[f"{name}.running_var"] + momentum * var * n / (n - 1)
        p[f"{name}.num_batches_tracked"] = p[f"{name}.num_batches_tracked"] + 1
    else:
        mean, var = p[f"{name}.running_mean"], p[f"{name}.running_var"]
    x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps)
    return x * p[f"{name}.weight"][:, None, None] + p[f"{name}.bias"][:, None, None]


def plain_convs(p, prefix, layers, x, training):
    for i, stride in layers:
        x = F.conv2d(x, p[f"{prefix}.{i}.weight"], p[f"{prefix}.{i}.bias"], stride=stride, padding=1)
        x = torch.relu(plain_bn(p, f"{prefix}.{i + 1}", x, training))
    return x


def plain_attention(p, name, x, context, heads):
    """(N, L, D) queries, (N, M, D) context -> (N, L, D): softmax(q k^T / sqrt(d)) v, heads split, to_out."""
    q, k, v = (t @ p[f"{name}.to_{w}.weight"].T for t, w in ((x, "q"), (context, "k"), (context, "v")))
    n, length, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(n, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (N, heads, L, d)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    a = a.transpose(1, 2).reshape(n, length, inner)
    return a @ p[f"{name}.to_out.0.weight"].T + p[f"{name}.to_out.0.bias"]


def plain_transformer(p, prefix, x, groups, heads, context=None):
    """GroupNorm(eps 1e-6) -> 1x1 proj_in -> [self-attn, (cross-attn), GEGLU FF] -> 1x1 proj_out -> + x."""
    n, c, h, w = x.shape
    y = F.group_norm(x, groups, p[f"{prefix}.norm.weight"], p[f"{prefix}.norm.bias"], eps=1e-6)
    y = F.conv2d(y, p[f"{prefix}.proj_in.weight"], p[f"{prefix}.proj_in.bias"])
    inner = y.shape[1]
    t = y.flatten(2).transpose(1, 2)  # (N, h*w, inner)
    blk = f"{prefix}.transformer_blocks.0"

    def ln(t, name):
        return F.layer_norm(t, (inner,), p[f"{blk}.{name}.weight"], p[f"{blk}.{name}.bias"], eps=1e-5)

    z = ln(t, "norm1")
    t = t + plain_attention(p, f"{blk}.attn1", z, z, heads)
    if context is not None:
        t = t + plain_attention(p, f"{blk}.attn2", ln(t, "norm2"), context, heads)
    hidden, gate = (
        ln(t, "norm3") @ p[f"{blk}.ff.net.0.proj.weight"].T + p[f"{blk}.ff.net.0.proj.bias"]
    ).chunk(2, -1)
    t = t + (hidden * F.gelu(gate)) @ p[f"{blk}.ff.net.2.weight"].T + p[f"{blk}.ff.net.2.bias"]
    y = t.transpose(1, 2).reshape(n, inner, h, w)
    return F.conv2d(y, p[f"{prefix}.proj_out.weight"], p[f"{prefix}.proj_out.bias"]) + x


def plain_multiscale(p, pose, ref_pose=None, *, training=False, cross=False, cfg=MS_TINY):
    """AniPortrait's guider on one video (3, F, H, W) in its network range, frames as the batch, written from
    the released architecture: the target pose first, then the reference pose through every BatchNorm."""
    x = pose.transpose(0, 1)  # (3, F, H, W) -> (F, 3, H, W)
    x = F.conv2d(
        plain_convs(p, "conv_layers", TRUNK, x, training), p["final_proj.weight"], p["final_proj.bias"]
    )
    x = x * p["scale"]
    fea = [x]
    ref = None
    if ref_pose is not None:
        ref = plain_convs(p, "conv_layers", TRUNK, ref_pose[None], training)
        ref = F.conv2d(ref, p["final_proj.weight"], p["final_proj.bias"]) * p["scale"]
    for k, layers in LEVELS.items():
        x = plain_convs(p, f"conv_layers_{k}", layers, x, training)
        context = None
        if ref is not None:
            ref = plain_convs(p, f"conv_layers_{k}", layers, ref, training)
            if cross:  # the extension: every frame's tokens attend to the reference tokens of this level
                context = ref.flatten(2).transpose(1, 2).expand(x.shape[0], -1, -1)
        x = plain_transformer(
            p, f"cross_attn{k}", x, cfg["norm_num_groups"], cfg["num_attention_heads"], context
        )
        fea.append(x)
    return [f.transpose(0, 1) for f in fea]  # (F, C, h, w) -> (C, F, h, w)


@pytest.fixture(scope="module")
def guider():
    # seed 38: every level carries O(0.1) signal and a drawn line adds >= 100x more in the [-1, 509] range at
    # every level, with margin (most seeds give fea[0] ~0.05: eight ReLU convolutions at 1/fan_in variance)
    return randomize(PoseGuiderMultiScale(**MS_TINY), seed=38).double().eval()


def test_multiscale_equals_a_plain_implementation(guider):
    p = {k: v.clone() for k, v in guider.state_dict().items()}
    pose = torch.rand(2, 3, 3, 128, 64, dtype=torch.float64)
    fea = guider(pose)
    assert [tuple(f.shape) for f in fea] == [
        (2, 32, 3, 16, 8),
        (2, 32, 3, 8, 4),
        (2, 64, 3, 4, 2),
        (2, 64, 3, 2, 1),
        (2, 64, 3, 2, 1),
    ]
    assert all(f.abs().mean() > 0.1 for f in fea)  # nothing vacuous: every level carries signal
    for b in range(2):
        expected = plain_multiscale(p, pose[b] * 2 - 1)  # [0, 1] -> [-1, 1], AniPortrait's training range
        for ours, ref in zip(fea, expected, strict=True):
            torch.testing.assert_close(ours[b], ref, rtol=0, atol=1e-6)
    # a single image (B, 3, H, W) gives the features of that frame
    for image_fea, video_fea in zip(guider(pose[:, :, 1]), fea, strict=True):
        torch.testing.assert_close(image_fea, video_fea[:, :, 1], rtol=0, atol=1e-6)


def test_the_reference_pose_is_ignored_in_eval_mode(guider):
    pose = torch.rand(1, 3, 2, 64, 64, dtype=torch.float64)
    without = guider(pose)
    with_ref = guider(pose, torch.rand(1, 3, 64, 64, dtype=torch.float64))
    other_ref = guider(pose, torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    for a, b, c in zip(without, with_ref, other_ref, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_training_mode_moves_batchnorm_statistics_with_the_reference_pose_as_released():
    model = randomize(PoseGuiderMultiScale(**MS_TINY), seed=3).double().train()
    p = {k: v.clone() for k, v in model.state_dict().items()}
    pose = torch.rand(1, 3, 4, 128, 128, dtype=torch.float64)
    ref_pose = torch.rand(1, 3, 128, 128, dtype=torch.float64)  # one image: BN needs 2x2 at the deepest level
    fea = model(pose, ref_pose)
    expected = plain_multiscale(p, pose[0] * 2 - 1, ref_pose[0] * 2 - 1, training=True)
    for ours, ref in zip(fea, expected, strict=True):
        torch.testing.assert_close(ours[0], ref, rtol=0, atol=1e-6)
    after = model.state_dict()
    for name in p:
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(after[name], p[name], rtol=0, atol=1e-9)  # each BN: pose, then ref
    assert (after["conv_layers.1.num_batches_tracked"] == 9).item()  # 7 + target + reference
    # without the reference pose the statistics move once, to other values
    model.load_state_dict(
        {k: v for k, v in randomize(PoseGuiderMultiScale(**MS_TINY), seed=3).state_dict().items()}
    )
    model(pose)
    assert (model.state_dict()["conv_layers.1.num_batches_tracked"] == 8).item()


# --- the extension: a real cross-attention to the reference pose -------------------------------------------
def test_reference_attention_equals_a_plain_cross_attention():
    ext = randomize(PoseGuiderMultiScale(**MS_TINY, reference_attention=True), seed=5).double().eval()
    p = {k: v.clone() for k, v in ext.state_dict().items()}
    pose = torch.rand(2, 3, 2, 64, 128, dtype=torch.float64)
    ref_pose = torch.rand(2, 3, 64, 128, dtype=torch.float64)
    fea = ext(pose, ref_pose)
    for b in range(2):
        expected = plain_multiscale(p, pose[b] * 2 - 1, ref_pose[b] * 2 - 1, cross=True)
        for ours, ref in zip(fea, expected, strict=True):
            torch.testing.assert_close(ours[b], ref, rtol=0, atol=1e-6)
    # the reference pose now matters, at every level after fea[0]
    other = ext(pose, 1 - ref_pose)
    assert torch.equal(other[0], fea[0])
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(other[1:], fea[1:], strict=True))
    # one reference pose for the batch broadcasts
    one = ext(pose, ref_pose[:1])
    torch.testing.assert_close(one[3][0], fea[3][0], rtol=0, atol=1e-12)


def test_reference_attention_starts_as_the_released_guider_and_loads_its_checkpoint(guider):
    ext = PoseGuiderMultiScale(**MS_TINY, reference_attention=True).double().eval()
    ext.load_weights(guider.state_dict())  # 184-key layout: the extension's keys keep their zero output
    pose = torch.rand(1, 3, 2, 64, 64, dtype=torch.float64)
    for a, b in zip(ext(pose, torch.rand(1, 3, 64, 64, dtype=torch.float64)), guider(pose), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(
        KeyMismatchError, match=r"28 unexpected keys .*cross_attn1\.transformer_blocks\.0\.norm2"
    ):
        guider.load_weights(ext.state_dict())  # the released guider has no place for them


# --- the input range ----------------------------------------------------------------------------------------
def test_prepare_pose_images_and_the_faithful_range():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[:, 10, 5:40] = (10, 200, 10)
    x01 = prepare_pose_images(frames)
    xf = prepare_pose_images(frames, faithful=True)
    assert x01.shape == xf.shape == (1, 3, 2, 64, 64) and x01.dtype == torch.float32
    assert x01.min() == 0 and x01[0, 1, 0, 10, 5].item() == pytest.approx(200 / 255)
    assert xf.min() == -1 and xf[0, 1, 0, 10, 5].item() == 399  # 2 * 200 - 1: no division by 255
    assert prepare_pose_images(np.full((64, 64, 3), 255, np.uint8), faithful=True).max() == 509
    torch.testing.assert_close(prepare_pose_images(frames[0]), x01[:, :, :1])


def test_default_range_is_the_training_range(guider):
    """forward([0, 1]) is forward(2x - 1, faithful=True): the guider feeds its convolutions [-1, 1]."""
    pose = torch.rand(1, 3, 2, 64, 64, dtype=torch.float64)
    for a, b in zip(guider(pose), guider(pose * 2 - 1, faithful=True), strict=True):
        assert torch.equal(a, b)


def test_what_each_range_does_to_the_features(guider):
    """One drawn line, top-left. [-1, 509] multiplies every drawn pixel's deviation from black by 255: the
    first convolution's response to the line is exactly 255x larger; fea[0] is the same wherever the line is
    out of reach (the background is -1 in both ranges) and far larger near it; the deeper levels, behind
    global self-attention, change everywhere."""
    frame = np.zeros((128, 128, 3), np.uint8)
    cv2.line(frame, (8, 20), (40, 30), (10, 200, 180), 2)
    train = prepare_pose_images(frame).double() * 2 - 1  # AniPortrait's training range, [-1, 1]
    slip = prepare_pose_images(frame, faithful=True).double()  # its inference tensor, [-1, 509]
    black = -torch.ones_like(train)
    conv = guider.conv_layers[0]
    first = [conv(t[:, :, 0]) - conv(black[:, :, 0]) for t in (train, slip)]  # response to the line only
    torch.testing.assert_close(first[1], 255 * first[0], rtol=1e-6, atol=1e-6)  # float32 x / 255

    with torch.no_grad():
        fea_black, fea_train, fea_slip = (guider(x, faithful=True) for x in (black, train, slip))
    far = (slice(None), slice(None), slice(None), slice(10, None), slice(10, None))  # latent rows/cols >= 10
    assert torch.equal(fea_train[0][far], fea_slip[0][far])  # out of the trunk's reach: black is -1 in both
    assert torch.equal(fea_train[0][far], fea_black[0][far])
    for k in range(5):  # what the line adds to the features of a black frame: 100x more at every level
        added_train = (fea_train[k] - fea_black[k]).abs().mean()
        added_slip = (fea_slip[k] - fea_black[k]).abs().mean()
        assert added_slip > 100 * added_train
        if k > 0:  # behind global self-attention the line reaches every position
            assert (fea_train[k] - fea_slip[k]).abs().min() > 0


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, match",
    [((3, 64, 64), "(B, C, H, W)"), ((1, 1, 2, 64, 64), "3"), ((1, 3, 2, 60, 64), "multiples of 8")],
)
def test_bad_input(shape, match):
    with pytest.raises(ValueError, match=escape(match)):
        PoseGuider(**TINY.pose_guider)(torch.rand(shape))


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multiscale"])
def test_bad_pose_images_get_clear_errors(multi):
    model = PoseGuiderMultiScale(**MS_TINY) if multi else PoseGuider(**TINY.pose_guider)
    multiple = 64 if multi else 8
    with pytest.raises(ValueError, match=f"multiples of {multiple} .*got 96x{multiple * 3 // 2}"):
        model(torch.rand(1, 3, 2, 96, multiple * 3 // 2))
    for channels in (1, 4):
        with pytest.raises(ValueError, match=f"pose has {channels} channels, the guider expects 3"):
            model(torch.rand(1, channels, 2, 64, 64))
    with pytest.raises(TypeError, match=r"dtype torch\.uint8.*prepare_pose_images"):
        model(torch.randint(0, 255, (1, 3, 2, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\], found \[-1, 1\].*\(x \+ 1\) / 2"):
        minus_one_to_one = torch.rand(1, 3, 2, 64, 64) * 2 - 1
        minus_one_to_one[0, 0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
        model(minus_one_to_one)
    with pytest.raises(ValueError, match=r"\[0, 1\], found .*faithful=True"):
        model(torch.rand(1, 3, 2, 64, 64) * 509)


def test_bad_reference_poses_get_clear_errors():
    model = PoseGuiderMultiScale(**MS_TINY)
    pose = torch.rand(2, 3, 2, 64, 128)
    with pytest.raises(
        ValueError,
        match=escape(
            "ref_pose must be one pose image per video, (B or 1, 3, H, W) = (2 or 1, 3, 64, 128) like the "
            "target poses, got (2, 3, 64, 64)"
        ),
    ):
        model(pose, torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=escape("got (3, 3, 64, 128)")):
        model(pose, torch.rand(3, 3, 64, 128))
    with pytest.raises(ValueError, match=escape("got (2, 3, 2, 64, 128)")):
        model(pose, torch.rand(2, 3, 2, 64, 128))
    with pytest.raises(ValueError, match="ref_pose values must lie in"):
        model(pose, torch.rand(2, 3, 64, 128) + 1)
    with pytest.raises(ValueError, match="ref_pose has 1 channels"):
        model(pose, torch.rand(2, 1, 64, 128))
    ext = PoseGuiderMultiScale(**MS_TINY, reference_attention=True)
    with pytest.raises(
        ValueError, match="reference_attention=True attends to the reference pose: pass ref_pose"
    ):
        ext(pose)


def test_bad_frames_for_prepare_pose_images():
    with pytest.raises(TypeError, match="must be uint8"):
        prepare_pose_images(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=escape("(F, H, W, 3) or (H, W, 3), got shape (2, 3, 64, 64)")):
        prepare_pose_images(np.zeros((2, 3, 64, 64), np.uint8))


def test_multiscale_config_errors():
    with pytest.raises(ValueError, match="4 down blocks"):
        PoseGuiderMultiScale(**dict(MS_TINY, block_out_channels=(32, 64, 64)))


# --- strict loading of the official layouts -----------------------------------------------------------------
def official_checkpoint(key_list: str, shapes: dict, seed: int = 0) -> dict:
    """A state dict in the order and with the names of an official ``pose_guider.pth``, random values of
    ``shapes`` (the official shapes, or the TINY model's under the same names)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in read_key_list(CHECKPOINT_KEYS / key_list):
        shape = shapes[name]
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(11)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:  # fan-in scaled weights: activations stay finite through the levels
            out[name] = torch.randn(shape, generator=g) / math.sqrt(torch.Size(shape[1:]).numel())
        else:
            out[name] = torch.rand(shape, generator=g) + 0.5
    return out


def test_strict_loading_of_an_animateanyone_pose_guider_pth(tmp_path):
    official = read_key_list(CHECKPOINT_KEYS / "aa" / "pose_guider.txt")
    sd = official_checkpoint("aa/pose_guider.txt", official)  # full size: 1.09M parameters
    torch.save(sd, tmp_path / "pose_guider.pth")
    g = load_official_pose_guider(tmp_path / "pose_guider.pth")
    assert not g.training and len(g.state_dict()) == 16
    for name, value in g.state_dict().items():
        assert torch.equal(value, sd[name])


def test_strict_loading_of_an_aniportrait_pose_guider_pth(tmp_path):
    official = read_key_list(CHECKPOINT_KEYS / "ap" / "pose_guider.txt")
    tiny = {k: tuple(v.shape) for k, v in PoseGuiderMultiScale(**MS_TINY).state_dict().items()}
    assert list(tiny) == list(official)  # the same 184 names in the same order at TINY size
    sd = official_checkpoint("ap/pose_guider.txt", tiny)
    torch.save(sd, tmp_path / "pose_guider.pth")
    g = load_official_pose_guider_multiscale(tmp_path / "pose_guider.pth", **MS_TINY)
    assert not g.training
    for name, value in g.state_dict().items():
        assert torch.equal(value, sd[name])
    pose = torch.rand(1, 3, 1, 64, 64)
    expected = plain_multiscale(sd, pose[0] * 2 - 1)
    for ours, ref in zip(g(pose), expected, strict=True):
        torch.testing.assert_close(ours[0], ref, rtol=1e-4, atol=1e-4)
    # the full-size file's names and shapes fit the full-size guider (checked on meta, no 670 MB file)
    with torch.device("meta"):
        full = PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_SD15)
    full.load_weights({k: torch.empty(s, device="meta") for k, s in official.items()}, assign=True)


def test_a_wrong_checkpoint_names_its_keys(tmp_path):
    aa = PoseGuider(**TINY.pose_guider).state_dict()
    ap = PoseGuiderMultiScale(**MS_TINY).state_dict()
    torch.save(aa, tmp_path / "aa.pth")
    torch.save(ap, tmp_path / "ap.pth")
    with pytest.raises(
        KeyMismatchError,
        match=r"(?s)184 missing keys .*scale, conv_layers\.0\.weight.*16 unexpected keys .*conv_in\.weight",
    ):
        load_official_pose_guider_multiscale(tmp_path / "aa.pth", **MS_TINY)
    with pytest.raises(
        KeyMismatchError, match=r"(?s)16 missing keys .*conv_in\.weight.*184 unexpected keys .*scale"
    ):
        load_official_pose_guider(tmp_path / "ap.pth", **TINY.pose_guider)
    model = PoseGuiderMultiScale(**MS_TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = {k: v for k, v in ap.items() if k != "scale"}
    partial["final_proj.weight"] = torch.zeros(5, 5, 1, 1)
    with pytest.raises(
        KeyMismatchError, match=r"(?s)1 missing keys .*: scale.*final_proj\.weight model \(32, 16, 1, 1\) vs"
    ):
        model.load_weights(partial)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(ValueError, match="no key starts with prefix 'face_locator.'"):
        load_official_pose_guider(tmp_path / "aa.pth", prefix="face_locator.", **TINY.pose_guider)


# --- Hallo's face locator -----------------------------------------------------------------------------------
def test_face_locator_keys_equal_hallo_and_load_from_net_pth(tmp_path):
    net = read_key_list(CHECKPOINT_KEYS / "hallo" / "net.txt")
    official = {k.removeprefix("face_locator."): s for k, s in net.items() if k.startswith("face_locator.")}
    with torch.device("meta"):
        g = PoseGuider(**FACE_LOCATOR_SD15)
    assert {k: tuple(v.shape) for k, v in g.state_dict().items()} == official
    assert round(count_parameters(g) / 1e6, 2) == 0.51
    sd = {f"face_locator.{k}": torch.randn(s) for k, s in official.items()}
    sd["imageproj.proj.weight"] = torch.randn(4, 4)  # another part of net.pth: not picked
    torch.save(sd, tmp_path / "net.pth")
    loaded = load_official_pose_guider(tmp_path / "net.pth", prefix="face_locator.", **FACE_LOCATOR_SD15)
    assert torch.equal(loaded.conv_out.weight, sd["face_locator.conv_out.weight"])


def hallo_box(xy_edges, size_w, size_h, ratio):
    """Hallo's get_face_mask + expand_region, written out on plain floats."""
    oval = xy_edges[list(FACE_OVAL[:-1])]
    out = []
    for axis, size in ((0, size_w), (1, size_h)):
        lo, hi = float(np.round(oval[:, axis].min())), float(np.round(oval[:, axis].max()))
        mid = math.floor((lo + hi) / 2)
        half = math.floor((hi - lo) * ratio / 2)
        a, b = mid - half, mid + half
        if a < 0:
            a, b = 0, b - a
        if b > size:
            a, b = a - (b - size), size
        out += [round(a), round(b)]
    return tuple(out)


@pytest.mark.parametrize(
    "centre", [(60.0, 50.0), (12.0, 100.0), (118.0, 8.0)], ids=["inside", "left", "corner"]
)
def test_face_region_box_and_mask_follow_hallo(centre):
    rng = np.random.default_rng(0)
    xy = rng.normal(centre, (9.0, 12.0), size=(478, 2))  # pixel centres
    box = face_region_bbox(xy, 128, 128)
    assert box == hallo_box(xy + 0.5, 128, 128, 1.2)
    x0, x1, y0, y1 = box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    mask = face_region_mask(xy, 128, 128)
    assert mask.shape == (3, 128, 128) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[:, y0:y1, x0:x1].all() and mask.sum() == 3 * (x1 - x0) * (y1 - y0)
    assert torch.equal(mask[0], mask[2])


def test_face_region_mask_on_a_real_face_drives_the_face_locator():
    image = skimage.data.astronaut()
    with FaceLandmarker() as lm:
        face = lm.detect(image, "astronaut")
    x0, x1, y0, y1 = face_region_bbox(face, 512, 512)
    oval = face.pixels[list(FACE_OVAL[:-1])]
    extent = oval.max(0) - oval.min(0)  # (w, h) of the face oval
    assert x1 - x0 == pytest.approx(1.2 * extent[0], abs=3) and y1 - y0 == pytest.approx(
        1.2 * extent[1], abs=3
    )
    assert x0 < oval[:, 0].min() and oval[:, 0].max() < x1 and y0 < oval[:, 1].min() and oval[:, 1].max() < y1
    mask = face_region_mask(face, 512, 512)
    locator = PoseGuider(**dict(FACE_LOCATOR_SD15, conditioning_embedding_channels=32))
    fea = locator(mask[None, :, None].expand(1, 3, 2, 512, 512))
    assert fea.shape == (1, 32, 2, 64, 64)
    with pytest.raises(ValueError, match=escape("(478, 2) face-mesh pixel coordinates, got shape (10, 2)")):
        face_region_bbox(np.zeros((10, 2)), 64, 64)
    with pytest.raises(ValueError, match="expand_ratio must be positive"):
        face_region_mask(face, 512, 512, expand_ratio=0)


# --- through the denoising UNet -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    unet = VideoUNet(TINY.unet, MOTION_TINY).eval()
    with torch.no_grad():
        for _, m in unet.motion_modules():  # zero-init motion output made random: the modules do something
            m.temporal_transformer.proj_out.weight.normal_(std=0.2, generator=g)
    sample = torch.randn(2, 4, 3, 16, 16, generator=g)
    tokens = torch.randn(2, 1, TINY.unet["cross_attention_dim"], generator=g)
    pose = torch.rand(2, 3, 3, 128, 128, generator=g)
    return unet, sample, torch.tensor([10, 700]), tokens, pose


def test_a_zero_initialised_single_guider_leaves_the_unet_bit_identical(unet_inputs):
    unet, sample, t, tokens, pose = unet_inputs
    guider = PoseGuider(**TINY.pose_guider)
    with torch.no_grad():
        plain = unet(sample, t, tokens)
        assert torch.equal(unet(sample, t, tokens, pose_cond_fea=guider(pose)), plain)
        torch.nn.init.normal_(guider.conv_out.weight, std=0.1)  # a trained guider does change it
        assert (unet(sample, t, tokens, pose_cond_fea=guider(pose)) - plain).abs().max() > 1e-3


def test_a_fresh_multiscale_guider_changes_the_unet_through_its_deeper_levels(unet_inputs):
    """Only fea[0] is zero at init (final_proj); fea[1..4] come from He-initialised convolutions and
    transformers, so AniPortrait's fresh guider changes the UNet from step 0. Its fea[0] alone does not."""
    unet, sample, t, tokens, pose = unet_inputs
    guider = PoseGuiderMultiScale(**MS_TINY).eval()
    with torch.no_grad():
        fea = guider(pose)
        assert [tuple(f.shape) for f in fea] == unet.pose_feature_shapes(2, 3, 16, 16)
        assert torch.count_nonzero(fea[0]) == 0
        assert all(f.abs().mean() > 0.01 for f in fea[1:])
        other = guider(torch.rand_like(pose))  # behind final_proj = 0 they are the same for every pose
        assert all(torch.equal(a, b) for a, b in zip(fea, other, strict=True))
        plain = unet(sample, t, tokens)
        assert torch.equal(unet(sample, t, tokens, pose_cond_fea=fea[0]), plain)
        assert torch.equal(
            unet(sample, t, tokens, pose_cond_fea=[fea[0]] + [torch.zeros_like(f) for f in fea[1:]]), plain
        )
        assert (unet(sample, t, tokens, pose_cond_fea=fea) - plain).abs().max() > 1e-2
