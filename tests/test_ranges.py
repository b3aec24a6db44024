"""The range table (issue 28 §5, seed 002's "[-1, 1], [0, 1], [0, 255]" bugs): each place that takes pixels,
the range it takes, and what the project's checks do when given each of the other two.

| takes                                 | range         | given [-1, 1] | given [0, 1]  | given [0, 255]     |
|---------------------------------------|---------------|---------------|---------------|--------------------|
| check_images, CausalVAE.encode, CLIP  | [-1, 1] float | ok            | passes (1)    | InputError / Type* |
| check_pose (both pose guiders)        | [0, 1] float  | InputError    | ok            | InputError / Type* |
| prepare_pose_images, images_from_uint8, write_video | uint8 | TypeError | TypeError   | ok (uint8)         |
| save_video                            | [0, 1] float or uint8 | NOT caught (2) | ok   | NOT caught (2)     |

Type*: float [0, 255] raises InputError (the VAE's message says they "look like [0, 255] pixels"), uint8
raises TypeError with the conversion to use.
(1) A [0, 1] image where [-1, 1] is expected cannot be caught from its values: it is a legal, bright [-1, 1]
image (documented in anim_lab.vae.check_images).
(2) save_video used to clip float frames to [0, 1] unchecked ([-1, 1] frames lost their dark half, [0, 255]
floats turned white); it now refuses them, naming the map.
"""

import numpy as np
import pytest
import torch

from anim_lab.causal_vae import CausalVAE
from anim_lab.clip import ClipPreprocess
from anim_lab.configs import TINY
from anim_lab.errors import InputError
from anim_lab.pose_guider import check_pose, prepare_pose_images
from anim_lab.vae import check_images, images_from_uint8
from anim_lab.video import save_video, write_video

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
U = torch.rand(1, 3, 8, 8, generator=g)  # (B, 3, H, W) in [0, 1], spanning it
PIXELS = {
    "[-1, 1]": U * 2 - 1,
    "[0, 1]": U,
    "[0, 255] float": (U * 255).round(),
    "[0, 255] uint8": (U * 255).round().to(torch.uint8),
}


def causal_encode(x):  # (B, 3, H, W) -> a one-frame video (B, 3, 1, H, W)
    return CausalVAE(**TINY.extra["causal_vae"]).encode(x[:, :, None])


MODEL_INPUTS = {  # take (B, 3, H, W) float in [-1, 1]
    "check_images": check_images,
    "ClipPreprocess": ClipPreprocess(size=8, crop_size=8),
    "CausalVAE.encode": causal_encode,
}


@pytest.mark.parametrize("where", MODEL_INPUTS)
def test_model_inputs_take_minus_one_to_one(where):
    take = MODEL_INPUTS[where]
    take(PIXELS["[-1, 1]"])
    take(PIXELS["[0, 1]"])  # not caught: a legal bright image (documented in vae.check_images)
    with pytest.raises(InputError, match=r"\[-1, 1\].*got values in \[0, 25[45]"):
        take(PIXELS["[0, 255] float"])
    with pytest.raises((TypeError, InputError), match="127.5|uint8|float"):
        take(PIXELS["[0, 255] uint8"])


def test_the_pose_guiders_take_zero_to_one():
    check = lambda x: check_pose(x, channels=3, multiple=8)  # noqa: E731
    check(PIXELS["[0, 1]"])
    with pytest.raises(InputError, match=r"\[0, 1\].*map \[-1, 1\] images with \(x \+ 1\) / 2"):
        check(PIXELS["[-1, 1]"])
    with pytest.raises(InputError, match=r"\[0, 1\].*divide uint8 images by 255"):
        check(PIXELS["[0, 255] float"])
    with pytest.raises(TypeError, match="prepare_pose_images"):
        check(PIXELS["[0, 255] uint8"])


def frames(name):  # (B, 3, H, W) -> (F, H, W, 3) numpy
    return PIXELS[name].permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("where", ["prepare_pose_images", "images_from_uint8", "write_video"])
def test_pixel_inputs_take_uint8(where, tmp_path):
    take = {
        "prepare_pose_images": prepare_pose_images,
        "images_from_uint8": images_from_uint8,
        "write_video": lambda f: write_video(tmp_path / "a.gif", f, fps=4),
    }[where]
    take(frames("[0, 255] uint8"))
    for name in ("[-1, 1]", "[0, 1]", "[0, 255] float"):
        with pytest.raises((TypeError, InputError), match="uint8"):
            take(frames(name))
    assert np.array_equal(
        images_from_uint8(frames("[0, 255] uint8")).numpy(), (PIXELS["[0, 255] float"] / 127.5 - 1).numpy()
    )


def test_save_video_takes_zero_to_one_floats_and_uint8(tmp_path):
    save_video(frames("[0, 1]"), tmp_path / "a.gif", fps=4)
    save_video(frames("[0, 255] uint8"), tmp_path / "b.gif", fps=4)


@pytest.mark.parametrize("name", ["[-1, 1]", "[0, 255] float"])
def test_save_video_refuses_float_frames_out_of_zero_to_one(name, tmp_path):
    with pytest.raises(InputError, match=r"float frames must be in \[0, 1\].*\(x \+ 1\) / 2"):
        save_video(frames(name), tmp_path / "a.gif", fps=4)
    assert not (tmp_path / "a.gif").exists()
