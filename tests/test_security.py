"""A planted malicious pickle is refused on every loading path, and never runs.

The pickle below calls ``open(marker, "w")`` when it is unpickled: if any loader unpickled it without
``weights_only=True``, the marker file would appear. Every test asserts that an error naming the file is
raised *and* that the marker does not exist.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_pipeline import tiny_pipeline
from test_pipeline_official import write_official

from anim_lab.clip import load_image_encoder
from anim_lab.configs import TINY
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.vae import load_vae
from anim_lab.weights import (
    CorruptWeightsError,
    UnsafeWeightsError,
    check_weight_file,
    load_checkpoint,
    load_official_pipeline,
    load_official_pose_guider,
    load_official_reference_unet,
    load_official_video_unet,
)


class _Payload:
    """Unpickling this creates ``marker`` (it stands for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> Path:
    """Overwrite ``path`` with a torch.save archive whose pickle runs the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv_in.weight": torch.ones(1), "payload": _Payload(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the malicious pickle ran"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_the_payload_would_run_without_weights_only(tmp_path):
    # the check that the tests below are not vacuous: the planted file does run code when fully unpickled
    marker = tmp_path / "PWNED"
    path = plant(tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.pth", "model.bin", "model.ckpt", "model.pt"])
def test_load_checkpoint_refuses_a_malicious_file(tmp_path, marker, name):
    path = plant(tmp_path / name, marker)
    with pytest.raises(UnsafeWeightsError, match=f"refused to load {path}"):
        load_checkpoint(path)
    with pytest.raises(UnsafeWeightsError, match="safetensors"):
        check_weight_file(path)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "pytorch_model.bin"])
def test_load_checkpoint_refuses_a_malicious_folder(tmp_path, marker, name):
    plant(tmp_path / "unet" / name, marker)
    with pytest.raises(UnsafeWeightsError, match=name):
        load_checkpoint(tmp_path)


def test_model_loaders_refuse_malicious_files(tmp_path, marker):
    path = plant(tmp_path / "w.pth", marker)
    with pytest.raises(UnsafeWeightsError, match="w.pth"):
        load_official_video_unet(path, unet_kwargs=TINY.unet)
    with pytest.raises(UnsafeWeightsError, match="w.pth"):
        load_official_video_unet(tmp_path / "w.pth", unet_kwargs=TINY.unet, motion_module=path)
    with pytest.raises(UnsafeWeightsError, match="w.pth"):
        load_official_reference_unet(path, unet_kwargs=TINY.unet)
    with pytest.raises(UnsafeWeightsError, match="w.pth"):
        load_official_pose_guider(path, **TINY.pose_guider)


def test_diffusers_vae_folder_loader_refuses(pipe, tmp_path, marker):
    """load_vae hands the folder to diffusers' AutoencoderKL.from_pretrained; the .bin is checked first."""
    pipe.vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    plant(tmp_path / "vae" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError, match="diffusion_pytorch_model.bin"):
        load_vae(tmp_path / "vae")


def test_transformers_image_encoder_folder_loader_refuses(pipe, tmp_path, marker):
    """load_image_encoder hands the folder to transformers' from_pretrained; the .bin is checked first."""
    pipe.image_encoder.save_pretrained(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    plant(tmp_path / "enc" / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        load_image_encoder(tmp_path / "enc")


def test_diffusers_and_transformers_refuse_on_their_own(pipe, tmp_path, marker):
    """Even without anim_lab's check, the installed diffusers/transformers do not run the pickle."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    pipe.vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    plant(tmp_path / "vae" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(Exception, match="diffusion_pytorch_model.bin|Weights only load failed"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")
    pipe.image_encoder.save_pretrained(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    plant(tmp_path / "enc" / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="Weights only load failed|pytorch_model.bin"):
        CLIPVisionModelWithProjection.from_pretrained(tmp_path / "enc")


OFFICIAL_FILES = [
    "denoising_unet.pth",
    "reference_unet.pth",
    "pose_guider.pth",
    "motion_module.pth",
    "sd-vae-ft-mse/diffusion_pytorch_model.bin",
    "image_encoder/pytorch_model.bin",
]


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_load_official_refuses_every_planted_file(pipe, tmp_path, marker, name):
    folder = write_official(tmp_path / "weights", pipe)
    if name.startswith("image_encoder/"):
        (folder / "image_encoder" / "model.safetensors").unlink()  # else the safetensors file is preferred
    plant(folder / name, marker)
    with pytest.raises(UnsafeWeightsError, match=Path(name).name):
        load_official_pipeline(folder, motion_kwargs=MOTION_TINY)


def test_load_official_prefers_safetensors_and_never_opens_the_pickle(pipe, tmp_path, marker):
    folder = write_official(tmp_path / "weights", pipe)
    state = {k: v.contiguous() for k, v in pipe.reference_unet.state_dict().items()}
    save_file(state, folder / "reference_unet.safetensors")
    plant(folder / "reference_unet.pth", marker)  # both exist: the safetensors file wins
    loaded = load_official_pipeline(folder, motion_kwargs=MOTION_TINY)
    assert all(torch.equal(v, loaded.reference_unet.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("component", ["vae", "image_encoder"])
def test_from_pretrained_refuses_a_planted_pickle(pipe, tmp_path, marker, component):
    pipe.save_pretrained(tmp_path / "p")
    folder = tmp_path / "p" / component
    name = "diffusion_pytorch_model" if component == "vae" else "model"
    (folder / f"{name}.safetensors").unlink()
    plant(folder / ("diffusion_pytorch_model.bin" if component == "vae" else "pytorch_model.bin"), marker)
    with pytest.raises(UnsafeWeightsError, match=".bin"):
        Pose2VideoPipeline.from_pretrained(tmp_path / "p")


def test_truncated_files_are_named(pipe, tmp_path):
    folder = write_official(tmp_path / "weights", pipe)
    path = folder / "motion_module.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match="motion_module.pth: the weight file is truncated"):
        load_official_pipeline(folder, motion_kwargs=MOTION_TINY)
    pipe.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "denoising_unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptWeightsError, match="denoising_unet/diffusion_pytorch_model.safetensors"):
        Pose2VideoPipeline.from_pretrained(tmp_path / "p")
    shutil.rmtree(tmp_path / "p")


# --- the training scripts: caches and training state are safetensors + JSON ---------------------------------
def _plant_state(path: Path, marker: Path) -> None:
    """A pickle where a state's .safetensors should be, with a plausible .json beside it."""
    plant(path.with_suffix(".safetensors"), marker)
    path.with_suffix(".json").write_text('{"__dict__": [["x", {"__tensor__": "/x"}]]}')


def test_train_toy_i2v_never_unpickles_its_cache_or_checkpoint(tmp_path, marker, capsys):
    import anim_lab

    T = anim_lab.load_script("train_toy_i2v")
    cache = tmp_path / "cache"
    cache.mkdir()
    _plant_state(cache / "train", marker)
    plant(cache / "train.pt", marker)  # the old name too: never read
    with pytest.raises(SystemExit):
        T.main(["--cache", str(cache), "--cache-only", "--train-clips", "1", "--test-clips", "1"])
    assert "train.safetensors is not a readable safetensors file" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _plant_state(ckpt / "ckpt", marker)
    with pytest.raises(SystemExit):  # refused before any cache is built
        T.main(["--resume", "--ckpt-dir", str(ckpt), "--cache", str(tmp_path / "c2"), "--train-clips", "1"])
    assert "ckpt.safetensors is not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()


def test_train_animator_never_unpickles_its_cache_or_checkpoint(tmp_path, marker, capsys):
    import json

    from test_train_animator import TINY

    import anim_lab

    T = anim_lab.load_script("train_animator")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    common = ["--stage", "1", "--model-config", str(tmp_path / "tiny.json"), "--num-items", "2"]
    common += ["--num-frames", "2", "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    _plant_state(tmp_path / "cache", marker)
    argv = [*common, "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache.safetensors")]
    assert T.main(argv) != 0
    assert "--cache: " in capsys.readouterr().err
    # a good cache, and a planted checkpoint state under --out
    T.build_cache(tmp_path / "good.safetensors", num_items=2, num_frames=2, fps=2.0, seed=0)
    (tmp_path / "run2" / "checkpoint").mkdir(parents=True)
    _plant_state(tmp_path / "run2" / "checkpoint" / "state", marker)
    plant(tmp_path / "run2" / "checkpoint" / "state.pt", marker)  # the old name: never read
    argv = [*common, "--out", str(tmp_path / "run2"), "--cache", str(tmp_path / "good.safetensors")]
    assert T.main(argv) != 0
    assert "cannot resume from" in capsys.readouterr().err


def test_no_unsafe_deserialisation_outside_the_tests():
    """No code outside tests/ may unpickle: no weights_only=False, pickle.load(s), np.load with
    allow_pickle=True, or torch.load without weights_only=True."""
    import re

    root = Path(__file__).resolve().parents[1]
    patterns = {
        "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
        "pickle.load": re.compile(r"\b(c?pickle|dill|joblib)\.loads?\("),
        "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
        "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    }
    sources = [
        p
        for folder in ("anim_lab", "scripts", "benchmarks", "chapters")
        for p in (root / folder).rglob("*.py")
        if ".ipynb_checkpoints" not in p.parts
    ]
    assert len(sources) > 40
    found = [
        f"{p.relative_to(root)}:{n}: {name}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        for name, pattern in patterns.items()
        if pattern.search(line)
    ]
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)
    # the check can fail: it finds each pattern in a line that has it
    for name, pattern in patterns.items():
        line = {"pickle.load": "x = pickle.load(f)", "torch.load without weights_only=True": "torch.load(p)"}
        assert pattern.search(line.get(name, f"np.load(p, {name})")), name


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_a_sharded_index_may_not_lead_out_of_its_folder(tmp_path, shard):
    """An index.json naming an absolute path or a '..' that leaves the folder is refused before any read, by
    load_checkpoint and by the folder loaders (vae / image encoder)."""
    import json

    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    folder = tmp_path / "unet"
    folder.mkdir()
    save_file({"v": torch.ones(2)}, folder / "inside.safetensors")
    index = {"weight_map": {"v": "inside.safetensors", "w": shard}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"names the shard '{shard}', which lies outside"):
        load_checkpoint(folder)
    with pytest.raises(ValueError, match="which lies outside"):
        load_vae(folder)
    # the same index with the shard inside the folder loads
    index["weight_map"]["w"] = "inside.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert set(load_checkpoint(folder)) == {"v"}
