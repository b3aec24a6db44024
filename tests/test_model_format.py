"""One model format: anim_lab's networks are diffusers models, and a pipeline folder is a standard diffusers
pipeline folder that diffusers' own loader reads."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from anim_lab.configs import POSE_GUIDER_MULTISCALE_TINY, TINY
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.plain import randomize
from anim_lab.pose_guider import PoseGuider, PoseGuiderMultiScale
from anim_lab.toy import TOY_ANIMATOR_DIR, load_animator
from anim_lab.unet import ReferenceUNet, VideoUNet
from anim_lab.weights import KeyMismatchError, realign


def _models():
    torch.manual_seed(0)
    return {
        "reference_unet": ReferenceUNet(TINY.unet),
        "denoising_unet": VideoUNet(TINY.unet, MOTION_TINY),
        "pose_guider": PoseGuider(**TINY.pose_guider),
        "multiscale": PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_TINY),
    }


def _inputs(name, model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 1, TINY.unet["cross_attention_dim"], generator=g)
    if name == "reference_unet":
        return (torch.randn(1, 4, 8, 8, generator=g), 0, tokens)
    if name == "denoising_unet":
        return (torch.randn(1, 4, 3, 8, 8, generator=g), 5, tokens)
    return (torch.rand(1, 3, 2, 64, 64, generator=g),)


@pytest.mark.parametrize("name", ["reference_unet", "denoising_unet", "pose_guider", "multiscale"])
def test_each_network_saves_and_loads_as_a_diffusers_model(name, tmp_path):
    model = _models()[name]
    randomize(model, 2)  # every weight nonzero, the zero-initialised output convs too
    model.eval()
    model.save_pretrained(tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["_class_name"] == type(model).__name__ and "_diffusers_version" in config
    loaded = realign(type(model).from_pretrained(tmp_path / name))  # aligned: bit for bit (see realign)

    def plain(config):  # the constructor's arguments, as JSON holds them (tuples become lists)
        return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

    assert type(loaded) is type(model) and plain(loaded.config) == plain(model.config)
    saved = load_file(tmp_path / name / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    with torch.no_grad():
        a, b = model(*_inputs(name, model)), loaded(*_inputs(name, loaded))
    for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_the_committed_toy_animator_is_a_standard_pipeline_folder(monkeypatch):
    index = json.loads((TOY_ANIMATOR_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "Pose2VideoPipeline"
    assert index["denoising_unet"] == ["anim_lab.unet", "VideoUNet"]
    assert index["pose_guider"] == ["anim_lab.pose_guider", "PoseGuider"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    # Pose2VideoPipeline.from_pretrained is diffusers' own DiffusionPipeline.from_pretrained (plus checks)
    calls = []
    original = DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    generic = Pose2VideoPipeline.from_pretrained(TOY_ANIMATOR_DIR)
    monkeypatch.undo()
    assert calls == [TOY_ANIMATOR_DIR] and type(generic) is Pose2VideoPipeline
    ours = load_animator()
    for name in ("reference_unet", "denoising_unet", "pose_guider", "vae"):
        files = load_file(TOY_ANIMATOR_DIR / name / "diffusion_pytorch_model.safetensors")
        for module in (getattr(generic, name), getattr(ours, name)):
            state = module.state_dict()
            assert state.keys() == files.keys() and all(torch.equal(state[k], files[k]) for k in files)
    for module in generic.components.values():  # frozen as load_animator freezes (CPU kernels pick other
        if hasattr(module, "requires_grad_"):  # code paths for tensors that require grad: ~1e-6 apart)
            module.requires_grad_(False)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    poses = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2)]
    kw = dict(num_inference_steps=1, guidance_scale=1.0, output_type="np")
    a = generic(ref, poses, generator=torch.Generator().manual_seed(0), **kw).frames
    b = ours(ref, poses, generator=torch.Generator().manual_seed(0), **kw).frames
    assert np.array_equal(a, b)


def test_a_pipeline_folder_is_checked_before_diffusers_reads_it(tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(TOY_ANIMATOR_DIR, folder, ignore=shutil.ignore_patterns("*.npz", "eval*.json"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, pose_guider=["subprocess", "Popen"])))
    with pytest.raises(ValueError, match=r"'pose_guider' is \['subprocess', 'Popen'\]; .* anim_lab only"):
        Pose2VideoPipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "denoising_unet" / "config.json").read_text())
    config["unet_kwargs"]["block_out_channels"] = [48, 64, 64, 64]  # wider than the weights
    (folder / "denoising_unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        KeyMismatchError, match=r"(?s)denoising_unet/diffusion_pytorch_model.safetensors.*shapes"
    ):
        Pose2VideoPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "name, targets",
    [
        ("reference_unet", ["to_q", "to_k", "to_v"]),
        ("denoising_unet", ["to_q", "to_k", "to_v"]),
        ("pose_guider", ["conv_in"]),
        ("multiscale", ["proj_in"]),
    ],
)
def test_each_network_takes_a_peft_lora_adapter(name, targets):
    """add_adapter, as on diffusers' own UNets: the adapted output is the base output plus the LoRA update
    B A x on the targeted layers; disabling the adapter gives the base output back exactly."""
    from peft import LoraConfig

    model = randomize(_models()[name], 2).eval().requires_grad_(False)  # frozen, as add_adapter leaves it
    x = _inputs(name, model)
    with torch.no_grad():
        base = model(*x)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=True))
    layers = [m for n, m in model.named_modules() if n.endswith(tuple(targets)) and hasattr(m, "lora_B")]
    assert layers, "no layer was adapted"
    flat = lambda out: torch.cat([o.flatten() for o in (out if isinstance(out, list) else [out])])  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(flat(model(*x)), flat(base), rtol=0, atol=0)  # B = 0 at init: no change
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.1)
        adapted = model(*x)
        assert (flat(adapted) - flat(base)).abs().max() > 1e-4
        model.disable_adapters()
        torch.testing.assert_close(flat(model(*x)), flat(base), rtol=0, atol=0)
        model.enable_adapters()
        torch.testing.assert_close(flat(model(*x)), flat(adapted), rtol=0, atol=0)
