"""anim_lab.toy.talking_mesh (Audio2Mesh's data) and the lip-sync metrics in anim_lab.metrics."""

import math

import numpy as np
import pytest
import torch

from anim_lab import metrics, toy
from anim_lab.errors import InputError
from anim_lab.toy.renderer import face_vertices
from anim_lab.toy.talking_mesh import mean_offsets, shuffled

torch.set_num_threads(1)


def test_lip_vertex_error_is_faceformers_metric():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.randn(6, 478, 3, generator=g), torch.randn(6, 478, 3, generator=g)
    lips = metrics.lip_vertices()
    assert len(lips) == 40 and {13, 14, 61, 291, 0, 17} <= set(lips)
    # FaceFormer / CodeTalker's evaluation: squared distances, max over the lip vertices, mean over frames
    want = np.mean(np.max(np.sum(np.square(gt.numpy()[:, lips] - pred.numpy()[:, lips]), axis=2), axis=1))
    assert metrics.lip_vertex_error(pred, gt) == pytest.approx(float(want), rel=1e-6)
    from torchmetrics.functional.multimodal import lip_vertex_error

    assert metrics.lip_vertex_error(pred, gt) == pytest.approx(float(lip_vertex_error(pred, gt, list(lips))))
    # hand-worked: one lip vertex 3-4-0 away in frame 0, nothing in frame 1
    a = torch.zeros(2, 478, 3)
    b = a.clone()
    b[0, 13] = torch.tensor([3.0, 4.0, 0.0])
    assert metrics.lip_vertex_error(b, a) == 12.5 and metrics.lip_vertex_error(b, a, squared=False) == 2.5
    with pytest.raises(InputError):
        metrics.lip_vertex_error(a, a[:1])


def test_mouth_opening_and_its_correlation():
    mesh = toy.talking_mesh(toy.identity_from_seed(1), toy.synthesize("Mum ate a plum."), fps=25)
    opening = metrics.mouth_opening(mesh.vertices)
    assert opening.shape == (mesh.num_frames,) and opening.max() > 2 * opening.min()
    gap = np.linalg.norm(mesh.vertices[:, 13] - mesh.vertices[:, 14], axis=-1)
    height = np.linalg.norm(mesh.vertices[:, 10] - mesh.vertices[:, 152], axis=-1)
    np.testing.assert_allclose(opening.numpy(), gap / height, rtol=1e-6)
    assert metrics.mouth_opening_correlation(mesh.vertices, mesh.vertices) == pytest.approx(1.0)
    still = np.repeat(mesh.neutral[None], mesh.num_frames, 0)
    assert math.isnan(metrics.mouth_opening_correlation(still, mesh.vertices))  # the mean face never moves
    want = np.corrcoef(opening.numpy()[::-1], opening.numpy())[0, 1]
    assert metrics.mouth_opening_correlation(mesh.vertices[::-1], mesh.vertices) == pytest.approx(want)


def test_the_mesh_is_the_talking_clips_face_before_its_pose():
    speech = toy.synthesize("Bob spoke.", toy.Voice("en-us+f3", rate=170))
    identity = toy.identity_from_seed(4)
    clip = toy.make_talking_clip(identity, speech, fps=25, size=64, seed=9)
    full = toy.talking_mesh(identity, speech, fps=25, expression="full", seed=9)
    assert full.num_frames == clip.num_frames
    np.testing.assert_array_equal(full.audio, clip.audio)
    want = np.stack([face_vertices(identity, e) for e in clip.expressions])  # (F, 478, 3)
    np.testing.assert_allclose(full.vertices, want, atol=1e-6)
    np.testing.assert_array_equal(full.head_pose, clip.pose_array)
    # "speech": the jaw and lips only, no blinks or smile
    only = toy.talking_mesh(identity, speech, fps=25)
    no_motion = [
        face_vertices(
            identity,
            toy.Expression(
                mouth_open=e.mouth_open, lip_round=e.lip_round, lip_press=e.lip_press, lip_spread=e.lip_spread
            ),
        )
        for e in clip.expressions
    ]
    np.testing.assert_allclose(only.vertices, np.stack(no_motion), atol=1e-6)
    assert np.abs(only.offsets[:, metrics.lip_vertices()]).max() > 0.05  # the lips move (template units)
    with pytest.raises(InputError):
        toy.talking_mesh(identity, speech, expression="blink")


def test_dataset_splits_and_the_baselines():
    train, heldout = toy.TalkingMeshDataset("train", 3), toy.TalkingMeshDataset("heldout", 3)
    assert {x.speech.voice.name for x in heldout} <= set(toy.VOICE_SPLIT["heldout"])
    assert {x.speech.text for x in heldout} <= {toy.SENTENCES[i] for i in toy.SENTENCE_SPLIT["heldout"]}
    assert {x.speech.voice.name for x in train} <= set(toy.VOICE_SPLIT["train"])
    assert all(x.identity.seed >= 1_000_000 for x in heldout) and all(x.identity.seed < 10_000 for x in train)
    again = toy.TalkingMeshDataset("train", 3)
    np.testing.assert_array_equal(again[2].offsets, train[2].offsets)  # a pure function of (split, seed, i)
    mean = mean_offsets(list(train))
    frames = np.concatenate([x.offsets for x in train])
    np.testing.assert_allclose(mean, frames.mean(0), atol=1e-7)
    feats = [
        torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2) + 100 * k for k, n in enumerate((5, 9, 7))
    ]
    mixed = shuffled(feats, seed=1)
    assert [len(m) for m in mixed] == [5, 9, 7]
    owners = [int(m[0, 0]) // 100 for m in mixed]
    assert sorted(owners) == [0, 1, 2] and all(o != k for k, o in enumerate(owners))  # nobody keeps its own
    with pytest.raises(InputError):
        toy.TalkingMeshDataset("test", 3)
