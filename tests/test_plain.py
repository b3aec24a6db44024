"""anim_lab.plain.randomize: the weights the equivalence tests run on (every parameter random and nonzero)."""

import torch

from anim_lab.configs import POSE_GUIDER_MULTISCALE_TINY, TINY
from anim_lab.motion import MOTION_TINY
from anim_lab.plain import randomize
from anim_lab.pose_guider import PoseGuiderMultiScale
from anim_lab.unet import VideoUNet


def test_every_parameter_random_nonzero_and_a_function_of_the_seed_only():
    torch.manual_seed(0)
    model = VideoUNet(TINY.unet, MOTION_TINY)
    pe = {k: v.clone() for k, v in model.named_buffers()}
    assert any(not p.count_nonzero() for p in model.parameters())  # zero-init layers: what randomize fixes
    randomize(model, seed=3)
    for name, p in model.named_parameters():
        assert p.count_nonzero() > 0 and (p.numel() == 1 or p.std() > 0), f"{name} is zero or constant"
    for name, b in model.named_buffers():  # positional encodings kept
        assert torch.equal(b, pe[name]), name
    torch.manual_seed(1)  # another initialisation, the same seed: the same weights
    other = randomize(VideoUNet(TINY.unet, MOTION_TINY), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    third = randomize(VideoUNet(TINY.unet, MOTION_TINY), seed=4)
    assert not torch.equal(model.conv_in.weight, third.conv_in.weight)


def test_batchnorm_statistics_and_fan_in_scale():
    guider = randomize(PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_TINY))
    state = guider.state_dict()
    var = [v for k, v in state.items() if k.endswith("running_var")]
    assert var and all(v.min() >= 0.5 and v.max() <= 1.5 and v.std() > 0 for v in var)
    assert all(v.abs().min() > 0 for k, v in state.items() if k.endswith("running_mean"))
    assert all(v.item() == 7 for k, v in state.items() if k.endswith("num_batches_tracked"))
    for name, p in guider.named_parameters():
        if p.ndim >= 2 and p.numel() > 100:  # N(0, 1/fan_in)
            assert abs(p.std().item() * p[0].numel() ** 0.5 - 1) < 0.25, name
