"""Reference attention against the plain implementation of the reference code (anim_lab/plain/reference.py:
Moore-AnimateAnyone's ReferenceAttentionControl, implementations.md §1.2): lists filled during the
ReferenceNet forward, writers and readers paired by a stable sort on width, the bank repeated over frames and
concatenated to the tokens, the uncond rows computed with the reference and then recomputed without it."""

from collections import Counter

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from anim_lab.configs import SD15, TINY
from anim_lab.motion import MOTION_SD15, MOTION_TINY
from anim_lab.plain import randomize
from anim_lab.plain.reference import PlainReferenceControl, torch_dfs
from anim_lab.reference import (
    ReferenceReaderProcessor,
    ReferenceWriterProcessor,
    pair_blocks,
    reference_attention,
)
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d

B, F, S = 2, 3, 8  # 2 videos of 3 frames (not 16: the frame count must come from the rows), 8x8 latents
D = TINY.unet["cross_attention_dim"]


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    reference = randomize(ReferenceUNet(TINY.unet).eval(), seed=3)
    denoiser = randomize(VideoUNet(TINY.unet, MOTION_TINY).eval(), seed=1)
    return reference, denoiser


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(B, 4, F, S, S, generator=g)
    ref_latents = torch.randn(B, 4, S, S, generator=g)
    clip = torch.randn(B, 1, D, generator=g)
    pose = torch.randn(B, TINY.unet["block_out_channels"][0], F, S, S, generator=g)
    return latents, ref_latents, clip, pose


def cfg_inputs(inputs):
    latents, ref_latents, clip, pose = inputs
    tokens = torch.cat([torch.zeros_like(clip), clip])  # [uncond ; cond], the uncond tokens are zeros
    return torch.cat([latents] * 2), tokens, torch.cat([pose] * 2)


def run_plain(reference, denoiser, inputs, cfg: bool, t=500, dtype=None):
    latents, ref_latents, clip, pose = inputs
    control = PlainReferenceControl(reference, denoiser, F, cfg, dtype)
    try:
        if cfg:  # as the pipeline: the ReferenceNet on the CFG-doubled batch, with [zeros ; clip] tokens
            x, tokens, pose_in = cfg_inputs(inputs)
            reference(torch.cat([ref_latents] * 2), 0, tokens)
        else:
            x, tokens, pose_in = latents, clip, pose
            reference(ref_latents, 0, clip)
        control.update()
        return denoiser(x, t, tokens, pose_cond_fea=pose_in)
    finally:
        control.clear()


# --- semantics ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, bank_rows", [(True, B), (True, 2 * B), (False, B)])
def test_equals_the_plain_reference_implementation(unets, inputs, cfg, bank_rows):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    with torch.no_grad():
        expected = run_plain(reference, denoiser, inputs, cfg)
        with reference_attention(reference, denoiser, do_classifier_free_guidance=cfg) as bank:
            if bank_rows == 2 * B:  # the reference's layout: the ReferenceNet on [ref ; ref], [zeros ; clip]
                bank.write(torch.cat([ref_latents] * 2), 0, torch.cat([torch.zeros_like(clip), clip]))
            else:  # one row per conditional video: half the ReferenceNet work
                bank.write(ref_latents, 0, clip)
            x, tokens, pose_in = cfg_inputs(inputs) if cfg else (latents, clip, pose)
            out = denoiser(x, 500, tokens, pose_cond_fea=pose_in)
        plain = denoiser(x, 500, tokens, pose_cond_fea=pose_in)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-2  # the reference changes the output


def test_faithful_rounds_the_bank_to_float16_as_the_reference(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    x, tokens, pose_in = cfg_inputs(inputs)
    with torch.no_grad():
        expected = run_plain(reference, denoiser, inputs, cfg=True, dtype=torch.float16)
        kept = run_plain(reference, denoiser, inputs, cfg=True)
        with reference_attention(
            reference, denoiser, do_classifier_free_guidance=True, faithful=True
        ) as bank:
            bank.write(ref_latents, 0, clip)
            out = denoiser(x, 500, tokens, pose_cond_fea=pose_in)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (expected - kept).abs().max() > 1e-6  # the rounding is visible


def test_disabled_bank_is_bit_identical_to_the_plain_forward(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    with torch.no_grad():
        plain = denoiser(latents, 500, clip, pose_cond_fea=pose)
        with reference_attention(reference, denoiser) as bank:
            bank.enabled = False
            off = denoiser(latents, 500, clip, pose_cond_fea=pose)  # not even written: nothing is read
            bank.enabled = True
            bank.write(ref_latents, 0, clip)
            on = denoiser(latents, 500, clip, pose_cond_fea=pose)
            bank.enabled = False
            off_again = denoiser(latents, 500, clip, pose_cond_fea=pose)
    assert torch.equal(off, plain) and torch.equal(off_again, plain)
    assert not torch.equal(on, plain)


def test_uncond_rows_are_the_plain_forward_with_zero_tokens(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    x, tokens, pose_in = cfg_inputs(inputs)
    with torch.no_grad():
        with reference_attention(reference, denoiser, do_classifier_free_guidance=True) as bank:
            bank.write(ref_latents, 0, clip)
            out = denoiser(x, 500, tokens, pose_cond_fea=pose_in)
        uncond = denoiser(latents, 500, torch.zeros_like(clip), pose_cond_fea=pose)  # no reference at all
        cond_plain = denoiser(latents, 500, clip, pose_cond_fea=pose)
    torch.testing.assert_close(out[:B], uncond, atol=1e-5, rtol=1e-5)
    assert (out[B:] - cond_plain).abs().max() > 1e-2  # the conditional rows do see the reference


def test_batch_of_two_equals_one_by_one(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    x, tokens, pose_in = cfg_inputs(inputs)
    with torch.no_grad(), reference_attention(reference, denoiser, do_classifier_free_guidance=True) as bank:
        bank.write(ref_latents, 0, clip)
        both = denoiser(x, 500, tokens, pose_cond_fea=pose_in)
        singles = []
        for i in range(B):
            bank.write(ref_latents[i : i + 1], 0, clip[i : i + 1])
            one = (latents[i : i + 1], ref_latents[i : i + 1], clip[i : i + 1], pose[i : i + 1])
            xi, ti, pi = cfg_inputs(one)
            singles.append(denoiser(xi, 500, ti, pose_cond_fea=pi))  # (2, 4, F, S, S): [uncond ; cond]
    uncond = torch.cat([s[:1] for s in singles])
    cond = torch.cat([s[1:] for s in singles])
    torch.testing.assert_close(both, torch.cat([uncond, cond]), atol=1e-5, rtol=1e-5)


def test_the_reference_net_runs_once_at_t0_and_the_bank_serves_every_step(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    x, tokens, pose_in = cfg_inputs(inputs)
    seen = []
    hook = reference.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    projections = Counter()
    try:
        with (
            torch.no_grad(),
            reference_attention(reference, denoiser, do_classifier_free_guidance=True) as bank,
        ):
            bank.write(ref_latents, t=0, encoder_hidden_states=clip)  # once per generation
            for t in (900, 500, 100):  # a 3-step denoising loop
                denoiser(x, t, tokens, pose_cond_fea=pose_in)
                projections[t] = bank.projections
    finally:
        hook.remove()
    assert seen == [0] and bank.writes == 1
    n_blocks = len(bank.names)
    assert n_blocks == 10  # TINY: every spatial transformer block ("full")
    assert dict(projections) == {900: n_blocks, 500: n_blocks, 100: n_blocks}  # reference K/V projected once


def test_midup_reads_only_in_the_mid_and_up_blocks(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    with torch.no_grad(), reference_attention(reference, denoiser, fusion_blocks="midup") as bank:
        assert all(n.startswith(("mid_block.", "up_blocks.")) for n in bank.names)
        assert len(bank.names) == 1 + 2 * 3  # TINY: mid + 3 cross-attention up blocks x 2 layers
        readers = {
            n.removesuffix(".processor")
            for n, p in denoiser.attn_processors.items()
            if isinstance(p, ReferenceReaderProcessor)
        }
        assert readers == set(bank.names)
        bank.write(ref_latents, 0, clip)
        assert set(bank.entries) == set(bank.names)


def test_the_context_leaves_no_state_behind(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    before = {n: type(p) for n, p in {**reference.attn_processors, **denoiser.attn_processors}.items()}
    with pytest.raises(RuntimeError, match="boom"), reference_attention(reference, denoiser) as bank:
        bank.write(ref_latents, 0, clip)
        raise RuntimeError("boom")
    after = {n: type(p) for n, p in {**reference.attn_processors, **denoiser.attn_processors}.items()}
    assert after == before and not bank.entries
    assert not denoiser._forward_pre_hooks


def test_no_warnings_under_reference_attention(unets, inputs, caplog):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    with torch.no_grad(), caplog.at_level("WARNING"), reference_attention(reference, denoiser) as bank:
        bank.write(ref_latents, 0, clip)
        denoiser(latents, 500, clip, pose_cond_fea=pose)
    assert caplog.records == []


# --- pairing at SD1.5 size ---------------------------------------------------------------------------------
def test_sd15_pairing_by_name_equals_the_width_sort():
    with torch.device("meta"):
        reference_2d = build_unet2d(SD15.unet)  # the reference's ReferenceNet: diffusers' registration order
        denoiser = VideoUNet(SD15.unet, MOTION_SD15)
        reference = ReferenceUNet(SD15.unet)
    names = {id(m): n for n, m in reference_2d.named_modules()} | {
        id(m): n for n, m in denoiser.named_modules()
    }
    writers = [m for m in torch_dfs(reference_2d) if isinstance(m, BasicTransformerBlock)]
    # the reference's UNet3DConditionModel registers down_blocks, up_blocks, then mid_block
    readers = [
        m
        for part in (denoiser.down_blocks, denoiser.up_blocks, denoiser.mid_block)
        for m in torch_dfs(part)
        if isinstance(m, BasicTransformerBlock)
    ]
    writers.sort(key=lambda m: -m.norm1.normalized_shape[0])
    readers.sort(key=lambda m: -m.norm1.normalized_shape[0])
    pairs = [(names[id(w)], names[id(r)]) for w, r in zip(writers, readers, strict=True)]
    assert len(pairs) == 16
    assert all(w == r for w, r in pairs)  # the width sort pairs every block with its namesake
    by_name = pair_blocks(reference, denoiser)
    assert sorted(by_name) == sorted(f"{w}.attn1" for w, _ in pairs)
    widths = Counter(m.norm1.normalized_shape[0] for m in writers)
    assert widths == {1280: 6, 640: 5, 320: 5}


# --- bad input ---------------------------------------------------------------------------------------------
def test_empty_bank_or_never_written(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    with reference_attention(reference, denoiser) as bank, pytest.raises(RuntimeError, match="bank is empty"):
        denoiser(latents, 500, clip)
    assert not bank.entries


def test_bank_from_a_different_sized_reference_net(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    narrow = dict(TINY.unet, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)
    other_reference, other_denoiser = ReferenceUNet(narrow).eval(), VideoUNet(narrow).eval()
    with torch.no_grad():
        with reference_attention(other_reference, other_denoiser) as other:
            other.write(ref_latents, 0, clip)
            entries = dict(other.entries)
        with reference_attention(reference, denoiser) as bank:
            bank.load(entries)
            with pytest.raises(ValueError, match="width 16 .* works on 32 channels .* another size"):
                denoiser(latents, 500, clip)
    widths = r"widths differ \(reference vs denoising\): \['down_blocks.0"
    with pytest.raises(ValueError, match=widths), reference_attention(other_reference, denoiser):
        pass
    deeper = ReferenceUNet(dict(TINY.unet, layers_per_block=2))
    only = r"only in the ReferenceNet: \['down_blocks.0.attentions.1"
    with pytest.raises(ValueError, match=only), reference_attention(deeper, denoiser):
        pass
    with pytest.raises(ValueError, match="lack the blocks"), reference_attention(reference, denoiser) as bank:
        bank.load({})


def test_reference_batch_matching_neither_b_nor_2b(unets, inputs):
    reference, denoiser = unets
    latents, ref_latents, clip, pose = inputs
    x, tokens, _ = cfg_inputs(inputs)
    three = torch.cat([ref_latents, ref_latents[:1]])
    with torch.no_grad(), reference_attention(reference, denoiser, do_classifier_free_guidance=True) as bank:
        bank.write(three, 0, torch.cat([clip, clip[:1]]))
        with pytest.raises(ValueError, match=r"holds 3 reference rows .* B = 2 rows \(or 2B = 4"):
            denoiser(x, 500, tokens)
        with pytest.raises(ValueError, match="even number"):
            denoiser(x[:3], 500, tokens[:3])
    with torch.no_grad(), reference_attention(reference, denoiser) as bank:
        bank.write(ref_latents, 0, clip)
        with pytest.raises(ValueError, match=r"holds 2 reference rows .* \(no CFG\); .* B = 4 rows$"):
            denoiser(x, 500, tokens)


def test_enabling_twice(unets):
    reference, denoiser = unets
    with reference_attention(reference, denoiser):
        twice = pytest.raises(RuntimeError, match="already enabled on this ReferenceNet")
        with twice, reference_attention(reference, denoiser):
            pass
        assert any(isinstance(p, ReferenceWriterProcessor) for p in reference.attn_processors.values())
    with (
        pytest.raises(ValueError, match="fusion_blocks must be one of"),
        reference_attention(reference, denoiser, fusion_blocks="down"),
    ):
        pass
