"""scripts/train_joint.py, the joint model's training skeleton (issue 28 §4): a smoke run on the TINY UNet,
what it trains, the checkpoint and its resume."""

import json

import pytest
import torch

import anim_lab
from anim_lab.files import OutputError, load_state
from anim_lab.plain import randomize
from anim_lab.vae import load_toy_vae

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on adapter 2+


def test_the_joint_training_skeleton_runs_checkpoints_and_resumes(tmp_path):
    script = anim_lab.load_script("train_joint")
    args = ["--out", str(tmp_path), "--smoke", "--batch", "1", "--ckpt-every", "1"]
    record = script.main([*args, "--steps", "2"])
    assert [e["step"] for e in record["log"]] == [1, 2] and all(e["loss"] > 0 for e in record["log"])
    state = load_state(tmp_path / "ckpt.safetensors")
    assert state["step"] == 2
    trained = state["trainable"]
    assert trained and all(".lora_" in k or ".joint_conv." in k for k in trained)  # the base stays frozen
    names = {k.split(".lora_")[-1].split(".")[1] for k in trained if ".lora_" in k}
    assert names == {"y", "xy", "yx"}
    assert any(".attn1.joint_attn.to_q.lora_A.xy." in k for k in trained)
    assert not any(".attn1.to_q.lora_A.xy." in k or ".joint_attn.to_q.lora_A.y." in k for k in trained)
    fresh = script.build_joint_unet(smoke=True, rank=8)
    before = script.trainable_state(fresh)
    assert before.keys() == trained.keys()
    conv = next(k for k in trained if k.endswith("joint_conv.weight"))
    assert before[conv].abs().max() == 0 and trained[conv].abs().max() > 0  # the zero conv has opened
    with pytest.raises(OutputError, match="--resume"):
        script.main([*args, "--steps", "3"])
    record = script.main([*args, "--steps", "3", "--resume"])
    assert [e["step"] for e in record["log"]] == [1, 2, 3]
    assert json.loads((tmp_path / "train_log.json").read_text())["log"][-1]["step"] == 3


def test_sample_pairs_generates_both_members_and_the_independent_baseline():
    script = anim_lab.load_script("train_joint")
    unet = script.build_joint_unet(smoke=True, rank=2)

    randomize(unet, 0).eval()  # the joint convs nonzero: the joint path changes the pairs
    vae = load_toy_vae()
    kw = dict(num_pairs=2, size=64, num_inference_steps=2)
    x, y = script.sample_pairs(unet, vae, generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == y.shape == (2, 3, 64, 64)
    assert x.min() >= -1 and x.max() <= 1 and y.min() >= 0 and y.max() <= 1
    x2, y2 = script.sample_pairs(unet, vae, joint=False, generator=torch.Generator().manual_seed(0), **kw)
    assert (x - x2).abs().max() > 1e-3 and (y - y2).abs().max() > 1e-3
