"""LoRA through peft on the project's UNets, saved and loaded in diffusers' format by the pipeline's loader
(anim_lab.lora, issue 28 §1): round trip, fuse/unfuse, weighted adapters against a plain computation, a
wrong file refused, parameter counts at SD1.5 size."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F

from anim_lab.clip import build_image_encoder
from anim_lab.configs import TINY
from anim_lab.errors import InputError
from anim_lab.files import current_umask
from anim_lab.guidance import build_scheduler
from anim_lab.lora import (
    LORA_TARGETS,
    check_lora_keys,
    lora_config,
    lora_layers,
    lora_parameter_count,
    sd15_lora_parameter_counts,
    set_lora_weights,
)
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.plain import randomize
from anim_lab.pose_guider import PoseGuider
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d
from anim_lab.vae import build_vae

torch.set_num_threads(1)


def tiny_pipeline(unet_kwargs=None) -> Pose2VideoPipeline:
    """Random nonzero weights everywhere, the same for every call (seeded per component)."""
    unet_kwargs = unet_kwargs or TINY.unet
    torch.manual_seed(0)
    pipe = Pose2VideoPipeline(
        vae=build_vae(TINY.vae),
        image_encoder=build_image_encoder(TINY.image_encoder),
        reference_unet=ReferenceUNet(unet_kwargs),
        denoising_unet=VideoUNet(unet_kwargs, MOTION_TINY),
        pose_guider=PoseGuider(**TINY.pose_guider),
        scheduler=build_scheduler(),
    )
    for i, name in enumerate(("reference_unet", "denoising_unet")):
        randomize(getattr(pipe, name), seed=i).eval().requires_grad_(False)
    return pipe


def add_random_lora(model, name: str, rank: int, alpha: float, seed: int) -> None:
    """add_adapter as the notes do, then every LoRA weight random (B too: peft's init makes B zero)."""
    model.add_adapter(lora_config(rank, alpha), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".lora_" in key and f".{name}." in key:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 1, TINY.unet["cross_attention_dim"], generator=g)
    return torch.randn(2, 4, 3, 8, 8, generator=g), 7, tokens  # (B, 4, F, h, w), t, (B, 1, D)


def outputs(pipe):
    latents, t, tokens = unet_inputs()
    with torch.no_grad():
        return pipe.denoising_unet(latents, t, tokens), pipe.reference_unet(latents[:, :, 0], t, tokens)


def test_a_lora_saved_and_loaded_in_diffusers_format_is_bit_exact(tmp_path):
    pipe = tiny_pipeline()
    base = outputs(pipe)
    add_random_lora(pipe.denoising_unet, "default", rank=2, alpha=3, seed=5)
    add_random_lora(pipe.reference_unet, "default", rank=4, alpha=1, seed=6)
    adapted = outputs(pipe)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(adapted, base, strict=True))  # not vacuous
    den, den_meta = lora_layers(pipe.denoising_unet)
    ref, ref_meta = lora_layers(pipe.reference_unet)
    path = Pose2VideoPipeline.save_lora_weights(
        tmp_path,
        den,
        ref,
        denoising_unet_lora_adapter_metadata=den_meta,
        reference_unet_lora_adapter_metadata=ref_meta,
    )
    assert path.name == "pytorch_lora_weights.safetensors" and sorted(p.name for p in tmp_path.iterdir()) == [
        path.name
    ]
    with safe_open(str(path), framework="pt") as f:  # diffusers' format: component prefix, lora.down / up
        keys = set(f.keys())  # noqa: SIM118
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (
        "denoising_unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
    )
    assert "reference_unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight" in keys
    assert len(keys) == len(den) + len(ref) and all(".lora.down." in k or ".lora.up." in k for k in keys)
    assert header["denoising_unet.lora_alpha"] == 3 and header["reference_unet.r"] == 4
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # written as every output is (atomically)

    fresh = tiny_pipeline()
    torch.testing.assert_close(outputs(fresh), base, rtol=0, atol=0)
    fresh.load_lora_weights(tmp_path, adapter_name="toy")
    for name in ("denoising_unet", "reference_unet"):
        saved = {k: v for k, v in getattr(pipe, name).state_dict().items() if ".lora_" in k}
        loaded = getattr(fresh, name).state_dict()
        assert saved and all(
            torch.equal(loaded[k.replace(".default.", ".toy.")], v) for k, v in saved.items()
        )
        assert (
            getattr(fresh, name).peft_config["toy"].lora_alpha
            == getattr(pipe, name).peft_config["default"].lora_alpha
        )
    torch.testing.assert_close(outputs(fresh), adapted, rtol=0, atol=0)
    fresh.disable_lora()
    torch.testing.assert_close(outputs(fresh), base, rtol=0, atol=0)


def test_saved_weights_fill_an_adapter_the_model_already_has(tmp_path):
    """The notes' second way: the UNet has the adapter; the file's weights become its weights (peft's
    set_peft_model_state_dict on the diffusers keys)."""
    pipe = tiny_pipeline()
    add_random_lora(pipe.denoising_unet, "y_lora", rank=2, alpha=3, seed=5)
    layers, meta = lora_layers(pipe.denoising_unet, "y_lora")
    path = Pose2VideoPipeline.save_lora_weights(tmp_path, layers, denoising_unet_lora_adapter_metadata=meta)
    fresh = tiny_pipeline()
    fresh.denoising_unet.add_adapter(lora_config(2, 3), adapter_name="y_lora")  # B = 0: no change yet
    state, _ = Pose2VideoPipeline.lora_state_dict(path)
    set_lora_weights(fresh.denoising_unet, state, "y_lora", prefix="denoising_unet")
    torch.testing.assert_close(outputs(fresh), outputs(pipe), rtol=0, atol=0)
    other = tiny_pipeline()
    other.denoising_unet.add_adapter(lora_config(2, 3, target_modules=["to_q"]), adapter_name="y_lora")
    with pytest.raises(
        InputError, match=r"do not match adapter 'y_lora': missing \[\] .*not in the adapter \['down"
    ):
        set_lora_weights(other.denoising_unet, state, "y_lora", prefix="denoising_unet")
    with pytest.raises(InputError, match="has no adapter 'z'"):
        set_lora_weights(other.denoising_unet, state, "z", prefix="denoising_unet")


def test_fuse_then_unfuse_gives_the_base_weights_back():
    pipe = tiny_pipeline()
    add_random_lora(pipe.denoising_unet, "default", rank=4, alpha=4, seed=7)
    base_weights = {k: v.clone() for k, v in pipe.denoising_unet.state_dict().items() if ".base_layer." in k}
    adapted = outputs(pipe)
    pipe.fuse_lora()
    assert pipe.fused_loras == {"default"}
    fused = pipe.denoising_unet.state_dict()
    changed = max((fused[k] - v).abs().max() for k, v in base_weights.items())
    assert changed > 1e-2  # the deltas are in the weights now
    torch.testing.assert_close(outputs(pipe), adapted, rtol=0, atol=1e-5)  # W' x = W x + B A x, rounded
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    restored = pipe.denoising_unet.state_dict()
    err = max((restored[k] - v).abs().max().item() for k, v in base_weights.items())
    assert err <= 1e-6, err
    torch.testing.assert_close(outputs(pipe), adapted, rtol=0, atol=1e-5)  # the adapter still applies


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on a second adapter
def test_two_weighted_adapters_add_their_scaled_deltas_on_a_linear_layer():
    pipe = tiny_pipeline()
    unet = pipe.denoising_unet
    add_random_lora(unet, "a", rank=2, alpha=3, seed=8)
    add_random_lora(unet, "b", rank=4, alpha=2, seed=9)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    layer = unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v")
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))

    def delta(name, r, alpha):  # (alpha / r) B A x, from the weights
        return alpha / r * F.linear(F.linear(x, layer.lora_A[name].weight), layer.lora_B[name].weight)

    plain = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)  # W x + b
    expected = plain + 0.7 * delta("a", 2, 3) + -0.4 * delta("b", 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
        pipe.set_adapters("b", adapter_weights=1.5)  # one adapter: the other's delta leaves
        torch.testing.assert_close(layer(x), plain + 1.5 * delta("b", 4, 2), rtol=0, atol=1e-6)


def test_a_lora_for_another_model_is_refused_with_the_keys_named(tmp_path):
    other = tiny_pipeline(dict(TINY.unet, block_out_channels=(16, 32, 32, 32)))  # narrower UNets
    add_random_lora(other.denoising_unet, "default", rank=2, alpha=2, seed=1)
    layers, meta = lora_layers(other.denoising_unet)
    Pose2VideoPipeline.save_lora_weights(tmp_path, layers, denoising_unet_lora_adapter_metadata=meta)
    pipe = tiny_pipeline()
    with pytest.raises(
        InputError,
        match=r"(?s)pytorch_lora_weights.safetensors is not a LoRA .*shapes do not "
        r"fit: \['denoising_unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_k",
    ):
        pipe.load_lora_weights(tmp_path)
    assert not getattr(pipe.denoising_unet, "peft_config", None)  # nothing was loaded
    # keys of a network the pipeline does not have (an SD1.5 "unet." LoRA), or of no linear layer
    foreign = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.ones(2, 32)
    }
    with pytest.raises(InputError, match=r"naming no linear layer of them: \['unet\.down_blocks"):
        pipe.load_lora_weights(foreign)
    with pytest.raises(InputError, match=r"no linear layer .*denoising_unet\.conv_in\.lora\.down\.weight"):
        check_lora_keys(
            {"denoising_unet": pipe.denoising_unet},
            {"denoising_unet.conv_in.lora.down.weight": torch.ones(2, 4)},
            "a file",
        )
    with pytest.raises(InputError, match="no pickle"):
        pipe.load_lora_weights(tmp_path / "lora.bin")


def test_lora_parameter_counts_at_sd15_size_on_meta():
    """What the chapter prints: the trainable parameters of LoRA on SD1.5's attention projections, equal to
    r (in + out) summed over the targeted layers (counted here from the UNet's own linear layers)."""
    counts = sd15_lora_parameter_counts((4, 64))
    with torch.device("meta"):
        unet = build_unet2d(__import__("anim_lab.configs").configs.SD15.unet)
    targeted = [
        m for n, m in unet.named_modules() if n.endswith(LORA_TARGETS) and isinstance(m, torch.nn.Linear)
    ]
    assert len(targeted) == 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)
    per_rank = sum(m.in_features + m.out_features for m in targeted)
    assert counts == {4: 4 * per_rank, 64: 64 * per_rank}
    assert counts[4] == 797_184  # the size of diffusers' SD1.5 rank-4 LoRA files (3.2 MB in float32)
    assert counts[64] == 12_754_944
    assert lora_parameter_count(unet, 4) == counts[4] and not getattr(unet, "peft_config", {})
    # with AnimateDiff's motion modules: each has 2 temporal attentions of 4 projections C -> C, 2C per rank
    widths = (
        2 * (320 + 640 + 1280 + 1280) + 1280 + 3 * (1280 + 1280 + 640 + 320)
    )  # down (2 per block), mid, up (3)
    assert sd15_lora_parameter_counts((4,), motion=True) == {
        4: counts[4] + 4 * 2 * 4 * 2 * widths
    }  # 2,005,504


def test_a_loaded_lora_acts_in_the_pipelines_generation(tmp_path):
    """Through reference attention and the whole loop: the LoRA changes the video; disabled it is the base
    video bit for bit; fused it is the adapted video to float rounding."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    poses = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", generator=torch.manual_seed(0))
        return pipe(ref, poses, **kw).frames  # (1, F, 3, H, W) in [0, 1]

    base = generate(tiny_pipeline())
    source = tiny_pipeline()
    add_random_lora(source.denoising_unet, "default", rank=2, alpha=2, seed=3)
    add_random_lora(source.reference_unet, "default", rank=2, alpha=2, seed=4)
    (den, den_meta), (ref_layers, ref_meta) = (
        lora_layers(source.denoising_unet),
        lora_layers(source.reference_unet),
    )
    Pose2VideoPipeline.save_lora_weights(tmp_path, den, ref_layers, den_meta, ref_meta)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(tmp_path, adapter_name="toy")
    adapted = generate(pipe)
    assert (adapted - base).abs().max() > 1e-3
    pipe.disable_lora()
    torch.testing.assert_close(generate(pipe), base, rtol=0, atol=0)
    pipe.enable_lora()
    pipe.fuse_lora()
    torch.testing.assert_close(generate(pipe), adapted, rtol=0, atol=1e-5)
