"""Pose features entering the denoising UNet: one tensor after conv_in (AnimateAnyone) or a list, [0] after
conv_in and [k] after down block k on the main path only (AniPortrait's unet_3d). Checked against a walk
written here from diffusers' own block forwards, the loop of AniPortrait's UNet."""

import pytest
import torch
from einops import rearrange, repeat

from anim_lab.configs import TINY
from anim_lab.motion import MOTION_TINY
from anim_lab.plain import randomize
from anim_lab.unet import VideoUNet, build_unet2d

B, F, S = 2, 2, 16
D = TINY.unet["cross_attention_dim"]


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(B, 4, F, S, S, generator=g)
    tokens = torch.randn(B, 1, D, generator=g)
    return sample, torch.tensor([10, 700]), tokens


def multi_scale_features(model: VideoUNet, batch: int, num_frames: int, h: int, w: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in model.pose_feature_shapes(batch, num_frames, h, w)]


def aniportrait_walk(unet2d, sample, timestep, tokens, features):
    """AniPortrait's UNet forward on frames, with diffusers' block forwards: sample = conv_in(x) + fea[0];
    after each down block sample += fea[k] (the res_samples it returned are kept as they are)."""
    num_frames = sample.shape[2]
    x = rearrange(sample, "b c f h w -> (b f) c h w")
    fea = [rearrange(f, "b c f h w -> (b f) c h w") for f in features]
    t = repeat(timestep, "b -> (b f)", f=num_frames)
    ehs = repeat(tokens, "b n d -> (b f) n d", f=num_frames)
    temb = unet2d.time_embedding(unet2d.time_proj(t))
    h = unet2d.conv_in(x) + fea[0]
    res = (h,)
    for k, block in enumerate(unet2d.down_blocks):
        if getattr(block, "has_cross_attention", False):
            h, block_res = block(h, temb, encoder_hidden_states=ehs)
        else:
            h, block_res = block(h, temb)
        h = h + fea[k + 1]  # main path only
        res += block_res
    h = unet2d.mid_block(h, temb, encoder_hidden_states=ehs)
    for block in unet2d.up_blocks:
        block_res, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
        size = res[-1].shape[-2:] if res else None
        if getattr(block, "has_cross_attention", False):
            h = block(h, block_res, temb, encoder_hidden_states=ehs, upsample_size=size)
        else:
            h = block(h, block_res, temb, upsample_size=size)
    h = unet2d.conv_out(unet2d.conv_act(unet2d.conv_norm_out(h)))
    return rearrange(h, "(b f) c h w -> b c f h w", f=num_frames)


def test_feature_shapes_follow_the_down_blocks():
    with torch.device("meta"):
        model = VideoUNet(TINY.unet)
    widths = TINY.unet["block_out_channels"]
    assert model.pose_feature_shapes(1, 3, 16, 12) == [
        (1, widths[0], 3, 16, 12),
        (1, widths[0], 3, 8, 6),
        (1, widths[1], 3, 4, 3),
        (1, widths[2], 3, 2, 2),  # odd sizes round up, as the stride-2 convs do
        (1, widths[3], 3, 2, 2),  # the last down block has no downsampler
    ]


@pytest.mark.parametrize("size", [(16, 16), (12, 10)])
def test_multi_scale_injection_equals_aniportraits_walk(inputs, size):
    torch.manual_seed(0)
    model = VideoUNet(TINY.unet).eval()
    unet2d = build_unet2d(TINY.unet).eval()
    unet2d.load_state_dict(model.state_dict())
    sample, timestep, tokens = inputs
    sample = sample[..., : size[0], : size[1]]
    features = multi_scale_features(model, B, F, *size)
    with torch.no_grad():
        ours = model(sample, timestep, tokens, pose_cond_fea=features)
        ref = aniportrait_walk(unet2d, sample, timestep, tokens, features)
        plain = model(sample, timestep, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the features do something


def test_each_level_enters_the_main_path_not_the_skips(inputs):
    """Adding fea[k] after down block k equals adding it by hand to the input of the next stage."""
    model = randomize(VideoUNet(TINY.unet, MOTION_TINY).eval())
    sample, timestep, tokens = inputs
    features = multi_scale_features(model, B, F, S, S)
    per_frame = [rearrange(f, "b c f h w -> (b f) c h w") for f in features]
    with torch.no_grad():
        ours = model(sample, timestep, tokens, pose_cond_fea=features)
        # the same additions placed by hand: the first one on conv_in's output (the first skip includes it),
        # the others on the input of the next stage (mid block or next down block), so skips are untouched
        hooks = [model.conv_in.register_forward_hook(lambda m, i, o: o + per_frame[0])]
        nexts = [*(b.resnets[0] for b in model.down_blocks[1:]), model.mid_block.resnets[0]]
        for k, module in enumerate(nexts):
            hooks.append(
                module.register_forward_pre_hook(lambda m, a, k=k: (a[0] + per_frame[k + 1], *a[1:]))
            )
        try:
            by_hand = model(sample, timestep, tokens)
        finally:
            for hook in hooks:
                hook.remove()
    assert torch.equal(ours, by_hand)


def test_zero_features_are_bit_identical_to_none(inputs):
    model = randomize(VideoUNet(TINY.unet, MOTION_TINY).eval(), seed=4)
    sample, timestep, tokens = inputs
    zeros = [torch.zeros(s) for s in model.pose_feature_shapes(B, F, S, S)]
    with torch.no_grad():
        plain = model(sample, timestep, tokens)
        assert torch.equal(model(sample, timestep, tokens, pose_cond_fea=zeros), plain)
        assert torch.equal(model(sample, timestep, tokens, pose_cond_fea=zeros[0]), plain)


def test_one_tensor_equals_a_list_with_zero_deeper_levels(inputs):
    model = randomize(VideoUNet(TINY.unet, MOTION_TINY).eval(), seed=5)
    sample, timestep, tokens = inputs
    features = multi_scale_features(model, B, F, S, S)
    zeros = [torch.zeros_like(f) for f in features[1:]]
    with torch.no_grad():
        single = model(sample, timestep, tokens, pose_cond_fea=features[0])
        listed = model(sample, timestep, tokens, pose_cond_fea=[features[0], *zeros])
    assert torch.equal(single, listed)


def test_wrong_count_or_shapes_name_the_expected_shapes(inputs):
    with torch.device("meta"):
        model = VideoUNet(TINY.unet)
    sample, timestep, tokens = (t.to("meta") for t in inputs)
    features = [torch.empty(s, device="meta") for s in model.pose_feature_shapes(B, F, S, S)]
    expected = str(model.pose_feature_shapes(B, F, S, S)).replace("(", r"\(").replace(")", r"\)")
    expected = expected.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=r"needs 5 tensors .* with shapes " + expected + "; got 4"):
        model(sample, timestep, tokens, pose_cond_fea=features[:4])
    swapped = [features[0], features[2], features[1], *features[3:]]
    with pytest.raises(ValueError, match=r"pose_cond_fea \(multi-scale\) must have shapes " + expected):
        model(sample, timestep, tokens, pose_cond_fea=swapped)
    with pytest.raises(ValueError, match=r"must have shapes \(2, 32, 2, 16, 16\).*got \(2, 32, 2, 8, 8\)"):
        model(sample, timestep, tokens, pose_cond_fea=torch.empty(B, 32, F, 8, 8, device="meta"))
