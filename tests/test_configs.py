import dataclasses
import json
from pathlib import Path

import pytest

import anim_lab
from anim_lab.configs import PRESETS, SD15, TINY, TOY, Preset, get_preset


def test_presets_by_name():
    assert get_preset("sd15") is SD15 and get_preset(TINY) is TINY and set(PRESETS) == {"SD15", "TINY", "TOY"}


def test_unknown_preset_and_component_say_what_exists():
    with pytest.raises(KeyError, match="SD15"):
        get_preset("sdxl")
    with pytest.raises(KeyError, match="pose_guider"):
        SD15.get("text_encoder")


def test_get_returns_a_copy():
    cfg = SD15.get("unet")
    cfg["block_out_channels"] = (1,)
    assert SD15.unet["block_out_channels"] == (320, 640, 1280, 1280)


@pytest.mark.parametrize("preset", [SD15, TINY, TOY], ids=lambda p: p.name)
def test_sizes_are_consistent(preset):
    # The VAE's latent grid must be what the UNet and the pose guider work on.
    assert preset.vae_scale_factor == 8
    assert preset.unet["in_channels"] == preset.vae["latent_channels"]
    assert 2 ** (len(preset.pose_guider["block_out_channels"]) - 1) == preset.vae_scale_factor
    assert preset.pose_guider["conditioning_embedding_channels"] == preset.unet["block_out_channels"][0]
    # The single CLIP token enters cross-attention: its width must be the UNet's cross_attention_dim.
    assert preset.image_encoder["projection_dim"] == preset.unet["cross_attention_dim"]
    assert preset.height % (8 * 2 ** (len(preset.unet["block_out_channels"]) - 1)) == 0


def test_toy_preset_describes_the_committed_toy_models():
    # The TOY preset must build exactly the models whose weights are committed (config.json is written by
    # training).
    assets = Path(anim_lab.__file__).parent / "assets"
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples -> lists)
    vae = json.loads((assets / "toy_vae" / "config.json").read_text())
    assert {k: vae[k] for k in TOY.vae} == as_json(TOY.vae)
    assert TOY.vae_scaling_factor == vae["scaling_factor"]
    encoder = json.loads((assets / "toy_image_encoder" / "config.json").read_text())
    assert {k: encoder[k] for k in TOY.image_encoder} == as_json(TOY.image_encoder)
    causal = json.loads((assets / "toy_causal_vae" / "config.json").read_text())
    assert {k: causal[k] for k in TOY.get("causal_vae") if k != "scaling_factor"} == as_json(
        {k: v for k, v in TOY.get("causal_vae").items() if k != "scaling_factor"}
    )


@pytest.mark.parametrize("preset", [SD15, TINY, TOY], ids=lambda p: p.name)
def test_motion_is_a_field_and_the_scaling_factor_is_stored_once(preset):
    fields = {f.name for f in dataclasses.fields(Preset)}
    assert "motion" in fields and "motion" not in preset.extra
    assert preset.get("motion") == preset.motion and preset.get("motion") is not preset.motion
    assert preset.motion["motion_module_resolutions"] == (1, 2, 4, 8)
    assert "vae_scaling_factor" not in fields  # one place: the VAE's own kwargs
    assert preset.vae_scaling_factor == preset.vae["scaling_factor"]
    assert "causal_vae" in preset.extra and preset.get("causal_vae")["temporal_compression_ratio"] == 4


def test_extra_may_not_shadow_a_field():
    with pytest.raises(ValueError, match="are Preset fields"):
        dataclasses.replace(TINY, extra={"motion": {}})
