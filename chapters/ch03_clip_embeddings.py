# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["core"]
# # Chapter 03 — CLIP image embeddings
#
# *AnimateAnyone has no text prompt: the UNet's cross-attention reads one CLIP embedding of the reference
# image. We preprocess images like CLIP, turn embeddings into that single token, see why zeros are the "no
# condition" input, and ask a tiny CLIP trained on the toy world what its embeddings know — and what they
# lose.*
#
# - **You will build**: CLIP preprocessing in torch, checked against transformers; image embeddings →
#   `(B, 1, D)` cross-attention tokens at toy and real (ViT-L/14) size; the zero unconditional token and what
#   cross-attention does with it; zero-shot attribute classification and identity retrieval with the toy CLIP;
#   an embedding map
# - **Library modules**: `anim_lab.clip`, `anim_lab.configs`, `anim_lab.toy`, `anim_lab.viz`; diffusers'
#   `Attention`
# - **Questions answered**: What does CLIP's image processor do, exactly? How does an image enter the UNet
#   through cross-attention, in shapes? Why are zeros the unconditional input, and does training use the same
#   "no condition"? How was the toy CLIP trained? What do the embeddings carry
#   (colours, identity, expression) and what do they lose (small details such as eye colour) — the argument
#   for a ReferenceNet?
# - **CPU runtime**: about 14 s (chapters/README.md)
#
# The toy CLIP was trained by `scripts/train_toy_clip.py` (seed 0, four stages run by
# `scripts/retrain_toy_clip.sh`, about 80 minutes on one core of a shared CPU; section 8 prints them): a
# transformers `CLIPModel` (image and text towers) with a word-level tokenizer built from the toy attribute
# vocabulary. Its image tower is saved apart as a `CLIPVisionModelWithProjection` — the image encoder of the
# toy animation models.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import json
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from diffusers.models.attention_processor import Attention
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPImageProcessorPil

import anim_lab
from anim_lab import clip as C
from anim_lab import configs, toy, viz
from anim_lab.inspect import count_flops, human
from anim_lab.landmarks import LEFT_EYE_UPPER, RIGHT_EYE_UPPER, RIGHT_IRIS, RIGHT_IRIS_CENTER
from anim_lab.vae import images_from_uint8

torch.manual_seed(0)
torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
np.set_printoptions(precision=3, suppress=True)
torch.set_printoptions(precision=3, sci_mode=False)
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")

# %% [markdown] tags=["core"]
# ## 1. CLIP's preprocessing, in torch
#
# `CLIPImageProcessor` does three things: resize the **shortest edge** (bicubic), **centre crop** a square,
# and normalise with OpenAI's per-channel mean and std. SD-image-variations / AnimateAnyone use 224 / 224
# (after resizing the reference to 224 × 224). The toy CLIP uses 160 / 96: the central 77 px of a 128-px
# frame, enlarged 1.25×, so the face fills the crop (the mouth needs those pixels, section 7) while hair,
# background and collar stay in view. `ClipPreprocess` is the same in torch, on `(B, 3, H, W)` images in
# [-1, 1]:

# %% tags=["core"]
rng = np.random.default_rng(0)
test_ids = list(toy.identity_split("test"))
u8 = np.stack(
    [
        toy.render(toy.identity_from_seed(s), toy.HeadPose(yaw=rng.uniform(-20, 20)), size=128)[0]
        for s in test_ids[:4]
    ]
)  # (4, 128, 128, 3) uint8
processor = CLIPImageProcessorPil.from_pretrained(C.TOY_IMAGE_ENCODER_DIR)
print("toy processor: shortest edge", processor.size["shortest_edge"], "crop", processor.crop_size["height"])
expected = processor(list(u8), return_tensors="pt").pixel_values  # (4, 3, 96, 96), PIL path
preprocess = C.ClipPreprocess.from_processor(processor)
images = images_from_uint8(u8)  # (4, H, W, 3) uint8 -> (4, 3, H, W) in [-1, 1]
pixel_values = preprocess(images)  # (4, 3, 96, 96)
torch.testing.assert_close(pixel_values, expected, atol=0.03, rtol=0)  # PIL rounds to uint8 in between
std = torch.tensor(processor.image_std)[None, :, None, None]  # pixel_values = (x01 - mean) / std
grey_levels = ((pixel_values - expected).abs() * std * 255).amax()  # back to 0..255 units
print("pixel_values", tuple(pixel_values.shape), "match transformers' CLIPImageProcessor")
print(
    f"tolerance 0.03 in pixel_values = {0.03 * min(processor.image_std) * 255:.1f} to "
    f"{0.03 * max(processor.image_std) * 255:.1f} grey levels; largest difference {grey_levels:.1f} grey "
    f"levels"
)
sd = C.ClipPreprocess()  # SD's image encoder: 224 / 224
print("SD-size pixel_values:", tuple(sd(images).shape))

# %% [markdown] tags=["core"]
# ## 2. From image to one cross-attention token
#
# - The vision transformer cuts the image into patches (toy: 96 px / 12 = 8 × 8 = 64 patches; ViT-L/14: 224 /
#   14 = 16 × 16 = 256), adds a class token, and runs its layers. The class token's output, projected, is
#   `image_embeds` `(B, D)`. `encode_image` adds a length-1 token axis: `(B, 1, D)`, the UNet's
#   `encoder_hidden_states`.
# - At real size nothing changes but the numbers — here on the meta device (no weights, no memory):

# %% tags=["core"]
image_encoder = C.load_toy_image_encoder()
with torch.no_grad():
    tokens = C.encode_image(image_encoder, images, preprocess)  # (4, 3, 128, 128) -> (4, 1, 64)
    hidden = image_encoder(pixel_values=pixel_values).last_hidden_state  # (4, 65, 128)
print("toy: patch tokens", tuple(hidden.shape), "-> image_embeds -> tokens", tuple(tokens.shape))

vit_l = C.build_image_encoder(configs.SD15.image_encoder, device="meta")
out = vit_l(pixel_values=torch.empty(1, 3, 224, 224, device="meta"))
print(
    "ViT-L/14: patch tokens",
    tuple(out.last_hidden_state.shape),
    "-> image_embeds",
    tuple(out.image_embeds.shape),
    "-> tokens",
    tuple(C.image_embeds_to_tokens(out.image_embeds).shape),
)
print(f"ViT-L/14 image encoder: {sum(p.numel() for p in vit_l.parameters()) / 1e6:.1f}M parameters")

# %% [markdown] tags=["core"]
# Inside the UNet, each cross-attention layer (`attn2` in diffusers) projects the feature map to queries and
# the tokens to keys and values. SD1.5's first block: 320 channels, 64 × 64 positions at 512 px, 8 heads,
# context 768. With **one** token, the softmax over keys has a single entry, equal to 1 — every position
# receives the same vector `to_out(to_v(token))`. The image embedding acts as a global, position-independent
# signal:

# %% tags=["core"]
with torch.device("meta"):
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40)
feature_map = torch.empty(2, 64 * 64, 320, device="meta")  # (B, h*w, C): the flattened 64 x 64 feature map
print(
    "cross-attention (meta):",
    tuple(feature_map.shape),
    "+ context (2, 1, 768) ->",
    tuple(attn(feature_map, encoder_hidden_states=torch.empty(2, 1, 768, device="meta")).shape),
)

torch.manual_seed(0)
toy_attn = Attention(query_dim=32, cross_attention_dim=64, heads=4, dim_head=8).eval()  # a toy-sized attn2
queries = torch.randn(4, 100, 32)  # (B, h*w, C) UNet features
with torch.no_grad():
    attended = toy_attn(queries, encoder_hidden_states=tokens)  # (4, 100, 32)
    by_hand = toy_attn.to_out[0](toy_attn.to_v(tokens))  # (4, 1, 32): softmax over one key is 1
torch.testing.assert_close(attended, by_hand.expand_as(attended), atol=1e-5, rtol=1e-5)
print("one token: every query position gets to_out(to_v(token)) — matches the attention layer")

# %% [markdown] tags=["core"]
# ## 3. Zeros as the unconditional input
#
# Classifier-free guidance runs the UNet twice, with and without the condition. Moore-AnimateAnyone makes the
# unconditional tokens with `torch.zeros_like`: SD's `to_k`/`to_v` have no bias, so a zero token gives zero
# values, and cross-attention returns just `to_out`'s bias — the same for every image, carrying no
# information. The embedding of a *blank* image would not: it is a real point in embedding space, with content
# of its own.

# %% tags=["core"]
uncond = C.uncond_tokens_like(tokens)  # (4, 1, 64) zeros
blank = torch.zeros(1, 3, 128, 128)  # a mid-grey image
with torch.no_grad():
    out_zero = toy_attn(queries, encoder_hidden_states=uncond)
    blank_token = C.encode_image(image_encoder, blank, preprocess)
torch.testing.assert_close(out_zero, toy_attn.to_out[0].bias.expand_as(out_zero))
print("zero tokens -> cross-attention output = to_out bias everywhere: True")
print(
    "norm of a grey image's token relative to a portrait's:",
    round(float(blank_token.norm() / tokens.norm(dim=-1).mean()), 2),
)
cfg_context = torch.cat(
    [uncond, tokens]
)  # (2B, 1, D): unconditional rows first, as in the reference pipeline
print("encoder_hidden_states under CFG:", tuple(cfg_context.shape))

# %% [markdown] tags=["core"]
# **Training drops the condition differently.** Moore-AnimateAnyone's training scripts, with probability
# `uncond_ratio = 0.1`, replace the reference's CLIP *input* by zeros (`torch.zeros_like(clip_img)`, i.e. an
# all-zero `pixel_values`: after normalisation, an image of CLIP's mean colour) and run it **through the image
# encoder**; they also skip the ReferenceNet, so the bank is empty. Inference instead uses **zero embeddings**
# for the unconditional rows (and reads no bank for them). The bank side matches; the token does not. What
# the UNet learned as "no condition" is the embedding of a zero image, not the zero vector. How far apart?

# %% tags=["core"]
with torch.no_grad():
    train_uncond = C.image_embeds_to_tokens(
        image_encoder(pixel_values=torch.zeros(1, 3, 96, 96)).image_embeds
    )  # (1, 1, 64): what training fed
    out_train_uncond = toy_attn(queries[:1], encoder_hidden_states=train_uncond)
    out_infer_uncond = toy_attn(queries[:1], encoder_hidden_states=uncond[:1])
    out_portraits = toy_attn(queries[:1].expand(4, -1, -1), encoder_hidden_states=tokens)  # (4, 100, 32)


scale = out_portraits.norm(dim=(1, 2)).mean()  # the typical size of a portrait's output


def gap(a, b):  # L2 distance of two cross-attention outputs, relative to a portrait's output
    return float((a - b).norm() / scale)


print(
    f"norm of the zero-image token relative to a portrait's: "
    f"{train_uncond.norm() / tokens.norm(dim=-1).mean():.2f}"
)
print(
    f"cross-attention output, zero-image token vs zero token: {gap(out_train_uncond, out_infer_uncond):.2f}"
)
print(
    "for scale, portrait 0 vs portraits 1..3:",
    [round(gap(out_portraits[0], out_portraits[i]), 2) for i in (1, 2, 3)],
)

# %% [markdown] tags=["core"]
# The zero-image token is a full-size embedding, as long as a portrait's. Through a (random, toy-sized)
# cross-attention layer, its output is almost as far from the zero token's output (the `to_out` bias) as two
# different portraits' outputs are from each other. So at inference the unconditional branch gets an input the
# UNet never saw as "no condition" in training. That error is not cancelled by guidance: the guided
# prediction is $(1 - s)\,\text{uncond} + s\,\text{cond}$, so an error in the unconditional branch reaches
# the result multiplied by $1 - s$ (−2.5 at the official $s = 3.5$). The two choices are different functions;
# a model trained this way could use the zero-image token at inference to match its training.

# %% [markdown]
# ## 4. How the toy CLIP was trained
#
# Before asking what the embeddings know, what were they trained to know? `scripts/train_toy_clip.py` trains a
# transformers `CLIPModel` (a 4-layer ViT on 8 × 8 patches of 12 px, and a 2-layer text transformer) on 12,000
# renders of 3,000 training identities, 4 views each. Each image gets a caption made of a random subset of its
# attribute phrases ("red hair , mouth open , blue background"), tokenized word by word. With image embeddings
# $u_i$ and caption embeddings $t_j$ (both L2-normalised) and a learned temperature $\tau$, the loss of a
# batch has three terms:
#
# $$\mathcal L = \mathcal L_\text{CLIP} + \lambda_\text{id}\, \mathcal L_\text{id} + \lambda_\text{aux}\,
#   \mathcal L_\text{aux}$$
#
# - $\mathcal L_\text{CLIP}$: CLIP's symmetric cross-entropy over the similarity matrix $u_i^\top t_j / \tau$,
#   in both directions (image → caption, caption → image), except that *every* caption true of an image counts
#   as a positive (the target spreads over them): "blue background" fits many images in a batch.
# - $\mathcal L_\text{id}$ (weight 0.25, then 0.5): a second view of the same identity in another pose must be
#   the most similar image in the batch (cross-entropy over image-image similarities). This is what teaches
#   identity across poses.
# - $\mathcal L_\text{aux}$ (weight 0.5, then 4): one small linear **attribute head** per attribute (hair,
#   hairstyle, skin, background, shirt, eyes, lips, mouth, eyelids) on the image embedding, each a
#   cross-entropy over its values, averaged; the mouth head can be weighted up. The heads are thrown away
#   after training: they only push the image side to encode each attribute faster on a CPU budget.
#
# Training ran in four stages (the table in section 8 prints them from the log): stages 1–2 crop the frame
# at resize 128, stages 3–4 zoom in (resize 160) and weight the mouth head up. Below, everything is measured
# on identities the model never saw.
#
# ## 5. What the toy CLIP's embeddings carry
#
# Held-out identities, 4 random poses and expressions each. **Zero-shot classification** compares an image
# with the phrases of all values of one attribute and picks the most similar. First re-derive it from cosine
# similarities:

# %%
clip_model, tokenizer = C.load_toy_clip()
attributes = C.toy_caption_attributes()
n_ids, views = 100, 4
rows, marks, labels, who = [], [], [], []  # marks: each render's 478 landmarks
for k, s in enumerate(test_ids[100 : 100 + n_ids]):
    ident = toy.identity_from_seed(s)
    for v in range(views):
        mouth, eyes = rng.random() < 0.5, rng.random() < 0.3
        expr = toy.Expression(
            mouth_open=0.8 if mouth else 0.0, blink=0.95 if eyes else 0.0, smile=rng.uniform()
        )
        pose = toy.HeadPose(
            yaw=rng.uniform(-25, 25),
            pitch=rng.uniform(-12, 12),
            roll=rng.uniform(-10, 10),
            tx=rng.uniform(-0.06, 0.06),
            ty=rng.uniform(-0.05, 0.05),
            scale=rng.uniform(0.9, 1.1),
        )
        image, landmarks = toy.render(ident, pose, expr, size=128, seed=v)
        rows.append(image)
        marks.append(landmarks)
        labels.append(
            {a: getattr(ident, a) for a in toy.ATTRIBUTES}
            | {"mouth": "open" if mouth else "closed", "eyelids": "closed" if eyes else "open"}
        )
        who.append(k)
gallery = images_from_uint8(np.stack(rows))  # (400, 128, 128, 3) uint8 -> (400, 3, 128, 128)
who = torch.tensor(who)
with torch.no_grad():
    pv = preprocess(gallery)  # (400, 3, 96, 96)
    image_embeds = clip_model.get_image_features(pixel_values=pv).pooler_output  # (400, 64)
print("held-out images:", tuple(gallery.shape), "-> embeddings", tuple(image_embeds.shape))

prompts = [C.toy_phrase("hair", v) for v in attributes["hair"]]
with torch.no_grad():
    pred, sims = C.zero_shot_classify(clip_model, tokenizer, pv, prompts)
    text = C.encode_text(clip_model, tokenizer, prompts)  # (5, 64)
by_hand = (image_embeds / image_embeds.norm(dim=-1, keepdim=True)) @ (
    text / text.norm(dim=-1, keepdim=True)
).T
torch.testing.assert_close(sims, by_hand, atol=1e-5, rtol=1e-5)
print("prompts:", prompts)
print("zero-shot = argmax of cosine similarities: matches the library")

# %% [markdown]
# Now every attribute. Beside chance (one over the number of values) stands the **majority baseline**: the
# accuracy of always answering the value most frequent among these 400 renders. The values are not equally
# frequent (the renders close the eyes with probability 0.3, and 100 identities do not spread their colours
# evenly), so an accuracy that does not beat the majority shows nothing learned, even above chance.

# %%
accuracy = {}
majority = {a: max(Counter(lab[a] for lab in labels).values()) / len(labels) for a in attributes}
with torch.no_grad():
    for attr, values in attributes.items():
        text = C.encode_text(clip_model, tokenizer, [C.toy_phrase(attr, v) for v in values])
        pred = C.cosine_similarity_matrix(image_embeds, text).argmax(1)
        truth = torch.tensor([values.index(lab[attr]) for lab in labels])
        accuracy[attr] = float((pred == truth).float().mean())
for attr, acc in accuracy.items():
    print(
        f"{attr:10s} {len(attributes[attr])} values  chance {1 / len(attributes[attr]):.0%}  "
        f"majority {majority[attr]:6.1%}  zero-shot {acc:6.1%}"
    )

# %%
fig, ax = plt.subplots(figsize=(7, 3))
names = list(accuracy)
ax.bar(names, [accuracy[a] for a in names], color="#6baed6", label="zero-shot accuracy")
ax.scatter(
    names, [1 / len(attributes[a]) for a in names], color="k", marker="_", s=400, label="chance", zorder=3
)
ax.scatter(
    names, [majority[a] for a in names], color="tab:red", marker="_", s=400, label="majority", zorder=3
)
ax.set_ylim(0, 1.3)
ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
ax.set_ylabel("held-out accuracy")
ax.legend(loc="upper right", fontsize=8, ncol=3)
ax.set_title("What one CLIP token knows about a toy portrait (400 held-out renders)", fontsize=9)
fig.tight_layout()
viz.save(fig, "ch03_zero_shot")
plt.show()

# %% [markdown]
# ## 6. Identity: retrieval across poses, and an embedding map
#
# For each image, find the most similar *other* image; a hit if it shows the same identity. The baseline
# compares raw 32 × 32 pixels, which already matches background and shirt colour.


# %%
def retrieval_top1(x, identity):
    sims = C.cosine_similarity_matrix(x, x).fill_diagonal_(-2.0)  # (N, N), never yourself
    return float((identity[sims.argmax(1)] == identity).float().mean())


pixels = torch.nn.functional.interpolate(gallery, size=(32, 32), mode="area").flatten(1)  # (400, 3072)
print(f"identity retrieval top-1, CLIP embeddings: {retrieval_top1(image_embeds, who):.0%}")
print(f"identity retrieval top-1, raw pixels:      {retrieval_top1(pixels - pixels.mean(0), who):.0%}")

# %%
centred = image_embeds - image_embeds.mean(0)
_, _, vh = torch.linalg.svd(centred, full_matrices=False)
xy = (centred @ vh[:2].T).numpy()  # (400, 2): the first two principal components
palettes = {
    "hairstyle": {"short": (31, 119, 180), "long": (255, 127, 14)},  # two categories, two colours
    "skin": toy.renderer.SKIN_TONES,
}
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, (attr, colours) in zip(axes[:2], palettes.items(), strict=True):
    ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=[np.array(colours[lab[attr]]) / 255 for lab in labels],
        s=12,
        edgecolors="k",
        linewidths=0.2,
    )
    ax.set_title(f"coloured by {attr} ({', '.join(colours)})", fontsize=9)
for k in range(8):  # 8 identities, their 4 views joined
    pts = xy[who.numpy() == k]
    axes[2].plot(*np.vstack([pts, pts[:1]]).T, "o-", ms=4, lw=0.8)
axes[2].scatter(xy[:, 0], xy[:, 1], c="lightgrey", s=6, zorder=0)
axes[2].set_title("8 identities, 4 poses each", fontsize=9)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
fig.suptitle("Toy CLIP image embeddings of held-out portraits (first two principal components)", fontsize=10)
fig.tight_layout()
viz.save(fig, "ch03_embedding_map")
plt.show()

# %% [markdown]
# What do the two axes show? Two numbers per principal component: the share of the embeddings' variance it
# explains, and for each attribute the share of the component's variance explained by that attribute's
# groups ($\eta^2$ = between-group variance / total variance; 1 means the attribute alone sets the
# coordinate).

# %%
explained = (torch.linalg.svdvals(centred) ** 2 / (centred**2).sum())[:2]
print("variance explained by PC1, PC2:", [f"{v:.0%}" for v in explained.tolist()])


def eta_squared(values, groups):  # share of the variance of `values` explained by group means
    groups = np.array(groups)
    means = {g: values[groups == g].mean() for g in set(groups)}
    between = sum((groups == g).sum() * (m - values.mean()) ** 2 for g, m in means.items())
    return between / ((values - values.mean()) ** 2).sum()


for pc in (0, 1):
    eta = {a: eta_squared(xy[:, pc], [lab[a] for lab in labels]) for a in (*toy.ATTRIBUTES, "mouth")}
    top = sorted(eta.items(), key=lambda kv: -kv[1])[:3]
    print(f"PC{pc + 1}: explained best by", ", ".join(f"{a} {v:.2f}" for a, v in top))

# %% [markdown]
# How to read the map: the two axes hold under a fifth of the embeddings' variance, and they are mostly
# hairstyle (PC1) and skin tone (PC2), which is why the map is coloured by those two. Background and shirt,
# read perfectly by zero-shot, live in other directions of the 64-D space, and each identity's 4 views sit
# close together (right panel): the retrieval of the cell above is a statement about all 64 dimensions,
# which no 2-D projection shows. Treat a PCA map of an embedding as a glimpse, and measure with probes,
# zero-shot and retrieval.

# %% [markdown]
# ## 7. What is lost: small details
#
# Large-area attributes (background, shirt, skin, hair colour, hairstyle) are read almost perfectly, and so is
# the mouth — open with white teeth, or closed. The eyes are not: eye colour and the eyelids (open or closed)
# score no better than always answering the most frequent value (the majority column of section 5). The mouth
# was not free: with the 128 → 96 crop of stages 1–2 (a 12-px patch = 12 px of the render) the same CLIP
# stayed near chance on it (section 8 prints the log's mouth accuracy after each stage). Zooming in to resize
# 160 (a patch = 9.6 px of the render, the mouth spread over more patches) and weighting up the mouth's
# attribute head fixed it in stage 3. The eyes did not get that help. Below, the eye region of one open-eyed
# render per eye colour, cropped around the eye landmarks, and the size of an iris measured from the landmarks
# over all open-eyed renders:

# %%
eye_points = list(RIGHT_EYE_UPPER + LEFT_EYE_UPPER)  # the upper lids and the eye corners
picks = [
    next(i for i, lab in enumerate(labels) if lab["eyes"] == colour and lab["eyelids"] == "open")
    for colour in attributes["eyes"]
]
crops = []
for i in picks:
    (x0, y0), (x1, y1) = marks[i][eye_points].min(0), marks[i][eye_points].max(0)
    x0, x1, y0, y1 = int(x0) - 4, int(x1) + 5, int(y0) - 4, int(y1) + 8  # a margin around both eyes
    crops.append(rows[i][y0:y1, x0:x1])
fig = viz.image_grid(
    crops,
    titles=[f"eyes: {labels[i]['eyes']}" for i in picks],
    ncols=4,
    figsize=(10, 1.6),
    suptitle="Both eyes of four held-out renders, cropped from their landmarks (128 px frames, enlarged)",
)
plt.show()
open_eyes = [i for i, lab in enumerate(labels) if lab["eyelids"] == "open"]
iris = np.array(
    [
        2 * np.linalg.norm(marks[i][list(RIGHT_IRIS[:-1])] - marks[i][RIGHT_IRIS_CENTER], axis=1).mean()
        for i in open_eyes
    ]
)  # diameters in render pixels
zoom = processor.size["shortest_edge"] / 128  # the toy CLIP enlarges the 128-px frame 1.25x
patch = image_encoder.config.patch_size
print(
    f"iris diameter: {iris.min():.1f} to {iris.max():.1f} px of the render, {iris.min() * zoom:.1f} to "
    f"{iris.max() * zoom:.1f} px of the CLIP's input, whose patches are {patch} px"
)
ident = toy.identity_from_seed(test_ids[100])
plain = toy.render(ident, size=128)[0].astype(int)
for what, expr in (
    ("eyes close", toy.Expression(blink=0.95)),
    ("mouth opens", toy.Expression(mouth_open=0.8)),
):
    changed = int((np.abs(toy.render(ident, expression=expr, size=128)[0] - plain).max(-1) > 16).sum())
    print(f"pixels that change by > 16 levels when the {what}: {changed} of {128 * 128}")
for attr in ("eyes", "eyelids", "mouth"):
    print(f"{attr:8s} zero-shot {accuracy[attr]:6.1%}   majority {majority[attr]:6.1%}")

# %% [markdown]
# The irises are visible in the crops, but small: a ring of colour around a dark pupil, less than half a patch
# across (printed), and for brown eyes on darker skin hardly distinct even to us. Closing the eyes
# changes fewer pixels than opening the mouth (printed). One pooled token, trained for 83 minutes on one CPU
# core (the four stages of section 8), keeps what covers enough pixels and drops the rest; a tighter crop
# would cost the rest of the head. This is AnimateAnyone's argument for a **ReferenceNet**: a copy of the UNet
# that hands the denoiser the reference's full spatial feature maps (chapter 05), so fine details need not
# survive a single CLIP vector.

# %% [markdown]
# ## 8. What the toy CLIP cost
#
# The training log ships with the weights: held-out zero-shot accuracy and retrieval, measured during
# training.

# %%
log = json.loads((C.TOY_CLIP_DIR / "train_log.json").read_text())
stages = log.get("earlier_stages", []) + [log]  # a run can continue an earlier one (--init)
print(
    f"{log['n_params'] / 1e6:.2f}M parameters, {log['n_images']} training renders of {log['n_identities']} "
    f"identities, batches of {log['batch_images']} images"
)
for i, st in enumerate(stages):
    print(
        f"stage {i + 1}: {st['curve'][-1]['minutes']:.0f} min, {st['steps']} steps, resize {st['resize']}, "
        f"lr {st['lr']}, "
        f"attribute-head weight {st['aux_weight']} (mouth +{st.get('mouth_weight', 0.0)}), "
        f"identity weight {st['identity_weight']}"
    )
T = anim_lab.load_script("eval_toy_models")  # the log's evaluation: T.evaluate_clip


def eval_labels(n_identities, views=4, seed=321):
    """The labels of T.render_stills("test", n_identities, views, seed), the set T.evaluate_clip scores:
    the same generator calls, without rendering."""
    rng, labels = np.random.default_rng(seed), []
    for s in T.identity_seeds("test", n_identities, seed):
        ident = toy.identity_from_seed(s)
        for _ in range(views):
            _, state = T.random_expression(rng)
            T.random_pose(rng), rng.integers(1 << 30)  # the pose and the render seed, as render_stills draws
            labels.append({a: getattr(ident, a) for a in toy.ATTRIBUTES} | state)
    return labels


assert eval_labels(3) == T.render_stills("test", 3, views=4, seed=321)["labels"]
print("\nat the end of each stage (the log's own held-out evaluation; majority of its evaluation set):")
for i, st in enumerate(stages):
    end, n = st["curve"][-1], st.get("eval_identities", 100)
    most = {a: max(Counter(lab[a] for lab in eval_labels(n)).values()) / (4 * n) for a in ("mouth", "hair")}
    print(
        f"stage {i + 1}: {n} identities | mouth {end['mouth']:.0%} (majority {most['mouth']:.0%}) "
        f"| hair {end['hair']:.0%} (majority {most['hair']:.0%}) | retrieval {end['retrieval']:.1%} "
        f"(pixels {end['retrieval_pixels']:.0%})"
    )
fig, ax = plt.subplots(figsize=(7, 3.4))
points, offset = [], 0.0
for st in stages:
    points += [dict(c, minutes=c["minutes"] + offset) for c in st["curve"]]
    offset += st["curve"][-1]["minutes"]  # the wall time at the stage's last evaluation
    ax.axvline(offset, color="grey", ls=":", lw=0.8)
for key in ("background", "skin", "hair", "hairstyle", "mouth", "eyes", "retrieval"):
    ax.plot([c["minutes"] for c in points], [c[key] for c in points], "o-", ms=3, label=key)
ax.set_xlabel("training minutes (1 CPU core); dotted: end of a stage")
ax.set_ylabel("held-out accuracy")
ax.set_ylim(0, 1.02)
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
viz.save(fig, "ch03_training_curve")
plt.show()

# %% [markdown]
# Read the last table with care: the evaluation protocol changed between stages. Stage 3 was evaluated on 60
# held-out identities, the others on 100 (the pixel baseline, which only depends on the evaluation set, moves
# with it), so compare stages 1, 2 and 4 with each other, and stage 3 with nothing. Read that way, the zoom
# (stages 3–4) took the mouth from near chance to perfect and cost some hair colour (the tighter crop shows
# less hair) and a little retrieval. The log's retrieval and this chapter's (section 6) also differ: both take
# top-1 among 4 views of 100 unseen identities, but with different identities and different pose and
# expression ranges.
#
# ## Summary
#
# - CLIP preprocessing = resize the shortest edge (bicubic), centre crop, normalise with OpenAI's mean/std;
#   `ClipPreprocess` does it in torch and matches `CLIPImageProcessor` to about 2 grey levels (PIL rounds
#   to uint8 between resize and normalisation; torch does not).
# - An image becomes **one token** `(B, 1, D)`: the projected class-token output (D = 768 for ViT-L/14, 64 for
#   the toy). With a single key, cross-attention gives every position the same vector: a global signal.
# - The unconditional input at inference is **zeros**: with bias-free `to_k`/`to_v`, cross-attention then
#   returns a constant that carries no image at all. Training dropped the condition differently (a zero image
#   through the encoder), a mismatch measured in section 3.
# - The toy CLIP's token knows colours, hairstyle, mouth state and identity well (retrieval across poses far
#   above the pixel baseline), but neither eye colour nor whether the eyes are open: both score no better
#   than the majority baseline. The mouth needed a closer crop (resize 160 instead of 128): detail survives
#   one pooled vector trained on a CPU budget only when it covers enough pixels. That gap is what the
#   ReferenceNet fills.
#
# ## Exercises
#
# 1. Crop 64 px around the eyes (from the landmarks) and enlarge them to 96 (the toy CLIP's input size):
#    does eye-colour zero-shot accuracy rise?
# 2. Replace the zero unconditional token by the grey image's token and compare the cross-attention outputs
#    for two different sets of queries. Does either choice depend on the UNet features?
# 3. Build a prompt ensemble ("red hair", "red hair , short hair", "red hair , long hair") and measure whether
#    zero-shot hair accuracy changes.
# 4. Retrieval with the pixel baseline fails for which pairs? Count what the wrongly retrieved images share.
# 5. At real size, how many FLOPs does one cross-attention layer of SD1.5's first block spend on a single
#    context token, compared with 77 text tokens?
#
# ## Solutions
#
# **1.** The model never saw such crops; the irises now cover several patches, but the question is whether
# the embedding was ever trained to keep them:

# %%
centres = np.stack([m[eye_points].mean(0) for m in marks]).round().astype(int)  # (400, 2) x, y
corners = np.clip(centres - 32, 0, 128 - 64)  # top-left of a 64-px square around the eyes, inside the frame
eyes_crop = torch.nn.functional.interpolate(
    torch.stack([g[:, y : y + 64, x : x + 64] for g, (x, y) in zip(gallery, corners, strict=True)]),
    size=(96, 96),
    mode="bicubic",
    align_corners=False,
)  # (400, 3, 64, 64) around the eyes -> (400, 3, 96, 96)
eye_pv = C.ClipPreprocess(96, 96, processor.image_mean, processor.image_std)(eyes_crop.clamp(-1, 1))
values = attributes["eyes"]
with torch.no_grad():
    text = C.encode_text(clip_model, tokenizer, [C.toy_phrase("eyes", v) for v in values])
    pred = C.cosine_similarity_matrix(clip_model.get_image_features(pixel_values=eye_pv).pooler_output, text)
truth = torch.tensor([values.index(lab["eyes"]) for lab in labels])
print(
    f"eye colour from eye crops: {float((pred.argmax(1) == truth).float().mean()):.1%} (chance "
    f"{1 / len(values):.0%}, majority {majority['eyes']:.1%})"
)

# %% [markdown]
# **2.** With a single token, the output is the same at every position whatever the queries are, for both
# choices; they differ only in *which* constant they add:

# %%
other_queries = torch.randn(1, 100, 32)
with torch.no_grad():
    for name, token in (("zero token", uncond[:1]), ("grey image's token", blank_token)):
        o1 = toy_attn(queries[:1], encoder_hidden_states=token)
        o2 = toy_attn(other_queries, encoder_hidden_states=token)
        print(f"{name:19s}: same output for other queries: {torch.allclose(o1, o2, atol=1e-6)}")

# %% [markdown]
# **3.** Average the text embeddings of the phrases per hair colour:

# %%
with torch.no_grad():
    ensemble = torch.stack(
        [
            torch.nn.functional.normalize(
                C.encode_text(
                    clip_model,
                    tokenizer,
                    [C.toy_phrase("hair", v)]
                    + [
                        f"{C.toy_phrase('hair', v)} , {C.toy_phrase('hairstyle', h)}"
                        for h in attributes["hairstyle"]
                    ],
                ),
                dim=-1,
            ).mean(0)
            for v in attributes["hair"]
        ]
    )  # (5, 64)
    pred = C.cosine_similarity_matrix(image_embeds, ensemble).argmax(1)
truth = torch.tensor([attributes["hair"].index(lab["hair"]) for lab in labels])
print(
    f"hair: single prompt {accuracy['hair']:.1%}, ensemble {float((pred == truth).float().mean()):.1%}, "
    f"majority {majority['hair']:.1%}"
)

# %% [markdown]
# **4.** Raw pixels are dominated by the large uniform areas:

# %%
sims = C.cosine_similarity_matrix(pixels - pixels.mean(0), pixels - pixels.mean(0)).fill_diagonal_(-2.0)
nearest = sims.argmax(1)
wrong = (who[nearest] != who).nonzero().flatten().tolist()
for attr in ("background", "shirt", "hair"):
    shared = np.mean([labels[i][attr] == labels[int(nearest[i])][attr] for i in wrong])
    print(f"pixel-retrieval misses whose retrieved image has the same {attr:10s}: {shared:.0%}")

# %% [markdown]
# **5.** Count on the meta device: the query and output projections cost the same for any context; only the
# key/value projections and the two matrix products grow with the number of tokens.

# %%
with torch.device("meta"):
    attn_sd = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40)
    fmap = torch.empty(1, 64 * 64, 320)
    flops = {n: count_flops(attn_sd, fmap, encoder_hidden_states=torch.empty(1, n, 768)) for n in (1, 77)}
print(
    f"1 token: {human(flops[1], 'FLOP')}, 77 tokens: {human(flops[77], 'FLOP')}, ratio "
    f"{flops[77] / flops[1]:.2f}"
)

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import numpy as np
import torch
import torch.nn.functional as F

from anim_lab import clip as lab_clip
from anim_lab import toy as lab_toy
from anim_lab import vae as lab_vae

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): CLIP's preprocessing, in torch
# Write `my_clip_preprocess(images, size, crop_size, mean, std)`: `(B, 3, H, W)` in [-1, 1] to
# `(B, 3, crop_size, crop_size)`. Map to [0, 1]; resize so that the shortest edge is `size` and the long edge
# `int(size * long / short)` (bicubic, antialiased, clamped to [0, 1]; skip the resize when the size does not
# change); centre-crop with the top-left corner at `((H' - crop) // 2, (W' - crop) // 2)`; normalise per
# channel with `mean` and `std`.


# %% nbgrader={"grade": false, "grade_id": "ch03_clip_preprocess", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_clip_preprocess(images, size, crop_size, mean, std):
    ### BEGIN SOLUTION
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    new_hw = (new_short, new_long) if h <= w else (new_long, new_short)
    if new_hw != (h, w):
        x = F.interpolate(x, size=new_hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_hw[0] - crop_size) // 2, (new_hw[1] - crop_size) // 2
    x = x[:, :, top : top + crop_size, left : left + crop_size]
    return (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch03_clip_preprocess_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(3)
cases = [
    ((2, 3, 64, 64), 32, 32),
    ((1, 3, 48, 80), 40, 36),
    ((2, 3, 90, 50), 24, 20),
    ((1, 3, 28, 28), 28, 28),
]
for shape, size, crop in cases:
    images = torch.rand(shape, generator=gen) * 2 - 1
    mean, std = (
        tuple(torch.rand(3, generator=gen).tolist()),
        tuple((torch.rand(3, generator=gen) + 0.2).tolist()),
    )
    expected = lab_clip.ClipPreprocess(size, crop, mean, std)(images)
    torch.testing.assert_close(my_clip_preprocess(images, size, crop, mean, std), expected)
print(f"my_clip_preprocess matches clip.ClipPreprocess on {len(cases)} image sizes")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): all-pairs cosine similarity
# Write `my_cosine_similarity_matrix(a, b)`: `(N, D)` and `(M, D)` to the `(N, M)` matrix of cosine
# similarities (in float32).


# %% nbgrader={"grade": false, "grade_id": "ch03_cosine_similarity_matrix", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_cosine_similarity_matrix(a, b):
    ### BEGIN SOLUTION
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch03_cosine_similarity_matrix_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_cosine_similarity_matrix is not lab_clip.cosine_similarity_matrix
gen = torch.Generator().manual_seed(4)
for n, m, d in [(3, 5, 8), (1, 1, 64), (7, 2, 3)]:
    a, b = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen) * 10
    torch.testing.assert_close(my_cosine_similarity_matrix(a, b), lab_clip.cosine_similarity_matrix(a, b))
print("my_cosine_similarity_matrix matches clip.cosine_similarity_matrix on 3 shapes")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# How much does the toy CLIP's token change when the head turns? Render `toy.identity_from_seed(3)` at 128 px
# with `toy.HeadPose(yaw=-25)` and with `toy.HeadPose(yaw=25)`, encode both with the toy image encoder
# (`clip.load_toy_image_encoder()`, `clip.encode_image` with its default preprocessing) and store the cosine
# similarity of the two tokens, a float, in `pose_similarity`.

# %% nbgrader={"grade": false, "grade_id": "ch03_pose_similarity", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
lab_encoder = lab_clip.load_toy_image_encoder()
frames = [
    lab_toy.render(lab_toy.identity_from_seed(3), lab_toy.HeadPose(yaw=y), size=128)[0] for y in (-25, 25)
]
with torch.no_grad():
    tokens = lab_clip.encode_image(lab_encoder, lab_vae.images_from_uint8(np.stack(frames)))  # (2, 1, D)
pose_similarity = float(lab_clip.cosine_similarity(tokens[0, 0], tokens[1, 0]))
### END SOLUTION
print(f"cosine similarity of the two tokens: {pose_similarity:.3f}")

# %% nbgrader={"grade": true, "grade_id": "ch03_pose_similarity_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(pose_similarity, float) and -1 <= pose_similarity <= 1
### BEGIN HIDDEN TESTS
_enc = lab_clip.load_toy_image_encoder()
_x = [lab_toy.render(lab_toy.identity_from_seed(3), lab_toy.HeadPose(yaw=y), size=128)[0] for y in (-25, 25)]
with torch.no_grad():
    _t = lab_clip.encode_image(_enc, lab_vae.images_from_uint8(np.stack(_x)))
assert abs(pose_similarity - float(lab_clip.cosine_similarity(_t[0, 0], _t[1, 0]))) < 0.01
### END HIDDEN TESTS
print("pose_similarity is a cosine")
