import pytest
import torch
from keylists import CHECKPOINT_KEYS, read_key_list
from torch.nn import functional as F

from anim_lab.configs import SD15, TINY
from anim_lab.inspect import build, count_parameters
from anim_lab.pose_guider import PoseGuider


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


@pytest.mark.parametrize(
    "shape, match",
    [((3, 64, 64), "(B, C, H, W)"), ((1, 1, 2, 64, 64), "3"), ((1, 3, 2, 60, 64), "multiples of 8")],
)
def test_bad_input(shape, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        PoseGuider(**TINY.pose_guider)(torch.rand(shape))
