"""The toy world's captions: sets of attribute phrases ("red hair , mouth open"), what the toy CLIP is trained
on and zero-shot classifies with.

Zero-shot classification of an attribute compares an image with the phrases of all its values ("black hair",
"brown hair", ...) and picks the most similar. The word-level tokenizer's vocabulary is every word of every
phrase (:func:`toy_vocabulary`).
"""

from __future__ import annotations

from anim_lab.errors import InputError
from anim_lab.toy.renderer import ATTRIBUTES

__all__ = ["TOY_PHRASES", "toy_caption_attributes", "toy_phrase", "toy_vocabulary"]

TOY_PHRASES = {
    "hair": "{} hair",
    "hairstyle": "{} hair",
    "skin": "{} skin",
    "background": "{} background",
    "shirt": "{} shirt",
    "eyes": "{} eyes",
    "lips": "{} lips",
    "mouth": "mouth {}",
    "eyelids": "eyes {}",
}


def toy_caption_attributes() -> dict[str, tuple[str, ...]]:
    """The attributes the toy CLIP's captions name and their values: the toy identities' categorical
    attributes plus the expression states ``mouth`` (open/closed) and ``eyelids`` (open/closed)."""
    return {
        **{k: tuple(ATTRIBUTES[k]) for k in TOY_PHRASES if k in ATTRIBUTES},
        "mouth": ("open", "closed"),
        "eyelids": ("open", "closed"),
    }


def toy_phrase(attribute: str, value: str) -> str:
    """``("hair", "red")`` -> ``"red hair"``; ``("mouth", "open")`` -> ``"mouth open"``."""
    if attribute not in TOY_PHRASES:
        raise InputError(f"unknown toy attribute {attribute!r}; known: {sorted(TOY_PHRASES)}")
    return TOY_PHRASES[attribute].format(value)


def toy_vocabulary() -> list[str]:
    """Every word of every toy phrase, plus the comma that separates phrases (sorted, for a stable
    tokenizer)."""
    words = {
        w
        for attr, values in toy_caption_attributes().items()
        for v in values
        for w in toy_phrase(attr, v).split()
    }
    return sorted(words) + [","]
