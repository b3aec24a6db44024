"""anim_lab.audio2mesh and anim_lab.audio2pose: AniPortrait's audio models against plain implementations of
the reference semantics (tiny sizes, random nonzero weights, fixed seeds), and their official checkpoints
loaded by key from files written here in the reference's layout (the old weight-norm names included)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from anim_lab import weights
from anim_lab.audio2mesh import Audio2Mesh
from anim_lab.audio2pose import (
    Audio2Pose,
    alibi_mask,
    alibi_slopes,
    audio_pose_sequence,
    pose_chunks,
    smooth_poses,
    tile_pose_template,
)
from anim_lab.errors import InputError

torch.set_num_threads(1)
MICRO_W2V = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    mask_time_prob=0.05,
    feat_extract_norm="group",
    do_stable_layer_norm=False,
)
POSE = dict(
    latent_dim=16, num_layers=2, num_heads=2, ff_dim=32, max_len=64, num_ids=5, encoder_config=MICRO_W2V
)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def old_weight_norm_names(state_dict: dict) -> dict:
    """The keys as torch < 2.1 (AniPortrait's torch 2.0.1) names wav2vec2's weight-normalised convolution."""
    rename = {
        "parametrizations.weight.original0": "weight_g",
        "parametrizations.weight.original1": "weight_v",
    }
    out = {}
    for k, v in state_dict.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def plain_wav2vec2_states(encoder: Wav2Vec2Model, values: torch.Tensor, num_frames: int) -> torch.Tensor:
    """AniPortrait's Wav2Vec2Model.forward with transformers' own encoder: CNN, interpolation, projection,
    encoder."""
    extract = encoder.feature_extractor(values).transpose(1, 2)  # (B, T, C)
    extract = F.interpolate(extract.transpose(1, 2), size=num_frames, align_corners=True, mode="linear")
    hidden, _ = encoder.feature_projection(extract.transpose(1, 2))
    return encoder.encoder(hidden).last_hidden_state


# --- Audio2Mesh ---
def test_audio2mesh_is_the_reference_computation_and_starts_at_zero():
    torch.manual_seed(0)
    fresh = Audio2Mesh(num_vertices=478, latent_dim=12, encoder_config=MICRO_W2V).eval()
    values = torch.randn(1, 16000)
    assert (
        fresh(values, 30).shape == (1, 30, 478, 3) and fresh(values, 30).abs().max() == 0
    )  # zero-initialised
    model = randomize(fresh)
    with torch.no_grad():
        want = model.out_fn(model.in_fn(plain_wav2vec2_states(model.audio_encoder, values, 30)))
        got = model(values, 30)
    torch.testing.assert_close(got, want.reshape(1, 30, 478, 3), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in model.audio_encoder.feature_extractor.parameters())  # CNN frozen


def test_audio2mesh_without_encoder_takes_features():
    model = randomize(Audio2Mesh(num_vertices=5, latent_dim=4, feature_dim=80))
    feats = torch.randn(2, 7, 80)
    torch.testing.assert_close(model(features=feats), model.out_fn(model.in_fn(feats)).reshape(2, 7, 5, 3))
    with pytest.raises(InputError, match="no audio encoder"):
        model(torch.randn(1, 16000), 30)
    with pytest.raises(InputError, match="not both"):
        Audio2Mesh(feature_dim=80, encoder_config=MICRO_W2V)


def test_full_size_audio2mesh_builds_on_meta():
    with torch.device("meta"):
        model = Audio2Mesh()
    shapes = weights.expected_shapes(model)
    assert shapes["in_fn.weight"] == (512, 768) and shapes["out_fn.weight"] == (1404, 512)
    assert shapes["audio_encoder.masked_spec_embed"] == (768,)
    assert sum(p.numel() for p in model.audio_encoder.parameters()) == 94_371_712  # wav2vec2-base
    assert sum(p.numel() for p in model.parameters()) - 94_371_712 == 768 * 512 + 512 + 512 * 1404 + 1404


class Planted:
    """An object a pickle would rebuild (and could run code for)."""


class ReferenceAudio2Mesh(nn.Module):
    """The layout of AniPortrait's Audio2MeshModel: attribute names and shapes only."""

    def __init__(self, config, out_dim, latent_dim):
        super().__init__()
        self.audio_encoder = Wav2Vec2Model(Wav2Vec2Config(**config))
        self.in_fn = nn.Linear(self.audio_encoder.config.hidden_size, latent_dim)
        self.out_fn = nn.Linear(latent_dim, out_dim)


def test_official_audio2mesh_loads_by_key_from_a_reference_layout_file(tmp_path):
    torch.manual_seed(1)
    reference = randomize(ReferenceAudio2Mesh(MICRO_W2V, out_dim=3 * 468, latent_dim=12), seed=3)
    state = old_weight_norm_names(reference.state_dict())
    assert "audio_encoder.encoder.pos_conv_embed.conv.weight_g" in state
    torch.save(state, tmp_path / "audio2mesh.pt")
    model = weights.load_official_audio2mesh(
        tmp_path / "audio2mesh.pt", latent_dim=12, encoder_config=MICRO_W2V
    )
    values = torch.randn(1, 8000)
    with torch.no_grad():
        want = reference.out_fn(reference.in_fn(plain_wav2vec2_states(reference.audio_encoder, values, 15)))
        torch.testing.assert_close(model(values, 15), want.reshape(1, 15, 468, 3), rtol=1e-5, atol=1e-6)
    # a file of another model is refused with the keys named, the model untouched
    torch.save({"in_fn.weight": torch.zeros(12, 16), "note": Planted()}, tmp_path / "planted.pt")
    with pytest.raises(weights.UnsafeWeightsError, match="planted.pt"):  # read with weights_only=True
        weights.load_official_audio2mesh(tmp_path / "planted.pt", latent_dim=12, encoder_config=MICRO_W2V)
    torch.save({"in_fn.weight": torch.zeros(12, 16)}, tmp_path / "wrong.pt")
    with pytest.raises(weights.KeyMismatchError, match="missing keys"):
        weights.load_official_audio2mesh(tmp_path / "wrong.pt", latent_dim=12, encoder_config=MICRO_W2V)


# --- Audio2Pose: the masks, the decoder, the chunks ---
def reference_biased_mask(n_head: int, max_len: int) -> torch.Tensor:
    """FaceFormer's init_biased_mask (period 1) written out with loops."""
    slopes = [2 ** (-8 * (h + 1) / n_head) for h in range(n_head)]  # a power-of-two head count
    mask = torch.full((n_head, max_len, max_len), float("-inf"))
    for h in range(n_head):
        for i in range(max_len):
            for j in range(i + 1):
                mask[h, i, j] = -slopes[h] * (i - j)
    return mask


def test_alibi_mask_and_slopes():
    torch.testing.assert_close(alibi_mask(8, 12), reference_biased_mask(8, 12))
    torch.testing.assert_close(alibi_mask(2, 5), reference_biased_mask(2, 5))
    assert alibi_slopes(8) == [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]  # 4 + every other of 8


def reference_decode(model: Audio2Pose, memory: torch.Tensor, id_seed: torch.Tensor, seq_len: int):
    """Audio2PoseModel.infer after the audio encoder, for one clip: masks built with loops, (H, L, L) mask."""
    mask_all = reference_biased_mask(model.config.num_heads, model.config.max_len)
    id_embedding = model.id_embed(id_seed).unsqueeze(1)
    pose_emb = model.pose_map(torch.zeros(1, 1, model.config.pose_dim))
    for _ in range(seq_len):
        length = pose_emb.shape[1]
        pose_input = pose_emb + model.PPE.pe[:, :length] + id_embedding
        memory_mask = torch.ones(length, memory.shape[1])
        for i in range(length):
            memory_mask[i, i] = 0
        out = model.transformer_decoder(
            pose_input, memory, tgt_mask=mask_all[:, :length, :length], memory_mask=memory_mask == 1
        )
        out = model.pose_map_r(out)
        pose_emb = torch.cat((pose_emb, model.pose_map(out[:, -1, :]).unsqueeze(1)), 1)
    return out


def test_audio2pose_decoding_is_the_reference_loop():
    torch.manual_seed(0)
    model = randomize(Audio2Pose(**POSE), seed=5)
    pe = model.PPE.pe[0]
    assert torch.allclose(
        pe[3, 0::2], torch.sin(3 * torch.exp(torch.arange(0, 16, 2) * (-math.log(1e4) / 16)))
    )
    values = torch.randn(1, 12000)
    ids = torch.tensor([3])
    with torch.no_grad():
        memory = model.memory(values, 20)  # (1, 20, 16)
        torch.testing.assert_close(
            memory, model.in_fn(plain_wav2vec2_states(model.audio_encoder, values, 20))
        )
        got = model.decode(memory, ids)
        want = reference_decode(model, memory, ids, 20)
        assert got.shape == (1, 20, 6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # a batch of two decodes each clip as alone (the per-head mask repeated per clip)
        both = model.decode(torch.cat([memory, memory.flip(1)]), torch.tensor([3, 1]))
        torch.testing.assert_close(both[0], got[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            both[1], reference_decode(model, memory.flip(1), torch.tensor([1]), 20)[0], rtol=1e-5, atol=1e-6
        )
        # teacher forcing on the model's own outputs gives them back (causal masks: one pass = the loop)
        torch.testing.assert_close(model(memory, got, ids), got, rtol=1e-4, atol=1e-5)


def reference_chunks(num_samples: int, seq_len: int, sr=16000, fps=30, chunk_duration=5):
    """app.py's chunking on sample counts: split, seq_len % 150 for the last, merge the last two."""
    chunk_size = sr * chunk_duration
    chunks = [min(chunk_size, num_samples - s) for s in range(0, num_samples, chunk_size)]
    seq_lens = [chunk_duration * fps] * (len(chunks) - 1) + [seq_len % (chunk_duration * fps)]
    chunks[-2] = chunks[-2] + chunks[-1]
    seq_lens[-2] = seq_lens[-2] + seq_lens[-1]
    return chunks[:-1], seq_lens[:-1]


def test_pose_chunks_follow_the_reference_and_fix_its_breaks():
    for seconds in (5.3, 7.9, 10.2, 12.5, 17.0, 23.7):
        n = int(seconds * 16000)
        frames = math.ceil(n / 16000 * 30)
        sizes, seq_lens = reference_chunks(n, frames)
        got = pose_chunks(n, frames)
        assert [e - s for s, e, _ in got] == sizes and [f for _, _, f in got] == seq_lens
        assert got[0][0] == 0 and got[-1][1] == n and sum(seq_lens) == frames
    assert pose_chunks(64000, 120) == [(0, 64000, 120)]  # ≤ 5 s: one chunk (the reference raises IndexError)
    # exactly 10 s: the reference gives the last chunk 300 % 150 = 0 frames, so 150 poses for 300 mesh frames
    assert sum(reference_chunks(160000, 300)[1]) == 150
    assert pose_chunks(160000, 300) == [(0, 160000, 300)]


def test_smoothing_and_the_template_fallback():
    rng = np.random.default_rng(0)
    poses = rng.normal(size=(11, 6))
    want = np.stack([poses[max(0, i - 3) : min(11, i + 4)].mean(0) for i in range(11)])
    np.testing.assert_allclose(smooth_poses(poses, 7), want, rtol=1e-12)
    template = rng.normal(size=(5, 6))
    mirrored = np.concatenate((template, template[-2:0:-1]), axis=0)
    for n in (3, 8, 8 * 3 + 5):
        want = np.tile(mirrored, (n // len(mirrored) + 1, 1))[:n]
        np.testing.assert_array_equal(tile_pose_template(template, n), want)
    assert [int(i) for i in tile_pose_template(np.arange(4)[:, None], 9)[:, 0]] == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    with pytest.raises(InputError):
        tile_pose_template(np.zeros((0, 6)), 4)


def test_audio_pose_sequence_chunks_scales_and_smooths():
    torch.manual_seed(0)
    model = randomize(Audio2Pose(**dict(POSE, max_len=400)), seed=2)
    n = int(5.5 * 16000)
    values = torch.randn(1, n)
    frames = math.ceil(n / 16000 * 30)
    with torch.no_grad():
        raw = model.decode(model.memory(values, frames), torch.tensor([4]))[0].numpy()  # one merged chunk
    raw[:, :3] *= 0.5
    got = audio_pose_sequence(model, values, frames, id_seed=4)
    np.testing.assert_allclose(got, smooth_poses(raw, 7), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="id_seed"):
        audio_pose_sequence(model, values, frames, id_seed=5)


class ReferenceAudio2Pose(nn.Module):
    """The layout of AniPortrait's Audio2PoseModel (names and shapes), at a tiny size."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = Wav2Vec2Model(Wav2Vec2Config(**MICRO_W2V))
        self.pose_map = nn.Linear(6, 16)
        self.in_fn = nn.Linear(16, 16)
        self.PPE = nn.Module()
        self.PPE.register_buffer("pe", torch.randn(1, 64, 16))
        layer = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
        self.transformer_decoder = nn.TransformerDecoder(layer, num_layers=2)
        self.pose_map_r = nn.Linear(16, 6)
        self.id_embed = nn.Embedding(5, 16)


def test_official_audio2pose_loads_by_key(tmp_path):
    reference = randomize(ReferenceAudio2Pose(), seed=7)
    torch.save(old_weight_norm_names(reference.state_dict()), tmp_path / "audio2pose.pt")
    model = weights.load_official_audio2pose(tmp_path / "audio2pose.pt", **POSE)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    torch.testing.assert_close(model.biased_mask, alibi_mask(2, 64))  # computed, not in the file
    with torch.device("meta"):
        full = Audio2Pose()
    shapes = weights.expected_shapes(full)
    assert shapes["PPE.pe"] == (1, 600, 512) and shapes["id_embed.weight"] == (100, 512)
    assert shapes["transformer_decoder.layers.7.multihead_attn.in_proj_weight"] == (1536, 512)
    assert shapes["transformer_decoder.layers.7.linear1.weight"] == (1024, 512)
    assert "biased_mask" not in shapes


def test_audio2pose_round_trips_through_a_diffusers_folder(tmp_path):
    model = randomize(Audio2Pose(**POSE), seed=11)
    model.save_pretrained(tmp_path / "a2p")
    loaded = Audio2Pose.from_pretrained(tmp_path / "a2p").eval()
    torch.testing.assert_close(loaded.biased_mask, alibi_mask(2, 64))
    memory = torch.randn(1, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.decode(memory, torch.tensor([2])), model.decode(memory, torch.tensor([2]))
        )
