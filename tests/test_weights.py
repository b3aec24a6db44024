"""Loading: file formats, diffusers folders, key checks with errors that name the keys, SD1.5 / official
checkpoints into our UNets (SD15 size on the meta device), and the motion-module key mapping to diffusers'
MotionAdapter."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter
from keylists import CHECKPOINT_KEYS, read_key_list
from safetensors.torch import save_file

from anim_lab import causal_vae
from anim_lab import clip as C
from anim_lab import vae as V
from anim_lab.causal_vae import CAUSAL_VAE_TINY, CausalVAE
from anim_lab.configs import SD15, TINY
from anim_lab.motion import MOTION_SD15, MOTION_TINY, sinusoidal_position_encoding
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d
from anim_lab.weights import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    WEIGHT_NAMES,
    CorruptWeightsError,
    KeyMismatchError,
    check_keys,
    check_weight_file,
    fill_position_encodings,
    load_checkpoint,
    load_into,
    load_official_reference_unet,
    load_official_video_unet,
    motion_keys_from_diffusers,
    motion_keys_to_diffusers,
    read_unet_config,
)


def meta_state_dict(key_list: dict) -> dict:
    """A checkpoint with the official names and shapes and no data (meta tensors)."""
    return {k: torch.empty(s, device="meta") for k, s in key_list.items()}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(5, 2))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- files ----------------------------------------------------------------------------------------
def test_load_checkpoint_formats(tmp_path, small):
    sd = small.state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pth")
    torch.save(
        {"state_dict": sd, "epoch": 3}, tmp_path / "w.ckpt"
    )  # a training checkpoint wraps the state dict
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pt")
    for name in ("w.safetensors", "w.pth", "w.ckpt"):
        assert same(load_checkpoint(tmp_path / name), sd), name
    assert same(load_checkpoint(tmp_path / "dp.pt", strip_prefix="module."), sd)
    with pytest.raises(ValueError, match="lack it"):
        load_checkpoint(tmp_path / "w.pth", strip_prefix="module.")


def test_load_diffusers_folders(tmp_path, small):
    sd = small.state_dict()
    (tmp_path / "plain").mkdir()
    save_file(sd, tmp_path / "plain" / "diffusion_pytorch_model.safetensors")
    assert same(load_checkpoint(tmp_path / "plain"), sd)
    # a pipeline folder: weights under unet/ (found by default) or any subfolder by name
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    torch.save(sd, tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin")
    assert same(load_checkpoint(tmp_path / "pipe"), sd)
    assert same(load_checkpoint(tmp_path / "pipe", subfolder="unet"), sd)
    # sharded safetensors with an index
    shard = tmp_path / "sharded"
    shard.mkdir()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:2]}, shard / "a.safetensors")
    save_file({k: sd[k] for k in keys[2:]}, shard / "b.safetensors")
    index = {"weight_map": {k: ("a.safetensors" if i < 2 else "b.safetensors") for i, k in enumerate(keys)}}
    (shard / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert same(load_checkpoint(shard), sd)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights at"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weight file type"):
        load_checkpoint(tmp_path / "w.npz")
    torch.save({"a": torch.zeros(1), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint(tmp_path / "mixed.pth")
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_unet_config(tmp_path / "empty")


# --- key checks -----------------------------------------------------------------------------------
def test_wrong_checkpoint_names_its_keys_and_leaves_the_model_untouched(small):
    before = {k: v.clone() for k, v in small.state_dict().items()}
    bad = {k: torch.randn_like(v) for k, v in small.state_dict().items()}
    del bad["0.bias"]
    bad["2.extra"] = torch.zeros(1)
    bad["1.weight"] = torch.zeros(7)
    with pytest.raises(KeyMismatchError) as err:
        load_into(small, bad)
    msg = str(err.value)
    assert "1 missing keys" in msg and "0.bias" in msg
    assert "1 unexpected keys" in msg and "2.extra" in msg
    assert "1.weight model (4,) vs checkpoint (7,)" in msg
    assert isinstance(err.value, ValueError) and err.value.report.missing == ["0.bias"]
    assert same(small.state_dict(), before)  # nothing was loaded
    good = {k: torch.randn_like(v) for k, v in small.state_dict().items()}
    load_into(small, good)
    assert same(small.state_dict(), good)
    load_into(small, before)


def test_check_keys_patterns(small):
    sd = dict(small.state_dict())
    sd["conv_out.weight"] = torch.zeros(1)
    del sd["2.weight"]
    report = check_keys(small, sd, ignore_missing=("2.",), ignore_unexpected=("conv_out.",))
    assert report.ok
    assert check_keys(small, {"2.weight": sd["2.bias"]}, subset="2.").mismatched == [
        ("2.weight", (2, 5), (2,))
    ]


# --- SD1.5 and the official checkpoints at full size (meta) ---------------------------------------
@pytest.fixture(scope="module")
def sd15_models():
    with torch.device("meta"):
        return VideoUNet(SD15.unet, MOTION_SD15), ReferenceUNet(SD15.unet), build_unet2d(SD15.unet)


def test_sd15_and_official_checkpoints_load_by_name(sd15_models):
    denoiser, reference, unet2d = sd15_models
    sd15 = unet2d.state_dict()  # what unet/diffusion_pytorch_model.safetensors holds: diffusers' names
    denoiser.load_2d_weights(sd15, assign=True)  # motion modules missing: allowed, they keep their init
    reference.load_weights(sd15, assign=True)  # conv_norm_out/conv_out unexpected: allowed, unused
    official = CHECKPOINT_KEYS / "aa"
    reference.load_weights(meta_state_dict(read_key_list(official / "reference_unet.txt")), assign=True)
    full = read_key_list(official / "denoising_unet_full.txt")
    stage1 = {k: s for k, s in full.items() if "motion_modules" not in k}  # denoising_unet.pth, 686 keys
    assert len(stage1) == 686
    denoiser.load_2d_weights(meta_state_dict(stage1), assign=True)
    motion = read_key_list(official / "motion_module.txt")
    denoiser.load_motion_modules(meta_state_dict(motion), assign=True)
    # the same file without its position encodings (as diffusers' converter writes it) loads too
    no_pe = {k: s for k, s in motion.items() if not k.endswith("pos_encoder.pe")}
    assert len(no_pe) == 588 - 42
    denoiser.load_motion_modules(meta_state_dict(no_pe), assign=True)


def test_wrong_files_for_the_sd15_unet_are_named(sd15_models):
    denoiser, reference, unet2d = sd15_models
    motion = meta_state_dict(read_key_list(CHECKPOINT_KEYS / "aa" / "motion_module.txt"))
    with pytest.raises(KeyMismatchError, match="686 missing keys") as err:
        denoiser.load_2d_weights(motion)  # the motion file given as the UNet
    assert "conv_in.weight" in str(err.value) and "unexpected" not in str(
        err.value
    )  # motion keys are its own
    with pytest.raises(KeyMismatchError, match="2 missing keys"):
        partial = dict(motion)
        partial.pop("mid_block.motion_modules.0.temporal_transformer.proj_out.bias")
        partial.pop("mid_block.motion_modules.0.temporal_transformer.proj_in.bias")
        denoiser.load_motion_modules(partial)
    with pytest.raises(KeyMismatchError, match="4 missing keys.*conv_norm_out.weight"):
        # reference_unet.pth has no output head: it cannot be the denoiser's 2D weights
        denoiser.load_2d_weights(
            meta_state_dict(read_key_list(CHECKPOINT_KEYS / "aa" / "reference_unet.txt"))
        )
    with pytest.raises(KeyMismatchError, match="other shapes"), torch.device("meta"):
        VideoUNet(TINY.unet, MOTION_TINY).load_2d_weights(unet2d.state_dict())  # SD15 weights, TINY model
    with pytest.raises(KeyMismatchError, match="unexpected keys.*pose"):
        reference.load_weights(
            {**unet2d.state_dict(), "pose_guider.conv_in.weight": torch.empty(1, device="meta")}
        )


def test_motion_keys_map_onto_diffusers_motion_adapter(sd15_models):
    denoiser = sd15_models[0]
    ours = {k: v for k, v in denoiser.state_dict().items() if "motion_modules" in k}
    with torch.device("meta"):
        adapter = MotionAdapter(
            block_out_channels=SD15.unet["block_out_channels"],
            motion_layers_per_block=2,
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            motion_max_seq_length=32,
            use_motion_mid_block=True,
        )
    theirs = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in motion_keys_to_diffusers(ours).items()} == theirs
    back = motion_keys_from_diffusers(adapter.state_dict())
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_position_encodings_filled_from_the_formula():
    with torch.device("meta"):
        model = VideoUNet(TINY.unet, MOTION_TINY)
    own = model.state_dict()
    expected = [k for k in own if "motion_modules" in k]
    partial = {k: torch.zeros(own[k].shape) for k in expected if not k.endswith("pe")}
    filled = fill_position_encodings(partial, 32, expected)
    key = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0."
    key += "attention_blocks.1.pos_encoder.pe"
    assert torch.equal(filled[key], sinusoidal_position_encoding(32, 64))
    assert set(filled) == set(expected)


# --- end to end: files on disk -> from_pretrained -> the same outputs -----------------------------
def test_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    source = VideoUNet(TINY.unet, MOTION_TINY).eval()
    with torch.no_grad():
        for _, m in source.motion_modules():
            m.temporal_transformer.proj_out.weight.normal_(0, 0.2)
    unet2d = build_unet2d(TINY.unet)
    unet2d.load_state_dict({k: v for k, v in source.state_dict().items() if "motion_modules" not in k})
    unet2d.save_pretrained(tmp_path / "sd" / "unet")  # a diffusers pipeline folder
    torch.save(
        {k: v for k, v in source.state_dict().items() if "motion_modules" in k},
        tmp_path / "motion_module.pth",
    )

    loaded = load_official_video_unet(
        tmp_path / "sd", tmp_path / "motion_module.pth", motion_kwargs=MOTION_TINY
    )
    reference = load_official_reference_unet(tmp_path / "sd")
    x, tokens = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 1, TINY.unet["cross_attention_dim"])
    with torch.no_grad():
        assert torch.equal(loaded(x, 5, tokens), source(x, 5, tokens))
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert same(
        reference.state_dict(),
        {
            k: v
            for k, v in unet2d.state_dict().items()
            if not k.startswith("conv_") or k.startswith("conv_in")
        },
    )
    # without a motion file but with motion kwargs: zero-initialised modules, built for real (not meta)
    stage1 = load_official_video_unet(tmp_path / "sd" / "unet", motion_kwargs=MOTION_TINY)
    assert not any(p.is_meta for p in stage1.parameters())
    with torch.no_grad():
        assert torch.equal(stage1(x, 5, tokens), load_official_video_unet(tmp_path / "sd")(x, 5, tokens))


# --- truncated and empty files: every loader names the file -----------------------------------------------
def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_safetensors_named(tmp_path, small, keep):
    file = tmp_path / "w.safetensors"
    save_file(dict(small.state_dict()), file)
    _truncate(file, keep)
    with pytest.raises(CorruptWeightsError, match=r"w\.safetensors: the weight file is truncated or corrupt"):
        load_checkpoint(file)
    with pytest.raises(CorruptWeightsError, match="truncated or corrupt"):
        check_weight_file(file)
    # in a model folder, and as one shard of a sharded folder
    folder = tmp_path / "folder"
    folder.mkdir()
    file.replace(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CorruptWeightsError, match="diffusion_pytorch_model.safetensors: .*truncated"):
        load_checkpoint(folder)
    shard = tmp_path / "sharded"
    shard.mkdir()
    sd = dict(small.state_dict())
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:2]}, shard / "a.safetensors")
    save_file({k: sd[k] for k in keys[2:]}, shard / "b.safetensors")
    index = {"weight_map": {k: ("a.safetensors" if i < 2 else "b.safetensors") for i, k in enumerate(keys)}}
    (shard / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _truncate(shard / "b.safetensors", keep)
    with pytest.raises(CorruptWeightsError, match=r"b\.safetensors: .*truncated or corrupt"):
        load_checkpoint(shard)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_torch_file_named(tmp_path, small, keep):
    file = tmp_path / "reference_unet.pth"
    torch.save(small.state_dict(), file)
    _truncate(file, keep)
    with pytest.raises(CorruptWeightsError, match=r"reference_unet\.pth: .*truncated or corrupt"):
        load_checkpoint(file)
    with pytest.raises(CorruptWeightsError, match=r"reference_unet\.pth: .*truncated or corrupt"):
        check_weight_file(file)


def test_complete_files_pass_the_check(tmp_path, small):
    save_file(dict(small.state_dict()), tmp_path / "w.safetensors")
    torch.save(small.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        assert check_weight_file(tmp_path / name) == tmp_path / name


def test_truncated_weights_in_pretrained_folders_named(tmp_path):
    """The from_pretrained paths (2D VAE, CLIP image encoder, causal VAE) name the truncated file too."""
    V.build_vae(TINY.get("vae")).save_pretrained(tmp_path / "vae")
    C.build_image_encoder(TINY.get("image_encoder")).save_pretrained(tmp_path / "enc")
    CausalVAE(**CAUSAL_VAE_TINY).save_pretrained(tmp_path / "cvae")
    cases = [
        (tmp_path / "vae" / "diffusion_pytorch_model.safetensors", lambda: V.load_vae(tmp_path / "vae")),
        (tmp_path / "enc" / "model.safetensors", lambda: C.load_image_encoder(tmp_path / "enc")),
        (
            tmp_path / "cvae" / "diffusion_pytorch_model.safetensors",
            lambda: CausalVAE.from_pretrained(tmp_path / "cvae"),
        ),
    ]
    for file, load in cases:
        load()  # complete: loads
        _truncate(file, 0.5)
        with pytest.raises(
            CorruptWeightsError, match=f"{file.name}: the weight file is truncated or corrupt"
        ):
            load()
        file.write_bytes(b"")
        with pytest.raises(CorruptWeightsError, match="truncated or corrupt"):
            load()


def test_one_list_of_weight_file_names():
    assert DIFFUSERS_WEIGHTS + TRANSFORMERS_WEIGHTS == WEIGHT_NAMES
    assert WEIGHT_NAMES[0] == causal_vae.WEIGHTS_NAME


def test_causal_vae_from_pretrained_uses_load_into(tmp_path):
    """A wrong file fails with load_into's KeyMismatchError (keys and shapes listed), the model untouched."""
    folder = tmp_path / "cvae"
    CausalVAE(**CAUSAL_VAE_TINY).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, latent_channels=8)))
    with pytest.raises(KeyMismatchError, match="keys with other shapes"):
        CausalVAE.from_pretrained(folder)
    # a whole-pipeline file with "vae." prefixes loads
    sd = load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({f"vae.{k}": v for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    back = CausalVAE.from_pretrained(folder)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_realign_copies_unaligned_tensors_and_keeps_their_values():
    from anim_lab.weights import realign

    layer = torch.nn.Linear(5, 3)
    torch.nn.init.normal_(layer.weight)
    storage = torch.empty(64, dtype=torch.float32)
    unaligned = storage[1:16].view(3, 5)  # starts 4 bytes into a 64-byte aligned block
    unaligned.copy_(layer.weight.detach())
    layer.weight = torch.nn.Parameter(unaligned)
    assert layer.weight.data_ptr() % 64 == 4
    bias_ptr = layer.bias.data_ptr()
    expected = layer.weight.detach().clone()
    realign(layer)
    assert layer.weight.data_ptr() % 64 == 0 and isinstance(layer.weight, torch.nn.Parameter)
    assert torch.equal(layer.weight, expected) and layer.weight.requires_grad
    assert layer.bias.data_ptr() == bias_ptr  # aligned tensors are left where they are
