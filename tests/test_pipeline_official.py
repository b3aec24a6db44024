"""load_official_pipeline: tiny checkpoints written in exactly the official layouts and file names
(Moore-AnimateAnyone ``pretrained_weights/``, AniPortrait ``pretrained_model/``), loaded strictly and run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import inputs, tiny_pipeline

from anim_lab.configs import POSE_GUIDER_MULTISCALE_TINY, TINY
from anim_lab.guidance import DDIM_OFFICIAL
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.unet import MOTION_KEY, build_unet2d
from anim_lab.weights import KeyMismatchError, load_official_pipeline


def write_official(
    folder: Path,
    pipe: Pose2VideoPipeline,
    base: str = "stable-diffusion-v1-5",
    motion_name="motion_module.pth",
) -> Path:
    """The official weight folder for ``pipe``'s components: the four .pth state dicts (denoising_unet.pth
    without motion keys, motion_module.pth with only them, full UNet paths), the base model's unet/ folder,
    sd-vae-ft-mse/ and image_encoder/ as pickled .bin files, as the README layouts list them."""
    folder.mkdir(parents=True, exist_ok=True)
    denoiser = pipe.denoising_unet.state_dict()
    torch.save({k: v for k, v in denoiser.items() if MOTION_KEY not in k}, folder / "denoising_unet.pth")
    torch.save({k: v for k, v in denoiser.items() if MOTION_KEY in k}, folder / motion_name)
    torch.save(pipe.reference_unet.state_dict(), folder / "reference_unet.pth")
    torch.save(pipe.pose_guider.state_dict(), folder / "pose_guider.pth")
    build_unet2d(pipe.denoising_unet.unet_kwargs).save_pretrained(
        folder / base / "unet", safe_serialization=False
    )
    (folder / base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    pipe.vae.save_pretrained(folder / "sd-vae-ft-mse", safe_serialization=False)
    pipe.image_encoder.save_pretrained(folder / "image_encoder")  # model.safetensors (HF ships .bin too)
    return folder


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def pipe_multi_scale():
    return tiny_pipeline(multi_scale=True)


def assert_same_weights(a: Pose2VideoPipeline, b: Pose2VideoPipeline) -> None:
    for name in ("vae", "image_encoder", "reference_unet", "denoising_unet", "pose_guider"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def run(pipe, frames=5):
    ref, poses = inputs(frames)
    return pipe(
        ref,
        poses,
        num_inference_steps=2,
        context_frames=4,
        context_overlap=1,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).frames


def test_animate_anyone_layout_loads_strictly_and_runs(pipe, tmp_path):
    folder = write_official(tmp_path / "pretrained_weights", pipe)
    loaded = load_official_pipeline(folder, layout="animate_anyone", motion_kwargs=MOTION_TINY)
    loaded.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, loaded)
    config = {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")}
    assert {k: config[k] for k in DDIM_OFFICIAL} == DDIM_OFFICIAL  # the official inference scheduler
    np.testing.assert_allclose(run(loaded), run(pipe), atol=1e-5, rtol=0)


def test_aniportrait_layout_loads_strictly_and_runs(pipe_multi_scale, tmp_path):
    folder = write_official(tmp_path / "pretrained_model", pipe_multi_scale)
    loaded = load_official_pipeline(
        folder,
        layout="aniportrait",
        motion_kwargs=MOTION_TINY,
        pose_guider_kwargs=POSE_GUIDER_MULTISCALE_TINY,
    )
    loaded.set_progress_bar_config(disable=True)
    assert_same_weights(pipe_multi_scale, loaded)
    assert "scale" in loaded.pose_guider.state_dict()
    np.testing.assert_allclose(run(loaded), run(pipe_multi_scale), atol=1e-5, rtol=0)


def test_animatediff_motion_checkpoint_and_sd_image_variations_base(pipe, tmp_path):
    folder = write_official(
        tmp_path / "w", pipe, base="sd-image-variations-diffusers", motion_name="mm_sd_v15_v2.ckpt"
    )
    loaded = load_official_pipeline(folder, motion_kwargs=MOTION_TINY)
    assert_same_weights(pipe, loaded)


@pytest.mark.parametrize(
    "remove, named",
    [
        ("denoising_unet.pth", "denoising_unet.pth"),
        ("reference_unet.pth", "reference_unet.pth"),
        ("pose_guider.pth", "pose_guider.pth"),
        ("motion_module.pth", "motion_module.pth or mm_sd_v15_v2.ckpt"),
        ("stable-diffusion-v1-5", "stable-diffusion-v1-5/unet or sd-image-variations-diffusers/unet"),
        ("sd-vae-ft-mse/config.json", "sd-vae-ft-mse/"),
        ("image_encoder/model.safetensors", "image_encoder or sd-image-variations-diffusers/image_encoder"),
    ],
)
def test_a_missing_file_is_named_with_the_expected_layout(pipe, tmp_path, remove, named):
    folder = write_official(tmp_path / "w", pipe)
    path = folder / remove
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="Expected layout") as err:
        load_official_pipeline(folder, motion_kwargs=MOTION_TINY)
    assert named in str(err.value)
    assert "|-- denoising_unet.pth" in str(err.value)


def test_a_missing_folder_and_an_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected the animate_anyone layout"):
        load_official_pipeline(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown layout 'hallo'"):
        load_official_pipeline(tmp_path, layout="hallo")


def test_a_wrong_layout_is_named(pipe, pipe_multi_scale, tmp_path):
    aa = write_official(tmp_path / "aa", pipe)
    with pytest.raises(ValueError, match="Pass layout='animate_anyone'"):
        load_official_pipeline(aa, layout="aniportrait", motion_kwargs=MOTION_TINY)
    ap = write_official(tmp_path / "ap", pipe_multi_scale)
    with pytest.raises(ValueError, match="pass layout='aniportrait'"):
        load_official_pipeline(ap, layout="animate_anyone", motion_kwargs=MOTION_TINY)


def test_loading_is_strict(pipe, tmp_path):
    folder = write_official(tmp_path / "w", pipe)
    state = torch.load(folder / "denoising_unet.pth", weights_only=True)
    dropped = sorted(state)[3]
    del state[dropped]
    torch.save(state, folder / "denoising_unet.pth")
    with pytest.raises(KeyMismatchError, match=f"1 missing keys.*{dropped}"):
        load_official_pipeline(folder, motion_kwargs=MOTION_TINY)
    # a motion module of another size (SD15 defaults against a tiny file) is named too
    folder = write_official(tmp_path / "w2", pipe)
    with pytest.raises(KeyMismatchError, match="keys with other shapes|missing keys"):
        load_official_pipeline(folder, motion_kwargs=dict(MOTION_TINY, temporal_position_encoding_max_len=24))
    # a pose guider with an extra key
    folder = write_official(tmp_path / "w3", pipe)
    guider = dict(pipe.pose_guider.state_dict(), extra=torch.zeros(1))
    torch.save(guider, folder / "pose_guider.pth")
    with pytest.raises(KeyMismatchError, match=r"pose_guider.pth \(layout 'animate_anyone'\).*extra"):
        load_official_pipeline(folder, motion_kwargs=MOTION_TINY)


def test_sd15_unet_config_builds_the_official_key_lists():
    """At SD15 size (on meta) the loaders expect exactly the official checkpoints' keys."""
    from keylists import CHECKPOINT_KEYS, read_key_list

    from anim_lab.configs import SD15
    from anim_lab.motion import MOTION_SD15
    from anim_lab.unet import ReferenceUNet, VideoUNet

    with torch.device("meta"):
        ref, den = ReferenceUNet(SD15.unet), VideoUNet(SD15.unet, MOTION_SD15)
    keys = {k: tuple(v.shape) for k, v in den.state_dict().items()}
    assert keys == read_key_list(CHECKPOINT_KEYS / "aa" / "denoising_unet_full.txt")
    assert len([k for k in keys if MOTION_KEY not in k]) == 686  # denoising_unet.pth
    assert {k: v for k, v in keys.items() if MOTION_KEY in k} == read_key_list(
        CHECKPOINT_KEYS / "aa" / "motion_module.txt"
    )
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == read_key_list(
        CHECKPOINT_KEYS / "aa" / "reference_unet.txt"
    )
    assert TINY.unet["block_out_channels"] != SD15.unet["block_out_channels"]
