"""CLIP image embeddings as the UNet's cross-attention context.

AnimateAnyone-style pipelines replace SD's text prompt with the reference image, seen by CLIP's image tower:

    image (B, 3, H, W) in [-1, 1] --preprocess--> (B, 3, 224, 224), CLIP-normalised
        --CLIPVisionModelWithProjection--> image_embeds (B, 768) --unsqueeze--> tokens (B, 1, 768)

- One token per image: the projected, pooled (CLS) embedding. The UNet's cross-attention layers attend to it
  (``encoder_hidden_states``), so it carries only what survives global pooling: colours, layout, coarse
  identity.
- Classifier-free guidance uses **zeros** as the unconditional tokens (``torch.zeros_like``), not the
  embedding of a blank image: cross-attention over a single all-zero token gives keys and values equal to the
  projection biases (none in SD's attention), a context that carries no information about any image.
- Preprocessing (:class:`ClipPreprocess`) is transformers' ``CLIPImageProcessor`` written with torch: bicubic
  resize of the shortest edge, centre crop, OpenAI mean/std. Tested against the transformers processor.
- The toy world's CLIP (``scripts/train_toy_clip.py``) is a ``CLIPModel`` with both towers and a word-level
  tokenizer built here (:func:`build_word_tokenizer`); its image tower is saved apart as a
  ``CLIPVisionModelWithProjection``: the image encoder of the toy animation models.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch.nn import functional as F
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as transformers_logging

from .errors import InputError

try:  # transformers >= 5 names the PIL implementation apart
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - transformers 4
    from transformers import CLIPImageProcessor as _ImageProcessor

from .toy.captions import TOY_PHRASES, toy_caption_attributes, toy_phrase, toy_vocabulary
from .weights import TRANSFORMERS_WEIGHTS, resolve_pretrained

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "TOY_CLIP_DIR",
    "TOY_IMAGE_ENCODER_DIR",
    "ClipPreprocess",
    "quiet_transformers",
    "build_image_encoder",
    "load_image_encoder",
    "load_clip",
    "load_toy_image_encoder",
    "load_toy_clip",
    "vision_tower_of",
    "image_embeds_to_tokens",
    "encode_image",
    "uncond_tokens_like",
    "cosine_similarity",
    "cosine_similarity_matrix",
    "build_word_tokenizer",
    "encode_text",
    "zero_shot_classify",
    # the toy captions, defined in anim_lab.toy.captions
    "TOY_PHRASES",
    "toy_caption_attributes",
    "toy_phrase",
    "toy_vocabulary",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel mean of [0, 1] pixels
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ASSETS = Path(__file__).resolve().parent / "assets"
TOY_CLIP_DIR = _ASSETS / "toy_clip"
TOY_IMAGE_ENCODER_DIR = _ASSETS / "toy_image_encoder"


# --- preprocessing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipPreprocess:
    """``CLIPImageProcessor`` in torch: resize shortest edge to ``size`` (bicubic), centre crop ``crop_size``,
    normalise with ``mean``/``std``. Defaults are OpenAI CLIP's (224 / 224)."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_processor(cls, processor) -> ClipPreprocess:
        """Read the sizes and statistics of a transformers ``CLIPImageProcessor``."""
        crop = processor.crop_size
        if crop["height"] != crop["width"]:
            raise InputError(f"only square crops are supported, got {crop}")
        return cls(
            processor.size["shortest_edge"],
            crop["height"],
            tuple(processor.image_mean),
            tuple(processor.image_std),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipPreprocess:
        """Read ``preprocessor_config.json`` from a model folder (as saved next to the toy encoders)."""
        with quiet_transformers():
            return cls.from_processor(_ImageProcessor.from_pretrained(folder))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> pixel_values (B, 3, crop_size, crop_size), normalised."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be (B, 3, H, W) in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1], got {images.dtype}; use x.float() / 127.5 - 1")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.001 or hi > 1.001:
            raise InputError(
                f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; use x / 127.5 - 1"
            )
        return self._from_unit((images.float() + 1) / 2)  # [-1, 1] -> [0, 1]

    def from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels -> pixel_values, as ``CLIPImageProcessor`` computes them: ``u / 255`` in
        float32 (bit for bit equal to the processor's rescale, where going through [-1, 1] and back moves
        some levels by one float32 step), then resize, crop and normalise."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else images
            raise InputError(f"from_uint8 takes uint8 pixels (B, 3, H, W), got {got}")
        if images.shape[1] != 3:
            raise InputError(f"from_uint8 takes (B, 3, H, W) pixels, got {tuple(images.shape)}")
        return self._from_unit(images.float() / 255)

    def _from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> resized, centre-cropped, normalised (B, 3, crop, crop)."""
        h, w = x.shape[-2:]
        if min(h, w) < 2:
            raise InputError(f"images are too small to preprocess: {h}x{w}")
        # shortest edge -> size, the long edge keeps the aspect ratio (truncated, as transformers does)
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.size, int(self.size * long / short)
        new_hw = (new_short, new_long) if h <= w else (new_long, new_short)
        if new_hw != (h, w):
            # antialiased bicubic = PIL's BICUBIC filter; clamp as PIL's uint8 output does
            x = F.interpolate(x, size=new_hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (new_hw[0] - self.crop_size) // 2, (new_hw[1] - self.crop_size) // 2
        if top < 0 or left < 0:
            raise InputError(f"crop_size {self.crop_size} is larger than the resized image {new_hw}")
        x = x[:, :, top : top + self.crop_size, left : left + self.crop_size]  # (B, 3, crop, crop)
        mean = torch.tensor(self.mean, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[None, :, None, None]
        return (x - mean) / std


# --- building and loading -----------------------------------------------------------------------------------
def build_image_encoder(config: dict, device: str | torch.device = "cpu") -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` from ``CLIPVisionConfig`` kwargs (``configs.SD15.image_encoder``
    ...). ``device="meta"`` builds shapes only (ViT-L/14: 24 layers, width 1024, projection 768)."""
    with torch.device(device):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


@contextlib.contextmanager
def quiet_transformers():
    """Inside the block, transformers shows no progress bars ("Loading weights: 100%|...") and logs errors
    only; its settings are restored afterwards. The loaders here use it, so a notebook gets no stderr output
    from loading a model."""
    bars, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _resolve(path_or_id: str | Path, subfolder: str | None, what: str) -> tuple[str | Path, dict]:
    """Local folder (checked) or hub id: returns what ``from_pretrained`` takes and its extra kwargs."""
    example = "lambdalabs/sd-image-variations-diffusers/image_encoder"
    return resolve_pretrained(path_or_id, subfolder, what, TRANSFORMERS_WEIGHTS, example)


def load_image_encoder(
    path_or_id: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32
) -> CLIPVisionModelWithProjection:
    """Load the image encoder from a local folder or a hub id (e.g.
    ``lambdalabs/sd-image-variations-diffusers`` with ``subfolder="image_encoder"``). Missing or incomplete
    local folders get a FileNotFoundError."""
    where, kw = _resolve(path_or_id, subfolder, "image encoder")
    with quiet_transformers():
        model = CLIPVisionModelWithProjection.from_pretrained(where, dtype=torch_dtype, **kw)
    return model.eval().requires_grad_(False)


def load_clip(path_or_id: str | Path, torch_dtype: torch.dtype = torch.float32):
    """A full ``CLIPModel`` and its tokenizer (both towers) from a local folder or hub id."""
    where, kw = _resolve(path_or_id, None, "CLIP model")
    with quiet_transformers():
        model = CLIPModel.from_pretrained(where, dtype=torch_dtype, **kw).eval().requires_grad_(False)
        return model, AutoTokenizer.from_pretrained(where, **kw)


def load_toy_image_encoder() -> CLIPVisionModelWithProjection:
    """The toy world's image encoder (the image tower of the toy CLIP), shipped with the package."""
    return load_image_encoder(TOY_IMAGE_ENCODER_DIR)


def load_toy_clip():
    """The toy CLIP (``CLIPModel``, both towers) and its word-level tokenizer, shipped with the package."""
    return load_clip(TOY_CLIP_DIR)


def vision_tower_of(clip: CLIPModel) -> CLIPVisionModelWithProjection:
    """The image tower of a ``CLIPModel`` as a standalone ``CLIPVisionModelWithProjection`` (same weights).

    Both classes name their parts ``vision_model.*`` and ``visual_projection.*``, so the state dict carries
    over.
    """
    vcfg = clip.config.vision_config.to_dict()
    vcfg["projection_dim"] = clip.config.projection_dim
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg))
    keys = {
        k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))
    }
    encoder.load_state_dict(keys, strict=True)
    return encoder.eval()


# --- image embeddings -> cross-attention tokens -------------------------------------------------------------
def image_embeds_to_tokens(image_embeds: torch.Tensor) -> torch.Tensor:
    """(B, D) projected embeddings -> (B, 1, D): one token for the UNet's cross-attention."""
    if image_embeds.ndim != 2:
        raise InputError(f"image_embeds must be (B, D), got {tuple(image_embeds.shape)}")
    return rearrange(image_embeds, "b d -> b 1 d")


def encode_image(
    image_encoder: CLIPVisionModelWithProjection,
    images: torch.Tensor,
    preprocess: ClipPreprocess | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> cross-attention tokens (B, 1, projection_dim).

    ``preprocess`` defaults to resize-and-crop to the encoder's ``image_size`` (224 for ViT-L/14).
    """
    if preprocess is None:
        n = image_encoder.config.image_size
        preprocess = ClipPreprocess(size=n, crop_size=n)
    pixel_values = preprocess(images).to(image_encoder.dtype)  # (B, 3, S, S)
    image_embeds = image_encoder(pixel_values=pixel_values).image_embeds  # (B, D)
    return image_embeds_to_tokens(image_embeds)  # (B, 1, D)


def uncond_tokens_like(tokens: torch.Tensor) -> torch.Tensor:
    """The unconditional context of classifier-free guidance: zeros of the same shape (B, 1, D)."""
    return torch.zeros_like(tokens)


# --- similarity ---------------------------------------------------------------------------------------------
def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (..., D) tensors -> (...)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairs: (N, D) x (M, D) -> (N, M) cosine similarities."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"need (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


# --- text side (the toy CLIP's word-level tokenizer) --------------------------------------------------------
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3; eos id 3 (not 2: see CLIPTextTransformer)


def build_word_tokenizer(words: list[str], model_max_length: int = 16):
    """A word-level tokenizer: lower-case, split on spaces and punctuation, ``<bos> words <eos>``.

    Returned as a transformers fast tokenizer, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
    work. Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then ``words`` in order.
    """
    words = [w.lower() for w in words]
    if len(set(words)) != len(words) or set(words) & set(SPECIAL_TOKENS):
        raise InputError("words must be unique and must not repeat the special tokens")
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def encode_text(clip: CLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts -> projected text embeddings (N, projection_dim)."""
    batch = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    out = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.pooler_output if hasattr(out, "pooler_output") else out  # (N, D)


@torch.no_grad()
def zero_shot_classify(
    clip: CLIPModel, tokenizer, pixel_values: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, for each image, the prompt whose text embedding is most similar.

    pixel_values (B, 3, S, S) (already preprocessed) and K prompts -> (predicted index (B,), similarities (B,
    K)).
    """
    image_embeds = clip.get_image_features(pixel_values=pixel_values)
    image_embeds = (
        image_embeds.pooler_output if hasattr(image_embeds, "pooler_output") else image_embeds
    )  # (B, D)
    text_embeds = encode_text(clip, tokenizer, prompts)  # (K, D)
    sims = cosine_similarity_matrix(image_embeds, text_embeds)  # (B, K)
    return sims.argmax(dim=1), sims


# --- the toy world's captions: anim_lab.toy.captions (re-exported here, where the toy CLIP uses them) -------
