"""The UNets of AnimateAnyone: Stable Diffusion 1.5's 2D UNet applied per frame, plus motion modules.

Built from diffusers' own pieces: a ``UNet2DConditionModel`` is constructed from the kwargs in
``anim_lab.configs`` and its children (``conv_in``, ``time_embedding``, ``down_blocks`` of ``ResnetBlock2D`` +
``Transformer2DModel``, ``mid_block``, ``up_blocks``, ``conv_norm_out``/``conv_out``) become ours under the
same attribute names. So every 2D key equals diffusers' name (SD1.5
``unet/diffusion_pytorch_model.safetensors`` loads without renaming), and the ``motion_modules`` lists sit
inside the blocks where the official checkpoints put them
(``down_blocks.0.motion_modules.0.temporal_transformer...``).

What diffusers' block ``forward``s cannot do is run a motion module after each resnet/attention pair, so the
walk through the blocks is written out here (``_UNetBody._walk``), in the order of Moore-AnimateAnyone's
UNet3D:

    sample (B, 4, F, H, W) -> (B*F, 4, H, W)                    every 2D layer sees frames as a batch
    h = conv_in(sample) [+ pose features]                       (B*F, C0, H, W)
    temb = time_embedding(sinusoid(t)), repeated per frame      (B*F, 4*C0): added inside every resnet
    down block i:  [resnet -> cross-attn transformer -> motion module] x layers, each output kept as a skip;
                   downsample (stride-2 conv), also kept; [+ pose features i+1, main path only]
    mid block:     resnet -> transformer -> motion module -> resnet
    up block i:    [concat the last skip -> resnet -> transformer -> motion module] x (layers + 1); upsample
    head:          GroupNorm (per frame) -> SiLU -> conv_out     (B*F, 4, H, W) -> (B, 4, F, H, W)

``VideoUNet`` is the denoising UNet (with or without motion modules; the pose guider's features are added
after ``conv_in``, or, for AniPortrait's multi-scale guider, also after every down block). With
``audio_kwargs`` it is Hallo's denoising UNet: an ``audio_modules`` list (``anim_lab.hallo.AudioModule``)
in every block with cross-attention, run after each spatial transformer and before its motion module, on
per-frame audio tokens masked by face regions; the motion modules may also see motion frames prepended
along time (``motion_frame_features``). Without ``audio_kwargs`` nothing of this exists: same keys, same
walk.
``ReferenceUNet`` is the 2D UNet without ``conv_norm_out``/``conv_out``, as in the reference code: it only
runs so that its transformer blocks' self-attention inputs can be read (``anim_lab.reference``). Both UNets
expose their attention processors by module name (``attn_processors`` / ``set_attn_processor``). Both build
on the ``meta`` device at SD15 size (``with torch.device("meta"): VideoUNet(SD15.unet, MOTION_SD15)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import Attention
from einops import rearrange, repeat
from torch import nn

from .errors import InputError
from .motion import MotionModule, motion_module_kwargs

__all__ = ["build_unet2d", "VideoUNet", "ReferenceUNet", "MOTION_KEY", "AUDIO_KEY"]

MOTION_KEY = "motion_modules"  # every motion-module key contains this (how motion_module.pth was saved)
AUDIO_KEY = "audio_modules"  # every key of Hallo's audio modules contains this (as in net.pth)


def build_unet2d(unet_kwargs: dict) -> UNet2DConditionModel:
    """diffusers' 2D UNet from plain kwargs (``configs.SD15.unet``); config.json's ``_`` entries dropped."""
    kwargs = {k: v for k, v in unet_kwargs.items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config(kwargs)


@dataclass
class _HalloInputs:
    """What Hallo's audio modules and motion frames need during one denoising-UNet call (built and checked
    by ``VideoUNet._hallo_inputs``).

    tokens (N*F, T, D): each frame's audio tokens; masks[level]: (full, face, lip), each (N*F, h*w, 1);
    motion_scale: the three regions' weights; motion_frame_features: {attn1 name: (N, n, h*w, C)} or None;
    faithful: skip the motion modules of blocks without attention, as Hallo's inference does."""

    tokens: torch.Tensor
    masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    motion_scale: tuple[float, float, float]
    motion_frame_features: dict[str, torch.Tensor] | None
    faithful: bool
    videos: int

    def masks_at(self, level: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        if level >= len(self.masks) or self.masks[level][0].shape[1] != height * width:
            have = [m[0].shape[1] for m in self.masks]
            raise InputError(
                f"audio_masks: level {level} works on {height}x{width} = {height * width} positions, but the "
                f"masks have {have} positions per level; make them for this latent size "
                "(anim_lab.hallo.face_region_masks with the image's height and width)"
            )
        return self.masks[level]

    def motion_frames_at(self, attention_name: str, x: torch.Tensor) -> torch.Tensor:
        """The motion frames before the motion module after ``attention_name``: (N, n, C, h, w)."""
        key = f"{attention_name}.transformer_blocks.0.attn1"
        if key not in self.motion_frame_features:
            raise InputError(
                f"motion_frame_features has no entry {key!r}: give one per spatial attn1 "
                "(anim_lab.hallo.split_motion_bank of a bank written with the motion frames)"
            )
        feats = self.motion_frame_features[key]  # (N, n, h*w, C)
        _, channels, height, width = x.shape
        if feats.ndim != 4 or feats.shape[0] != self.videos or feats.shape[2:] != (height * width, channels):
            raise InputError(
                f"motion_frame_features[{key!r}] must be ({self.videos}, n, {height * width}, {channels}); "
                f"got {tuple(feats.shape)}"
            )
        return rearrange(feats, "b n (h w) c -> b n c h w", h=height).to(x.dtype)


class _UNetBody(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """conv_in, time embedding, down/mid/up blocks of a diffusers UNet2DConditionModel, walked in order.

    A diffusers model: its constructor arguments are its config, so ``save_pretrained(folder)`` writes
    config.json + diffusion_pytorch_model.safetensors and ``from_pretrained(folder)`` reads them back, as for
    diffusers' own UNets. (The official ``.pth`` checkpoints load with
    ``anim_lab.weights.load_official_video_unet`` / ``load_official_reference_unet``.)"""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        unet_kwargs: dict,
        motion_kwargs: dict | None = None,
        audio_kwargs: dict | None = None,
    ):
        super().__init__()
        unsupported = [
            n
            for n in ("class_embedding", "add_embedding", "encoder_hid_proj")
            if getattr(unet, n, None) is not None
        ]
        if unsupported or unet.mid_block is None or unet.config.time_cond_proj_dim is not None:
            raise InputError(
                "anim_lab's UNets cover the SD1.5 family (no class/added/hidden-projection embeddings, "
                f"a mid block); this config has {unsupported or 'no mid block or a time_cond_proj'}"
            )
        self.unet_kwargs = dict(unet_kwargs)
        self.motion_kwargs = dict(motion_kwargs) if motion_kwargs else None
        self.audio_kwargs = dict(audio_kwargs) if audio_kwargs else None
        # The 2D UNet's children, adopted under the same names so the state-dict keys are diffusers' keys.
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj  # sinusoidal timestep features, no parameters
        self.time_embedding = unet.time_embedding  # linear_1 -> SiLU -> linear_2
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        self.up_blocks = unet.up_blocks
        if motion_kwargs:
            self._add_motion_modules(motion_kwargs)
        if audio_kwargs:
            self._add_audio_modules(audio_kwargs)

    # --- motion modules ----------------------------------------------------------------------------
    def _add_motion_modules(self, motion: dict) -> None:
        """A ``motion_modules`` list in each selected block: one per resnet (down/up), per attention (mid)."""
        kwargs = motion_module_kwargs(motion)
        resolutions = set(motion.get("motion_module_resolutions", (1, 2, 4, 8)))
        n = len(self.down_blocks)
        for i, block in enumerate(self.down_blocks):
            if 2**i in resolutions:  # block i works at 1/2**i of the latent size
                block.motion_modules = nn.ModuleList(
                    [MotionModule(r.out_channels, **kwargs) for r in block.resnets]
                )
        if motion.get("motion_module_mid_block", True):
            channels = self.mid_block.resnets[0].out_channels
            self.mid_block.motion_modules = nn.ModuleList(
                [MotionModule(channels, **kwargs) for _ in self.mid_block.attentions]
            )
        for i, block in enumerate(self.up_blocks):
            if 2 ** (n - 1 - i) in resolutions:
                block.motion_modules = nn.ModuleList(
                    [MotionModule(r.out_channels, **kwargs) for r in block.resnets]
                )

    @property
    def has_motion_modules(self) -> bool:
        return self.motion_kwargs is not None

    # --- audio modules (Hallo) ---------------------------------------------------------------------
    def _add_audio_modules(self, audio: dict) -> None:
        """An ``audio_modules`` list beside ``attentions`` in every block that has them (Hallo's 16 places for
        SD1.5), sized as Hallo sizes them (``anim_lab.hallo.audio_module_places``)."""
        from .hallo import AudioModule, audio_module_places

        unknown = set(audio) - {"audio_attention_dim", "zero_initialize"}
        if unknown or "audio_attention_dim" not in audio:
            raise InputError(
                f"audio_kwargs takes audio_attention_dim (the audio tokens' width) and zero_initialize; got "
                f"{sorted(audio)} (e.g. anim_lab.hallo.AUDIO_MODULES_SD15)"
            )
        for name, specs in audio_module_places(self).items():
            block = self.get_submodule(name)
            block.audio_modules = nn.ModuleList(
                [
                    AudioModule(
                        channels,
                        inner,
                        heads,
                        audio["audio_attention_dim"],
                        groups,
                        audio.get("zero_initialize", True),
                    )
                    for channels, inner, heads, groups in specs
                ]
            )

    @property
    def has_audio_modules(self) -> bool:
        return self.audio_kwargs is not None

    def motion_modules(self) -> list[tuple[str, MotionModule]]:
        """(name, module) of every motion module, in state-dict order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MotionModule)]

    # --- attention processors ----------------------------------------------------------------------
    @property
    def attn_processors(self) -> dict[str, object]:
        """Every attention's processor, keyed as diffusers keys them: ``"<module name>.processor"``.

        Spatial attentions (``...transformer_blocks.0.attn1`` self-attention, ``attn2`` cross-attention to the
        CLIP tokens) run ``AttnProcessor2_0``; the motion modules' temporal ones
        (``...motion_modules.i...attention_blocks.j``) run ``TemporalAttnProcessor``."""
        return {f"{n}.processor": m.processor for n, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor) -> None:
        """Set processors by module name, as diffusers' ``set_attn_processor`` does, but for any subset.

        ``processor``: a dict ``{name: processor}`` whose names are attention module names (with or without
        diffusers' ``.processor`` suffix), e.g. ``{"mid_block.attentions.0.transformer_blocks.0.attn1": p}``;
        or one processor, which goes to every *spatial* attention (attn1 and attn2) -- the motion modules'
        temporal attentions keep theirs (a spatial processor would attend over pixels instead of frames), set
        them by name. An unknown name raises and changes nothing."""
        attentions = {n: m for n, m in self.named_modules() if isinstance(m, Attention)}
        if isinstance(processor, dict):
            chosen = {name.removesuffix(".processor"): p for name, p in processor.items()}
            unknown = sorted(set(chosen) - set(attentions))
            if unknown:
                raise InputError(
                    f"no attention named {unknown[:3]}{' ...' if len(unknown) > 3 else ''} in this UNet; "
                    "see .attn_processors for the names (e.g. "
                    f"{next(iter(attentions), '')!r})"
                )
        else:
            chosen = {n: processor for n in attentions if MOTION_KEY not in n}
        for name, p in chosen.items():
            attentions[name].set_processor(p)

    # --- inputs ------------------------------------------------------------------------------------
    def _time_embedding(
        self, timestep, batch_size: int, sample: torch.Tensor, num_frames: int = 1
    ) -> torch.Tensor:
        """timestep: a number, a 0-d tensor or one per sample (B,) -> temb (B*F, 4*C0), equal over frames.

        The timesteps are repeated per frame *before* the embedding, so every row is computed exactly as a 2D
        UNet computes it for a batch of B*F images (bit-identical, not only close)."""
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(batch_size)  # () -> (B,)
        if t.shape != (batch_size,):
            raise InputError(f"timestep must be a number or have shape ({batch_size},), got {tuple(t.shape)}")
        t = repeat(t, "b -> (b f)", f=num_frames)  # (B,) -> (B*F,)
        t_emb = self.time_proj(t).to(sample.dtype)  # (B*F,) -> (B*F, C0) sinusoidal features
        return self.time_embedding(t_emb)  # (B*F, C0) -> (B*F, 4*C0)

    # --- the walk ----------------------------------------------------------------------------------
    def _walk(
        self,
        h: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        num_frames: int,
        cross_attention_kwargs: dict | None = None,
        down_block_additional_features: Sequence[torch.Tensor] | None = None,
        use_motion_modules: bool = True,
        hallo: _HalloInputs | None = None,
    ) -> torch.Tensor:
        """Down, mid and up blocks on per-frame features h (B*F, C0, H, W) -> (B*F, C0, H, W).

        ``down_block_additional_features``: one tensor per down block, (B*F, C_k, h_k, w_k), added to the main
        path after down block k (after its downsampler), as AniPortrait adds its pose features fea[k+1]; the
        skips already taken are left unchanged. Checked by the caller (``_pose_features``).
        ``hallo``: the audio modules' inputs and the motion frames (Hallo's UNet); ``level`` counts the
        downsamplings so far, the index of the face-region masks at the current resolution.
        """
        level = 0

        def audio_step(block, i: int, x: torch.Tensor) -> torch.Tensor:
            modules = getattr(block, AUDIO_KEY, None)
            if modules is None or hallo is None:
                return x
            return modules[i](x, hallo.tokens, hallo.masks_at(level, x), hallo.motion_scale)

        def motion_step(motion, i: int, x: torch.Tensor, attention_name: str | None) -> torch.Tensor:
            if hallo is None or hallo.motion_frame_features is None or attention_name is None:
                return motion[i](x, num_frames)  # attention across the clip's frames
            # Hallo: the motion frames' attn1 inputs go in front of the clip along time, then are sliced off
            extra = hallo.motion_frames_at(attention_name, x)  # (B, n, C, h, w)
            n = extra.shape[1]
            clip = rearrange(x, "(b f) c h w -> b f c h w", f=num_frames)
            both = torch.cat([extra, clip], dim=1)  # (B, n + F, C, h, w)
            out = motion[i](rearrange(both, "b f c h w -> (b f) c h w"), n + num_frames)
            out = rearrange(out, "(b f) c h w -> b f c h w", f=n + num_frames)[:, n:]  # the clip's F frames
            return rearrange(out, "b f c h w -> (b f) c h w")

        def motion_of(block, attentions):
            motion = getattr(block, "motion_modules", None) if use_motion_modules else None
            if motion is not None and attentions is None and hallo is not None and hallo.faithful:
                return None  # Hallo's checkpointed DownBlock3D / UpBlock3D run their resnets only
            return motion

        def transformer(attn, x):
            return attn(
                x,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]

        skips = [h]  # every down-path output, consumed last-in-first-out by the up path
        for k, block in enumerate(self.down_blocks):
            attentions = getattr(block, "attentions", None)
            motion = motion_of(block, attentions)
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb)  # (B*F, C_in, h, w) -> (B*F, C, h, w)
                if attentions is not None:
                    h = transformer(attentions[i], h)  # spatial self-attn, cross-attn to CLIP tokens, FF
                h = audio_step(block, i, h)  # Hallo: masked cross-attention to the audio tokens
                if motion is not None:
                    name = f"down_blocks.{k}.attentions.{i}" if attentions is not None else None
                    h = motion_step(motion, i, h, name)  # attention across frames
                skips.append(h)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)  # (B*F, C, h, w) -> (B*F, C, h/2, w/2)
                skips.append(h)
                level += 1
            if down_block_additional_features is not None:
                h = h + down_block_additional_features[k]  # main path only: the skips above keep h without it

        mid = self.mid_block
        motion = motion_of(mid, mid.attentions)
        h = mid.resnets[0](h, temb)
        for i, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
            h = transformer(attn, h)
            h = audio_step(mid, i, h)
            if motion is not None:
                h = motion_step(motion, i, h, f"mid_block.attentions.{i}")
            h = resnet(h, temb)

        for k, block in enumerate(self.up_blocks):
            attentions = getattr(block, "attentions", None)
            motion = motion_of(block, attentions)
            for i, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)  # (B*F, C + C_skip, h, w): skips are concatenated
                h = resnet(h, temb)  # -> (B*F, C, h, w)
                if attentions is not None:
                    h = transformer(attentions[i], h)
                h = audio_step(block, i, h)
                if motion is not None:
                    name = f"up_blocks.{k}.attentions.{i}" if attentions is not None else None
                    h = motion_step(motion, i, h, name)
            if block.upsamplers is not None:
                for up in block.upsamplers:
                    h = up(h, skips[-1].shape[-2:])  # (B*F, C, h, w) -> the size of the next skip (2h, 2w)
                level -= 1
        return h


class VideoUNet(_UNetBody):
    """The denoising UNet: SD1.5's 2D UNet per frame, with motion modules when ``motion_kwargs`` is given.

    ``VideoUNet(configs.SD15.unet, MOTION_SD15)``; ``motion_kwargs=None`` gives the stage-1 (image) denoiser.
    ``audio_kwargs`` (``anim_lab.hallo.AUDIO_MODULES_SD15``) adds Hallo's audio modules.
    forward(sample (B, 4, F, H, W), timestep, encoder_hidden_states (B, N, D) or (B*F, N, D),
            pose_cond_fea (B, C0, F, H, W) or None) -> (B, 4, F, H, W).
    """

    @register_to_config
    def __init__(
        self, unet_kwargs: dict, motion_kwargs: dict | None = None, audio_kwargs: dict | None = None
    ):
        unet = build_unet2d(unet_kwargs)
        super().__init__(unet, unet_kwargs, motion_kwargs, audio_kwargs)
        self.conv_norm_out = unet.conv_norm_out  # GroupNorm, per frame here (use_inflated_groupnorm)
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        pose_cond_fea: torch.Tensor | Sequence[torch.Tensor] | None = None,
        cross_attention_kwargs: dict | None = None,
        use_motion_modules: bool = True,
        audio_tokens: torch.Tensor | None = None,
        audio_masks=None,
        motion_scale: Sequence[float] | None = None,
        motion_frame_features: dict[str, torch.Tensor] | None = None,
        faithful: bool = False,
    ) -> torch.Tensor:
        """sample (B, 4, F, H, W), timestep, encoder_hidden_states (B, N, D) / (B*F, N, D) -> (B, 4, F, H, W).

        ``pose_cond_fea``: one tensor (B, C0, F, H, W), added after ``conv_in`` (AnimateAnyone's PoseGuider,
        Hallo's face locator), or a list of 1 + len(down_blocks) tensors (AniPortrait's multi-scale guider):
        [0] added after ``conv_in``, [k] added to the main path after down block k (shapes in
        ``pose_feature_shapes``). ``cross_attention_kwargs`` go to every spatial attention, as in diffusers.
        ``use_motion_modules=False`` skips the motion modules: the stage-1 image denoiser, frame by frame (an
        ablation; the 2D weights are the same).

        Hallo (a UNet built with ``audio_kwargs``; see ``anim_lab.hallo``):
        ``audio_tokens`` (B, F, T, D): each frame's audio tokens (``AudioProjModel``; zeros for the
        unconditional videos). ``audio_masks``: ``FaceRegionMasks`` or ``{"full"|"face"|"lip": [per level]}``,
        level l at 1/2**l of the latent, each (h_l, w_l) (shared), (B, h_l, w_l) or (B, F, h_l, w_l).
        ``motion_scale``: the (full, face, lip) weights, default (1, 1, 1). ``motion_frame_features``:
        {attn1 name: (B, n, h*w, C)} (``hallo.split_motion_bank``), prepended along time before the motion
        module after that transformer. ``faithful=True``: skip the motion modules of blocks without spatial
        attention, as Hallo's inference does.
        """
        if sample.ndim != 5:
            raise InputError(
                f"VideoUNet takes a video latent (B, C, F, H, W), got shape {tuple(sample.shape)}; "
                "for a single image use F=1 (sample[:, :, None])"
            )
        batch, _, num_frames, height, width = sample.shape
        h = rearrange(sample, "b c f h w -> (b f) c h w")  # (B, C, F, H, W) -> (B*F, C, H, W)

        # One timestep per video, repeated for its frames: (B,) -> (B*F,) -> temb (B*F, 4*C0)
        temb = self._time_embedding(timestep, batch, sample, num_frames)

        # CLIP tokens: one set per video, repeated for its frames, unless already given per frame.
        n_rows = encoder_hidden_states.shape[0]
        if encoder_hidden_states.ndim != 3 or n_rows not in (batch, batch * num_frames):
            raise InputError(
                f"encoder_hidden_states must be (B, N, D) or (B*F, N, D) with B={batch}, F={num_frames}; "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if n_rows != batch * num_frames:
            encoder_hidden_states = repeat(encoder_hidden_states, "b n d -> (b f) n d", f=num_frames)

        hallo = self._hallo_inputs(
            batch, num_frames, audio_tokens, audio_masks, motion_scale, motion_frame_features, faithful, h
        )
        pose_in, pose_after_down = self._pose_features(pose_cond_fea, batch, num_frames, height, width)
        h = self.conv_in(h)  # (B*F, 4, H, W) -> (B*F, C0, H, W)
        if pose_in is not None:
            h = h + pose_in  # added once, after conv_in (before the first skip is taken)

        h = self._walk(
            h,
            temb,
            encoder_hidden_states,
            num_frames,
            cross_attention_kwargs,
            pose_after_down,
            use_motion_modules,
            hallo,
        )  # (B*F, C0, H, W)

        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B*F, C0, H, W) -> (B*F, 4, H, W)
        return rearrange(h, "(b f) c h w -> b c f h w", f=num_frames)  # -> (B, 4, F, H, W)

    # --- Hallo's inputs ----------------------------------------------------------------------------
    def _hallo_inputs(
        self,
        batch: int,
        num_frames: int,
        audio_tokens: torch.Tensor | None,
        audio_masks,
        motion_scale: Sequence[float] | None,
        motion_frame_features: dict[str, torch.Tensor] | None,
        faithful: bool,
        like: torch.Tensor,
    ) -> _HalloInputs | None:
        """Check and lay out the audio inputs per frame; None for a UNet without audio modules."""
        given = [
            n
            for n, v in (
                ("audio_tokens", audio_tokens),
                ("audio_masks", audio_masks),
                ("motion_scale", motion_scale),
                ("motion_frame_features", motion_frame_features),
            )
            if v is not None
        ] + (["faithful"] if faithful else [])
        if not self.has_audio_modules:
            if given:
                raise InputError(
                    f"{given} are Hallo's inputs, for a VideoUNet built with audio_kwargs (audio modules); "
                    "this one has none"
                )
            return None
        if audio_tokens is None or audio_masks is None:
            raise InputError(
                "this VideoUNet has audio modules: give audio_tokens (B, F, T, D) and audio_masks "
                "(anim_lab.hallo.face_region_masks); zeros for unconditional audio"
            )
        width = self.audio_kwargs["audio_attention_dim"]
        if (
            audio_tokens.ndim != 4
            or audio_tokens.shape[:2] != (batch, num_frames)
            or audio_tokens.shape[3] != width
        ):
            raise InputError(
                f"audio_tokens must be (B={batch}, F={num_frames}, T, {width}); "
                f"got {tuple(audio_tokens.shape)}"
            )
        tokens = rearrange(audio_tokens, "b f t d -> (b f) t d").to(like.dtype)  # (B*F, T, D)
        regions = ("full", "face", "lip")
        per_region = {r: getattr(audio_masks, r, None) for r in regions}
        if isinstance(audio_masks, dict):
            per_region = {r: audio_masks.get(r) for r in regions}
        if any(v is None for v in per_region.values()) or len({len(v) for v in per_region.values()}) != 1:
            raise InputError(
                "audio_masks must give 'full', 'face' and 'lip', each a list with one map per level "
                "(anim_lab.hallo.FaceRegionMasks)"
            )

        def per_frame(m) -> torch.Tensor:
            m = torch.as_tensor(m, device=like.device, dtype=like.dtype)
            if m.ndim == 2:  # (h, w): one map for every video and frame
                m = m.expand(batch, num_frames, *m.shape)
            elif m.ndim == 3:  # (B, h, w): one per video
                m = m[:, None].expand(-1, num_frames, -1, -1)
            if m.ndim != 4 or m.shape[:2] != (batch, num_frames):
                raise InputError(
                    f"each mask must be (h, w), (B={batch}, h, w) or (B, F={num_frames}, h, w); "
                    f"got {tuple(m.shape)}"
                )
            return rearrange(m, "b f h w -> (b f) (h w) 1")  # (B*F, h*w, 1)

        masks = [
            tuple(per_frame(per_region[r][level]) for r in regions)
            for level in range(len(per_region["full"]))
        ]
        scale = (1.0, 1.0, 1.0) if motion_scale is None else tuple(float(s) for s in motion_scale)
        if len(scale) != 3:
            raise InputError(f"motion_scale takes 3 weights (full, face, lip); got {motion_scale}")
        return _HalloInputs(tokens, masks, scale, motion_frame_features, faithful, batch)

    # --- pose features -----------------------------------------------------------------------------
    def pose_feature_shapes(
        self, batch: int, num_frames: int, height: int, width: int
    ) -> list[tuple[int, int, int, int, int]]:
        """The shapes of the multi-scale pose features for a latent (B, 4, F, H, W): [0] ``conv_in``'s output
        (B, C0, F, H, W), [k] the output of down block k-1 (its last resnet's width, after its downsampler).
        SD1.5 at 64x64: 320@64, 320@32, 640@16, 1280@8, 1280@8 -- AniPortrait's fea[0..4]."""
        shapes = [(batch, self.conv_in.weight.shape[0], num_frames, height, width)]  # C0 (a LoRA wrapper too)
        for block in self.down_blocks:
            if block.downsamplers is not None:  # stride-2 conv, padding 1: ceil(h / 2)
                height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((batch, block.resnets[-1].out_channels, num_frames, height, width))
        return shapes

    def _pose_features(
        self,
        pose_cond_fea: torch.Tensor | Sequence[torch.Tensor] | None,
        batch: int,
        num_frames: int,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """Check pose_cond_fea -> (the conv_in addition (B*F, C0, H, W) or None, the per-down-block additions
        [(B*F, C_k, h_k, w_k)] or None)."""
        if pose_cond_fea is None:
            return None, None
        expected = self.pose_feature_shapes(batch, num_frames, height, width)
        multi = not isinstance(pose_cond_fea, torch.Tensor)
        features = list(pose_cond_fea) if multi else [pose_cond_fea]
        if multi and len(features) != len(expected):
            raise InputError(
                f"pose_cond_fea as a list needs {len(expected)} tensors (one after conv_in, one after "
                f"each of the {len(expected) - 1} down blocks) with shapes {expected}; got {len(features)}"
            )
        wanted = expected[: len(features)]
        got = [tuple(f.shape) for f in features]
        if got != wanted:
            what = "pose_cond_fea (multi-scale)" if multi else "pose_cond_fea (B, C0, F, H, W)"
            raise InputError(
                f"{what} must have shapes {wanted if multi else wanted[0]} (the pose guider's output for "
                f"this latent); got {got if multi else got[0]}"
            )
        # (B, C_k, F, h_k, w_k) -> (B*F, C_k, h_k, w_k): the per-frame layout of the walk
        per_frame = [rearrange(f, "b c f h w -> (b f) c h w") for f in features]
        return per_frame[0], (per_frame[1:] if multi else None)

    # --- weights -----------------------------------------------------------------------------------
    def load_2d_weights(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """SD1.5 UNet weights or a stage-1 ``denoising_unet.pth``: every 2D key must be there; the motion
        modules keep what they have (their keys may be in the file too)."""
        from .weights import load_into

        load_into(self, state_dict, ignore_missing=(MOTION_KEY,), assign=assign)

    def load_motion_modules(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """``motion_module.pth`` / ``mm_sd_v15_v2.ckpt``: every motion key (``pe`` buffers may be absent)."""
        from .weights import fill_position_encodings, load_into

        if not self.has_motion_modules:
            raise InputError("this VideoUNet was built without motion modules (motion_kwargs=None)")
        own = {k for k in self.state_dict() if MOTION_KEY in k}
        state_dict = fill_position_encodings(
            state_dict, self.motion_kwargs["temporal_position_encoding_max_len"], own
        )
        load_into(self, state_dict, subset=MOTION_KEY, assign=assign)


class ReferenceUNet(_UNetBody):
    """The reference UNet (ReferenceNet): the 2D UNet without conv_norm_out/conv_out, as the reference has it.

    forward(sample (B, 4, H, W), timestep, encoder_hidden_states (B, N, D)) -> the last up block's features
    (B, C0, H, W). What matters is not that output but what its transformer blocks see (``anim_lab.reference``
    reads their attn1 inputs by module name, ``down_blocks.i.attentions.j.transformer_blocks.0.attn1``).
    """

    @register_to_config
    def __init__(self, unet_kwargs: dict):
        # conv_norm_out / conv_out are left out: they are not in reference_unet.pth
        super().__init__(build_unet2d(unet_kwargs), unet_kwargs, motion_kwargs=None)

    def forward(
        self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, cross_attention_kwargs=None
    ) -> torch.Tensor:
        if sample.ndim != 4:
            raise InputError(
                f"ReferenceUNet takes an image latent (B, C, H, W), got shape {tuple(sample.shape)}"
            )
        batch = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise InputError(
                f"encoder_hidden_states must be (B={batch}, N, D), got {tuple(encoder_hidden_states.shape)}"
            )
        temb = self._time_embedding(timestep, batch, sample)  # (B, 4*C0)
        h = self.conv_in(sample)  # (B, 4, H, W) -> (B, C0, H, W)
        return self._walk(h, temb, encoder_hidden_states, 1, cross_attention_kwargs)  # (B, C0, H, W)

    def load_weights(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """``reference_unet.pth`` (682 keys) or SD1.5 UNet weights (their conv_norm_out/conv_out unused)."""
        from .weights import load_into

        load_into(self, state_dict, ignore_unexpected=("conv_norm_out.", "conv_out."), assign=assign)
