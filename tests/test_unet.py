"""The video UNet and the reference UNet against diffusers' UNet2DConditionModel, and their keys against the
official checkpoints' key lists (SD15 size, meta device)."""

from collections import Counter

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange, repeat
from keylists import CHECKPOINT_KEYS, read_key_list

from anim_lab.configs import SD15, TINY
from anim_lab.motion import MOTION_SD15, MOTION_TINY, MotionModule, TemporalAttnProcessor
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d

B, F, S = 2, 3, 16  # 2 videos of 3 frames, 16x16 latents (TINY: 16 -> 8 -> 4 -> 2)
D = TINY.unet["cross_attention_dim"]


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def wake_motion_modules(model: VideoUNet, seed: int = 0) -> None:
    """Give every motion module a random proj_out (fresh ones are zero), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.motion_modules():
            proj = m.temporal_transformer.proj_out
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.2)
            proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    video = VideoUNet(TINY.unet, MOTION_TINY).eval()  # zero-initialised motion modules
    unet2d = build_unet2d(TINY.unet).eval()
    unet2d.load_state_dict(
        {k: v for k, v in video.state_dict().items() if "motion_modules" not in k}, strict=True
    )
    return video, unet2d


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(B, 4, F, S, S, generator=g)  # (B, C, F, H, W)
    tokens = torch.randn(B, 1, D, generator=g)  # one CLIP image token per video
    timestep = torch.tensor([10, 700])
    return sample, timestep, tokens


def run_2d_per_frame(unet2d, sample, timestep, tokens):
    """diffusers' 2D UNet on the (B*F) batch of frames, each frame with its video's timestep and tokens."""
    x = rearrange(sample, "b c f h w -> (b f) c h w")
    out = unet2d(
        x,
        repeat(timestep, "b -> (b f)", f=F),
        encoder_hidden_states=repeat(tokens, "b n d -> (b f) n d", f=F),
    )
    return rearrange(out.sample, "(b f) c h w -> b c f h w", f=F)


def test_zero_motion_video_unet_is_the_2d_unet_per_frame_exactly(models, inputs):
    video, unet2d = models
    with torch.no_grad():
        out = video(*inputs)
        ref = run_2d_per_frame(unet2d, *inputs)
        # one frame at a time: the float kernels differ with the batch size, so only close (the 2D UNet too)
        sample, timestep, tokens = inputs
        looped = torch.stack(
            [unet2d(sample[:, :, f], timestep, encoder_hidden_states=tokens).sample for f in range(F)], dim=2
        )
    assert out.shape == (B, 4, F, S, S)
    assert torch.equal(out, ref)  # bit for bit: motion modules at zero init add exactly 0
    torch.testing.assert_close(out, looped, atol=1e-5, rtol=1e-5)


def test_motion_modules_mix_frames_and_2d_part_does_not(models, inputs):
    video, unet2d = models
    sample, timestep, tokens = inputs
    changed = sample.clone()
    changed[:, :, 2] = torch.randn_like(changed[:, :, 2])  # change the last frame only
    awake = VideoUNet(TINY.unet, MOTION_TINY).eval()
    awake.load_state_dict(video.state_dict())
    wake_motion_modules(awake)
    with torch.no_grad():
        per_frame = video(sample, timestep, tokens)[:, :, 0], video(changed, timestep, tokens)[:, :, 0]
        temporal = awake(sample, timestep, tokens)[:, :, 0], awake(changed, timestep, tokens)[:, :, 0]
    assert torch.equal(*per_frame)  # frame 0 does not see frame 2 without motion modules
    assert (temporal[0] - temporal[1]).abs().max() > 1e-3  # with them, it does


def test_batch_of_two_equals_one_by_one(models, inputs):
    video, _ = models
    awake = VideoUNet(TINY.unet, MOTION_TINY).eval()
    awake.load_state_dict(video.state_dict())
    wake_motion_modules(awake, seed=3)
    sample, timestep, tokens = inputs
    pose = torch.randn(B, TINY.unet["block_out_channels"][0], F, S, S)
    with torch.no_grad():
        both = awake(sample, timestep, tokens, pose_cond_fea=pose)
        one_by_one = torch.cat(
            [
                awake(
                    sample[i : i + 1], timestep[i : i + 1], tokens[i : i + 1], pose_cond_fea=pose[i : i + 1]
                )
                for i in range(B)
            ]
        )
    torch.testing.assert_close(both, one_by_one, atol=1e-5, rtol=1e-5)


def test_pose_features_are_added_after_conv_in(models, inputs):
    video, _ = models
    sample, timestep, tokens = inputs
    pose = torch.randn(B, TINY.unet["block_out_channels"][0], F, S, S)
    with torch.no_grad():
        out = video(sample, timestep, tokens, pose_cond_fea=pose)
        hook = video.conv_in.register_forward_hook(
            lambda m, i, o: o + rearrange(pose, "b c f h w -> (b f) c h w")
        )
        try:
            ref = video(sample, timestep, tokens)
        finally:
            hook.remove()
        plain = video(sample, timestep, tokens)
    assert torch.equal(out, ref)
    assert (out - plain).abs().max() > 1e-3


def test_tokens_per_video_or_per_frame_and_scalar_timestep(models, inputs):
    video, _ = models
    sample, timestep, tokens = inputs
    with torch.no_grad():
        a = video(sample, 500, tokens)
        b = video(sample, torch.tensor([500, 500]), repeat(tokens, "b n d -> (b f) n d", f=F))
    assert torch.equal(a, b)


def test_reference_unet_is_the_2d_unet_without_its_head(models, inputs):
    video, unet2d = models
    ref = ReferenceUNet(TINY.unet).eval()
    ref.load_weights(
        unet2d.state_dict()
    )  # SD-style weights: conv_norm_out/conv_out are unexpected and skipped
    assert not hasattr(ref, "conv_out") and not hasattr(ref, "conv_norm_out")
    sample, timestep, tokens = inputs
    image = sample[:, :, 0]
    seen = {}
    hook = unet2d.conv_norm_out.register_forward_hook(lambda m, i, o: seen.setdefault("features", i[0]))
    try:
        with torch.no_grad():
            unet2d(image, timestep, encoder_hidden_states=tokens)
            features = ref(image, timestep, tokens)
    finally:
        hook.remove()
    assert features.shape == (B, TINY.unet["block_out_channels"][0], S, S)
    assert torch.equal(features, seen["features"])


def test_motion_module_placement_follows_resolutions():
    with torch.device("meta"):
        full = VideoUNet(TINY.unet, MOTION_TINY)
        top_only = VideoUNet(
            TINY.unet, dict(MOTION_TINY, motion_module_resolutions=(1,), motion_module_mid_block=False)
        )
    assert (
        len(full.motion_modules()) == 4 * 1 + 1 + 4 * 2
    )  # TINY: 1 layer per block -> 1 down, 2 up per level
    names = [n for n, _ in top_only.motion_modules()]
    assert names == [
        "down_blocks.0.motion_modules.0",
        "up_blocks.3.motion_modules.0",
        "up_blocks.3.motion_modules.1",
    ]
    assert all(isinstance(m, MotionModule) for _, m in full.motion_modules())


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):  # full size, no memory
        return VideoUNet(SD15.unet, MOTION_SD15), VideoUNet(SD15.unet, None), ReferenceUNet(SD15.unet)


def test_sd15_keys_and_shapes_equal_the_official_checkpoints(sd15):
    denoiser, stage1, reference = sd15
    full = read_key_list(CHECKPOINT_KEYS / "aa" / "denoising_unet_full.txt")
    motion = read_key_list(CHECKPOINT_KEYS / "aa" / "motion_module.txt")
    ref = read_key_list(CHECKPOINT_KEYS / "aa" / "reference_unet.txt")
    assert shapes(denoiser) == full  # 1274 keys: 686 2D + 588 motion
    assert {k: v for k, v in shapes(denoiser).items() if "motion_modules" in k} == motion
    assert shapes(reference) == ref  # 682 keys
    head = {k: v for k, v in full.items() if k.startswith(("conv_norm_out.", "conv_out."))}
    assert shapes(stage1) == {**ref, **head}  # denoising_unet.pth: 686 keys
    assert len(denoiser.motion_modules()) == 21
    # SD1.5's 2D keys are diffusers' names: the stage-1 denoiser has exactly the UNet2DConditionModel's state
    # dict
    with torch.device("meta"):
        assert shapes(build_unet2d(SD15.unet)) == shapes(stage1)
    # every attention, spatial and temporal, runs through torch's scaled_dot_product_attention: the 32
    # spatial ones (attn1, attn2 of 16 transformer blocks) with diffusers' processor, the 42 temporal ones
    # (2 per motion module) with the motion module's, which attends along frames
    processors = Counter(type(p).__name__ for p in denoiser.attn_processors.values())
    assert processors == {"AttnProcessor2_0": 32, "TemporalAttnProcessor": 42}
    assert Counter(type(p).__name__ for p in reference.attn_processors.values()) == {"AttnProcessor2_0": 32}
    # transformer blocks stay reachable by name (reference attention pairs them by name)
    blocks = [n for n, _ in reference.named_modules() if n.endswith("transformer_blocks.0")]
    assert len(blocks) == 16 and "down_blocks.0.attentions.0.transformer_blocks.0" in blocks


def test_sd15_forward_on_meta(sd15):
    denoiser, _, reference = sd15
    with torch.device("meta"):
        x = torch.empty(1, 4, 16, 64, 48)
        pose = torch.empty(1, 320, 16, 64, 48)
        tokens = torch.empty(1, 1, 768)
        out = denoiser(x, 999, tokens, pose_cond_fea=pose)
        feats = reference(x[:, :, 0], 0, tokens)
    assert out.shape == (1, 4, 16, 64, 48) and out.device.type == "meta"
    assert feats.shape == (1, 320, 64, 48)


def test_odd_sizes_follow_the_skips(models):
    video, unet2d = models
    x = torch.randn(1, 4, 2, 12, 10)  # not multiples of 8: upsampling must match each skip's size
    tokens = torch.randn(1, 1, D)
    with torch.no_grad():
        out = video(x, 3, tokens)
        ref = unet2d(
            rearrange(x, "b c f h w -> (b f) c h w"), 3, encoder_hidden_states=tokens.repeat(2, 1, 1)
        ).sample
    assert torch.equal(out, rearrange(ref, "(b f) c h w -> b c f h w", f=2))


def test_bad_inputs(models, inputs):
    video, _ = models
    sample, timestep, tokens = inputs
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        video(sample[:, :, 0], timestep, tokens)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        video(sample, timestep, tokens[:1])
    with pytest.raises(ValueError, match="timestep"):
        video(sample, torch.tensor([1, 2, 3]), tokens)
    with pytest.raises(ValueError, match="pose_cond_fea"):
        video(sample, timestep, tokens, pose_cond_fea=torch.zeros(B, 4, F, S, S))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ReferenceUNet(TINY.unet)(sample, timestep, tokens)
    with pytest.raises(ValueError, match="SD1.5 family"):
        VideoUNet(dict(TINY.unet, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="without motion modules"):
        VideoUNet(TINY.unet).load_motion_modules({})


class CountingProcessor(AttnProcessor2_0):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return super().__call__(attn, hidden_states, *args, **kwargs)


def test_attention_processors_by_module_name(models, inputs):
    video, _ = models
    awake = VideoUNet(TINY.unet, MOTION_TINY).eval()
    awake.load_state_dict(video.state_dict())
    wake_motion_modules(awake)
    before = awake.attn_processors
    names = list(before)
    assert len(names) == 2 * 10 + 2 * 13  # TINY: 10 transformer blocks (attn1, attn2), 13 motion modules x 2
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.processor" in names
    assert (
        "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor"
        in (names)
    )
    with torch.no_grad():
        plain = awake(*inputs)
        # one processor by name: only that attention calls it
        counter = CountingProcessor()
        awake.set_attn_processor({"up_blocks.1.attentions.0.transformer_blocks.0.attn1": counter})
        assert torch.equal(awake(*inputs), plain) and counter.calls == 1
        # one processor for all: every spatial attention, never the temporal ones
        counter = CountingProcessor()
        awake.set_attn_processor(counter)
        assert torch.equal(awake(*inputs), plain) and counter.calls == 20
        assert sum(isinstance(p, TemporalAttnProcessor) for p in awake.attn_processors.values()) == 26
        awake.set_attn_processor(before)  # diffusers' dict with ".processor" keys restores everything
    assert awake.attn_processors == before
    with pytest.raises(ValueError, match=r"no attention named \['down_blocks.0.attn1'\]"):
        awake.set_attn_processor({"down_blocks.0.attn1": AttnProcessor2_0()})


def test_no_warnings_from_the_attentions(models, inputs, caplog):
    video, _ = models
    with torch.no_grad(), caplog.at_level("WARNING"):
        video(*inputs)
    assert caplog.records == []


@pytest.mark.gpu
def test_cuda_matches_cpu(models, inputs):
    video, _ = models
    awake = VideoUNet(TINY.unet, MOTION_TINY).eval()
    awake.load_state_dict(video.state_dict())
    wake_motion_modules(awake)
    with torch.no_grad():
        cpu = awake(*inputs)
        gpu = awake.cuda()(*(t.cuda() for t in inputs))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = awake(*(t.cuda() for t in inputs))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)
    assert half.isfinite().all() and (half.float().cpu() - cpu).abs().mean() < 0.1 * cpu.abs().mean()
