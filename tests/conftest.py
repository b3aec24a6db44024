"""Shared test setup: offline hub, fixed seeds, and the gpu marker's skip."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def pytest_configure(config):
    import torch

    # The unit tests run tiny tensors, where a second thread costs more in hand-over than it saves (and on a
    # busy machine much more): one thread keeps the suite fast and its timings steady.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def pair():
    """diffusers' AutoencoderKLHunyuanVideo at TINY size (random, framewise tiling off) and anim_lab's
    CausalVAE holding the same state dict, loaded strictly. One pair per test module."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    from anim_lab.causal_vae import CAUSAL_VAE_TINY, CausalVAE

    torch.manual_seed(0)
    ref = AutoencoderKLHunyuanVideo(**CAUSAL_VAE_TINY).eval()
    ref.use_framewise_encoding = ref.use_framewise_decoding = False
    ours = CausalVAE(**CAUSAL_VAE_TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="session")
def tiny_animator_weights(tmp_path_factory):
    """A tiny animator with motion modules, every weight random and nonzero, written by train_animator.py in
    the toy_animator layout (with the frozen image_encoder/). Shared by the demo, eval and retarget tests."""
    from test_train_animator import TINY

    import anim_lab
    from anim_lab.plain import randomize

    T = anim_lab.load_script("train_animator")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    animator = T.Animator(TINY, stage=2)
    randomize(animator, 1)
    folder = tmp_path_factory.mktemp("tiny") / "toy_animator"
    T.write_weights(animator, folder)
    return folder
