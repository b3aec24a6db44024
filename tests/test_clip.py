"""anim_lab.clip: preprocessing vs transformers, tokens, zero uncond, similarity, tokenizer, loading, real
size."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as transformers_logging

from anim_lab import clip as C
from anim_lab import configs

WORDS = ["red", "blue", "hair", "eyes", "mouth", "open", "closed", ","]


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**configs.TINY.image_encoder)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return C.build_word_tokenizer(WORDS, model_max_length=8)


@pytest.fixture(scope="module")
def tiny_clip(tokenizer):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=8,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(configs.TINY.image_encoder),
        projection_dim=32,
    )
    return CLIPModel(cfg).eval()


def _uint8_images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(b, 3, max(h // 8, 1), max(w // 8, 1), generator=g)
    return (torch.nn.functional.interpolate(small, (h, w), mode="bilinear") * 255).round().to(torch.uint8)


@pytest.mark.parametrize(
    "h,w,size,crop", [(128, 128, 224, 224), (90, 140, 224, 224), (160, 120, 64, 48), (128, 128, 128, 96)]
)
def test_preprocess_matches_transformers(h, w, size, crop):
    u8 = _uint8_images(2, h, w)
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    expected = proc([im.permute(1, 2, 0).numpy() for im in u8], return_tensors="pt").pixel_values
    ours = C.ClipPreprocess.from_processor(proc)(u8.float() / 127.5 - 1)
    assert ours.shape == expected.shape == (2, 3, crop, crop)
    # PIL rounds its resized image to uint8: differences stay within about one grey level (1/255/std = 0.015)
    assert (ours - expected).abs().max() < 0.03
    assert (ours - expected).abs().mean() < 0.008


def test_from_uint8_is_bit_exact_with_transformers_on_every_level():
    """u / 255 in float32 gives CLIPImageProcessor's pixel values bit for bit on all 256 levels; going through
    [-1, 1] and back (x / 127.5 - 1, then (x + 1) / 2) moves some of them by a float32 step."""
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)  # every level
    proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    expected = proc([u8[0].permute(1, 2, 0).numpy()], return_tensors="pt").pixel_values
    ours = C.ClipPreprocess.from_processor(proc).from_uint8(u8)
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours, expected)
    round_trip = C.ClipPreprocess.from_processor(proc)(u8.float() / 127.5 - 1)
    moved = (round_trip != expected).any(dim=1).sum().item()  # levels moved in any channel
    assert 0 < moved < 256 and (round_trip - expected).abs().max() < 1e-6
    with pytest.raises(ValueError, match="uint8 pixels"):
        C.ClipPreprocess().from_uint8(u8.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        C.ClipPreprocess().from_uint8(u8[:, :2])


def test_preprocess_bad_inputs():
    p = C.ClipPreprocess()
    x = _uint8_images(1, 32, 32).float() / 127.5 - 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        p(x[0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        p((x + 1) * 127.5)
    with pytest.raises(TypeError, match="float"):
        p(((x + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="larger than the resized"):
        C.ClipPreprocess(size=32, crop_size=64)(x)


@torch.no_grad()
def test_encode_image_tokens(tiny_encoder):
    u8 = _uint8_images(3, 40, 48, seed=1)
    tokens = C.encode_image(tiny_encoder, u8.float() / 127.5 - 1)
    assert tokens.shape == (3, 1, configs.TINY.image_encoder["projection_dim"])  # (B, 1, D)
    # the independent path: transformers' processor -> the model's image_embeds
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pv = proc([im.permute(1, 2, 0).numpy() for im in u8], return_tensors="pt").pixel_values
    expected = tiny_encoder(pixel_values=pv).image_embeds[:, None]
    torch.testing.assert_close(tokens, expected, atol=0.02, rtol=0.02)
    uncond = C.uncond_tokens_like(tokens)
    assert uncond.shape == tokens.shape and not uncond.any()
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        C.image_embeds_to_tokens(tokens)


def test_zero_tokens_give_a_constant_cross_attention():
    """Zero context -> keys = values = 0 (SD's to_k/to_v have no bias): cross-attention returns to_out's bias,
    the same for every query, so the unconditional branch carries no image information at all."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    hidden = torch.randn(3, 10, 16)  # (B, N, C) queries from the UNet feature map
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=torch.zeros(3, 1, 8))
        out_cond = attn(hidden, encoder_hidden_states=torch.randn(3, 1, 8))
    torch.testing.assert_close(out, attn.to_out[0].bias.expand_as(out))
    assert not torch.allclose(out_cond, out)


def test_cosine_helpers():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g)
    m = C.cosine_similarity_matrix(a, b)
    expected = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(C.cosine_similarity(a[:4], b), expected.diagonal())
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        C.cosine_similarity_matrix(a, b[:, :3])


def test_word_tokenizer_roundtrip(tokenizer, tmp_path):
    ids = tokenizer(["Red hair, open mouth", "blue"], padding="max_length", return_tensors="pt").input_ids
    v = {w: i + 4 for i, w in enumerate(WORDS)}
    assert ids.tolist() == [
        [2, v["red"], v["hair"], v[","], v["open"], v["mouth"], 3, 0],
        [2, v["blue"], 3, 0, 0, 0, 0, 0],
    ]
    assert tokenizer(["green hair"]).input_ids == [[2, 1, v["hair"], 3]]  # unknown word -> <unk>
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(["Red hair, open mouth"], padding="max_length").input_ids[0] == ids[0].tolist()
    with pytest.raises(ValueError, match="unique"):
        C.build_word_tokenizer(["a", "a"])


@torch.no_grad()
def test_text_embedding_pools_the_eos_token(tiny_clip, tokenizer):
    texts = ["red hair", "blue eyes , mouth open"]
    emb = C.encode_text(tiny_clip, tokenizer, texts)
    batch = tokenizer(texts, padding="max_length", return_tensors="pt")
    hidden = tiny_clip.text_model(**batch).last_hidden_state  # (N, L, D), after the final LayerNorm
    eos_pos = (batch.input_ids == 3).int().argmax(1)
    expected = tiny_clip.text_projection(hidden[torch.arange(2), eos_pos])
    torch.testing.assert_close(emb, expected)


@torch.no_grad()
def test_zero_shot_and_vision_tower(tiny_clip, tokenizer):
    pv = C.ClipPreprocess(32, 32)(_uint8_images(4, 32, 32).float() / 127.5 - 1)
    prompts = ["red hair", "blue hair", "mouth open"]
    pred, sims = C.zero_shot_classify(tiny_clip, tokenizer, pv, prompts)
    img = tiny_clip.get_image_features(pixel_values=pv).pooler_output
    txt = C.encode_text(tiny_clip, tokenizer, prompts)
    expected = torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=-1)
    torch.testing.assert_close(sims, expected)
    assert pred.tolist() == expected.argmax(1).tolist()
    tower = C.vision_tower_of(tiny_clip)
    torch.testing.assert_close(tower(pixel_values=pv).image_embeds, img)


@torch.no_grad()
def test_save_and_load(tiny_encoder, tiny_clip, tokenizer, tmp_path):
    tiny_encoder.save_pretrained(tmp_path / "image_encoder")
    loaded = C.load_image_encoder(tmp_path, subfolder="image_encoder")
    pv = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        loaded(pixel_values=pv).image_embeds, tiny_encoder(pixel_values=pv).image_embeds
    )
    tiny_clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    model, tok = C.load_clip(tmp_path / "clip")
    torch.testing.assert_close(
        C.encode_text(model, tok, ["red hair"]), C.encode_text(tiny_clip, tokenizer, ["red hair"])
    )


def test_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_image_encoder(tmp_path / "nowhere")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(FileNotFoundError, match="incomplete: missing model.safetensors"):
        C.load_image_encoder(tmp_path / "enc")


def test_vit_l14_image_encoder_on_meta():
    enc = C.build_image_encoder(configs.SD15.image_encoder, device="meta")
    assert (
        sum(p.numel() for p in enc.parameters()) == 303_966_208
    )  # ViT-L/14 vision tower + 1024x768 projection
    out = enc(pixel_values=torch.empty(2, 3, 224, 224, device="meta"), output_hidden_states=False)
    assert out.last_hidden_state.shape == (2, 257, 1024)  # 16x16 patches of 14 px + the class token
    assert C.image_embeds_to_tokens(out.image_embeds).shape == (2, 1, 768)


def test_loaders_print_nothing_and_restore_transformers_settings(capfd):
    """Loading shows no "Loading weights" bar and no log lines on stderr (a notebook would store them), and
    the user's transformers settings are as they were."""
    before = (transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity())
    C.load_toy_clip()
    C.load_toy_image_encoder()
    C.ClipPreprocess.from_folder(C.TOY_IMAGE_ENCODER_DIR)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert (transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()) == before
    transformers_logging.disable_progress_bar()
    with C.quiet_transformers():
        pass
    assert not transformers_logging.is_progress_bar_enabled()  # restored to disabled, not forced on
    transformers_logging.enable_progress_bar()
