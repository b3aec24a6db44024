"""Pose2VideoPipeline: the same computation as the reference loop (a plain implementation in
anim_lab/plain/pose2video.py), windows, outputs, callbacks, determinism, errors, save/load round trip."""

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch
from einops import rearrange

from anim_lab.clip import build_image_encoder
from anim_lab.configs import POSE_GUIDER_MULTISCALE_TINY, TINY
from anim_lab.errors import InputError
from anim_lab.files import OutputError
from anim_lab.guidance import build_scheduler
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import Pose2VideoPipeline, Pose2VideoPipelineOutput
from anim_lab.plain import randomize
from anim_lab.plain.pose2video import CLIPImageProcessorPil, plain_pose2video
from anim_lab.pose_guider import PoseGuider, PoseGuiderMultiScale
from anim_lab.unet import ReferenceUNet, VideoUNet
from anim_lab.vae import build_vae
from anim_lab.video import read_video, save_video

SIZE = 64


def tiny_pipeline(seed: int = 0, multi_scale: bool = False) -> Pose2VideoPipeline:
    torch.manual_seed(seed)
    guider = (
        PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_TINY) if multi_scale else PoseGuider(**TINY.pose_guider)
    )
    pipe = Pose2VideoPipeline(
        vae=build_vae(TINY.vae),
        image_encoder=build_image_encoder(TINY.image_encoder),
        reference_unet=ReferenceUNet(TINY.unet),
        denoising_unet=VideoUNet(TINY.unet, MOTION_TINY),
        pose_guider=guider,
        scheduler=build_scheduler(),
    )
    for i, name in enumerate(("vae", "image_encoder", "reference_unet", "denoising_unet", "pose_guider")):
        randomize(getattr(pipe, name), seed=10 * seed + i).eval()  # BatchNorm statistics too
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(num_frames: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ref = PIL.Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8))  # not 64x64: gets resized
    poses = [
        PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(num_frames)
    ]
    return ref, poses


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def pipe_multi_scale():
    """AniPortrait's variant: the multi-scale guider (BatchNorm statistics random too, not 0/1)."""
    return tiny_pipeline(multi_scale=True)


def test_all_weights_nonzero(pipe):
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for key, p in module.named_parameters():
                assert p.count_nonzero() > 0, f"{name}.{key} is all zeros"


# --- the same computation as the reference ------------------------------------------------------------------
CASES = {
    # name: (frames, guidance, context_frames, overlap, context_batch_size, faithful)
    "one window, cfg": (4, 3.5, 24, 4, 1, False),
    "one window, no cfg": (4, 1.0, 24, 4, 1, False),
    "three windows, cfg": (9, 3.5, 4, 1, 1, False),
    "three windows, no cfg (averaged)": (9, 1.0, 4, 1, 1, False),
    "three windows, no cfg, faithful (summed, fp16 bank)": (9, 1.0, 4, 1, 1, True),
    "three windows, cfg, faithful": (9, 3.5, 4, 1, 1, True),
    "three windows, cfg, two windows per call": (9, 3.5, 4, 1, 2, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_the_plain_reference_loop(pipe, case):
    _compare_with_plain(pipe, case)


@pytest.mark.parametrize(
    "case",
    [
        "one window, cfg",
        "three windows, cfg",
        "three windows, no cfg (averaged)",
        "three windows, cfg, faithful",
    ],
)
def test_aniportrait_variant_equals_the_plain_loop_with_the_guider_per_window(pipe_multi_scale, case):
    # the plain loop runs AniPortrait's guider per window at every step; the pipeline once per sequence
    _compare_with_plain(pipe_multi_scale, case, ref_pose=True)


def _compare_with_plain(pipe, case, ref_pose=False):
    frames, cfg, context_frames, overlap, batch, faithful = CASES[case]
    ref, poses = inputs(frames)
    kwargs = dict(height=SIZE, width=SIZE, video_length=frames, num_inference_steps=2, guidance_scale=cfg)
    if ref_pose:
        kwargs["ref_pose_image"] = poses[-1]
    ours = pipe(
        ref,
        poses,
        **kwargs,
        generator=torch.Generator().manual_seed(7),
        context_frames=context_frames,
        context_overlap=overlap,
        context_batch_size=batch,
        output_type="pt",
        faithful=faithful,
    ).frames  # (1, F, 3, H, W) in [0, 1]
    plain = plain_pose2video(
        pipe,
        ref,
        poses,
        **kwargs,
        generator=torch.Generator().manual_seed(7),
        context_frames=context_frames,
        context_overlap=overlap,
        faithful=faithful,
    )  # (1, 3, F, H, W)
    plain = rearrange(plain, "b c f h w -> b f c h w")
    assert ours.shape == (1, frames, 3, SIZE, SIZE)
    assert plain.std() > 0.05  # a real video, not a constant
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)


def test_float64_pipeline_equals_the_plain_loop_to_float64_rounding():
    """In float64 the only difference left is the order of float64 operations: the CLIP pixel values are the
    processor's own, bit for bit (u / 255, not a trip through [-1, 1])."""
    pipe64 = tiny_pipeline(seed=3).to(torch.float64)
    frames = 9
    ref, poses = inputs(frames, seed=2)
    kwargs = dict(height=SIZE, width=SIZE, video_length=frames, num_inference_steps=2, guidance_scale=3.5)
    run = dict(generator=torch.Generator().manual_seed(7), context_frames=4, context_overlap=1)
    ours = pipe64(ref, poses, **kwargs, **run, output_type="latent").frames  # (1, 4, F, h, w)
    run["generator"] = torch.Generator().manual_seed(7)
    plain = plain_pose2video(pipe64, ref, poses, **kwargs, **run, return_latents=True)
    assert ours.dtype == plain.dtype == torch.float64 and plain.std() > 0.5
    # before the fix (CLIP pixels through [-1, 1] in float32) the latents differed by 2e-8 here
    torch.testing.assert_close(ours, plain, atol=1e-12, rtol=0)


def test_encode_reference_feeds_the_processors_pixel_values(pipe):
    """The CLIP token is the encoder's output on CLIPImageProcessor's pixel values of the squashed image,
    exactly."""
    ref, _ = inputs(1)
    size = pipe.image_encoder.config.image_size
    tokens, _ = pipe.encode_reference(ref, SIZE, SIZE, torch.float32, "cpu")
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = proc(ref.resize((size, size)), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = pipe.image_encoder(pixel_values=pixels).image_embeds[:, None]  # (1, 1, D)
    assert torch.equal(tokens, expected)


def test_precomputed_conditions_give_the_same_video_and_the_latents_come_back(pipe):
    """image_embeds / ref_latents from encode_reference reproduce the call that encodes the reference, bit for
    bit, without the reference image; other conditions change it; the output's latents are the ones the
    frames were decoded from."""
    ref, poses = inputs(4)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    full = pipe(ref, poses, generator=seed(), **kw)
    tokens, ref_latents = pipe.encode_reference(ref, SIZE, SIZE, torch.float32, "cpu")
    given = pipe(None, poses, image_embeds=tokens, ref_latents=ref_latents, generator=seed(), **kw)
    assert torch.equal(given.frames, full.frames)
    other = pipe(ref, poses, image_embeds=tokens.flip(-1), generator=seed(), **kw)  # the token only
    assert (other.frames - full.frames).abs().max() > 1e-3
    latent = pipe(ref, poses, generator=seed(), **{**kw, "output_type": "latent"})
    assert torch.equal(full.latents, latent.frames) and torch.equal(latent.latents, latent.frames)
    decoded = pipe.video_processor.postprocess_video(pipe.decode_latents(full.latents, 8), output_type="pt")
    assert torch.equal(decoded, full.frames)
    for name, value, message in [
        ("image_embeds", tokens[0], r"image_embeds must be a float tensor of shape \(1, 1, \d+\)"),
        ("ref_latents", ref_latents[..., :4], r"ref_latents must be a float tensor of shape \(1, 4, 8, 8\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe(ref, poses, **{name: value}, **kw)
    with pytest.raises(ValueError, match="ref_image must be a PIL image"):
        pipe(None, poses, image_embeds=tokens, **kw)  # the latents still need the image


def test_the_faithful_switch_changes_the_output_without_cfg(pipe):
    # summing overlapping windows is not averaging them: the two modes must differ (else the test above is
    # not testing the switch)
    ref, poses = inputs(9)
    kwargs = dict(
        num_inference_steps=2, guidance_scale=1.0, context_frames=4, context_overlap=1, output_type="pt"
    )
    a = pipe(ref, poses, generator=torch.Generator().manual_seed(7), **kwargs).frames
    b = pipe(ref, poses, generator=torch.Generator().manual_seed(7), faithful=True, **kwargs).frames
    assert (a - b).abs().max() > 1e-3


def test_faithful_aniportrait_poses_are_the_minus_1_to_509_tensor(pipe_multi_scale):
    # faithful=True feeds AniPortrait's guider what its inference fed it: uint8 values through 2x - 1
    _, poses = inputs(3)
    frames = np.stack([np.asarray(p) for p in poses])  # (F, H, W, 3) uint8
    tensor = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] * 2 - 1  # (1, 3, F, H, W)
    assert tensor.min() == -1 and tensor.max() > 400
    guider = pipe_multi_scale.pose_guider
    expected = guider(tensor, None, faithful=True)
    ours = pipe_multi_scale.encode_poses(poses, SIZE, SIZE, torch.float32, "cpu", faithful=True)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    usual = pipe_multi_scale.encode_poses(poses, SIZE, SIZE, torch.float32, "cpu")
    assert (usual[0] - ours[0]).abs().max() > 1e-2  # the range slip changes the features


def test_reference_attention_changes_cond_rows_only(pipe):
    """With the bank, cond rows see the reference; uncond rows are plain self-attention (as if no bank)."""
    ref, poses = inputs(4)
    kw = dict(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(3))
    with_ref = pipe(ref, poses, guidance_scale=3.5, **kw).frames
    other_ref = pipe(PIL.Image.new("RGB", (64, 64), (200, 30, 30)), poses, guidance_scale=3.5, **kw).frames
    assert (with_ref - other_ref).abs().max() > 1e-3  # the reference image matters
    # processors are restored after a call: the UNets are plain again
    for name, module in pipe.denoising_unet.named_modules():
        if name.endswith("attn1") and "motion" not in name:
            assert type(module.processor).__name__.startswith("AttnProcessor"), name


# --- the ablation switches: each component off for one call ------------------------------------------------
ABLATE = dict(
    num_inference_steps=2, guidance_scale=2.0, context_frames=4, context_overlap=1, output_type="pt"
)


def _run(pipe, ref, poses, **kwargs):
    return pipe(ref, poses, generator=torch.Generator().manual_seed(5), **ABLATE, **kwargs).frames


@contextlib.contextmanager
def _changed(module: torch.nn.Module, change):
    """Apply ``change`` to ``module``'s parameters in place for the block, then restore them exactly."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        change(module)
    try:
        yield
    finally:
        module.load_state_dict(saved)


def test_no_pose_guider_equals_a_guider_whose_output_is_zero(pipe):
    ref, poses = inputs(6)
    ablated = _run(pipe, ref, poses, use_pose_guider=False)

    def zero_output(guider):
        guider.conv_out.weight.zero_(), guider.conv_out.bias.zero_()

    with _changed(pipe.pose_guider, zero_output):
        zeroed = _run(pipe, ref, poses)
    torch.testing.assert_close(ablated, zeroed, rtol=0, atol=0)
    assert (ablated - _run(pipe, ref, poses)).abs().max() > 1e-3  # the guider matters otherwise


def test_no_pose_guider_works_for_the_multi_scale_guider(pipe_multi_scale):
    ref, poses = inputs(6)
    _, other_poses = inputs(6, seed=9)
    ablated = _run(pipe_multi_scale, ref, poses, use_pose_guider=False)
    # no pose reaches the denoiser: other poses give the same video, while with the guider they do not
    torch.testing.assert_close(ablated, _run(pipe_multi_scale, ref, other_poses, use_pose_guider=False))
    with_guider = _run(pipe_multi_scale, ref, poses)
    assert (with_guider - _run(pipe_multi_scale, ref, other_poses)).abs().max() > 1e-3
    assert (with_guider - ablated).abs().max() > 1e-3


def test_no_motion_modules_equals_motion_modules_that_add_nothing(pipe):
    ref, poses = inputs(6)
    ablated = _run(pipe, ref, poses, use_motion_modules=False)

    def identity(unet):  # AnimateDiff's zero proj_out: every motion module returns its input
        for _, module in unet.motion_modules():
            module.temporal_transformer.proj_out.weight.zero_()
            module.temporal_transformer.proj_out.bias.zero_()

    with _changed(pipe.denoising_unet, identity):
        at_identity = _run(pipe, ref, poses)
    torch.testing.assert_close(ablated, at_identity, rtol=0, atol=1e-6)
    assert (ablated - _run(pipe, ref, poses)).abs().max() > 1e-3


def test_no_reference_attention_never_reads_the_referencenet(pipe):
    ref, poses = inputs(6)
    ablated = _run(pipe, ref, poses, use_reference_attention=False)

    def other(unet):
        for p in unet.parameters():
            p.mul_(-1.5)

    with _changed(pipe.reference_unet, other):
        ablated_other = _run(pipe, ref, poses, use_reference_attention=False)
        with_other = _run(pipe, ref, poses)
    torch.testing.assert_close(ablated, ablated_other, rtol=0, atol=0)  # another ReferenceNet: ignored
    assert (with_other - _run(pipe, ref, poses)).abs().max() > 1e-3  # read when the switch is on
    assert (ablated - _run(pipe, ref, poses)).abs().max() > 1e-3


def test_fusion_blocks_as_names_select_the_readers(pipe):
    from anim_lab.reference import self_attention_names

    ref, poses = inputs(5)
    every = list(self_attention_names(pipe.denoising_unet))
    midup = list(self_attention_names(pipe.denoising_unet, "midup"))
    assert 0 < len(midup) < len(every)
    torch.testing.assert_close(
        _run(pipe, ref, poses, fusion_blocks=every), _run(pipe, ref, poses), rtol=0, atol=0
    )
    by_name = _run(pipe, ref, poses, fusion_blocks=midup)
    torch.testing.assert_close(by_name, _run(pipe, ref, poses, fusion_blocks="midup"), rtol=0, atol=0)
    none = _run(pipe, ref, poses, use_reference_attention=False)
    assert (by_name - none).abs().max() > 1e-3 and (by_name - _run(pipe, ref, poses)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="names no block"):
        _run(pipe, ref, poses, fusion_blocks=[])
    with pytest.raises(ValueError, match="not spatial attn1"):
        _run(pipe, ref, poses, fusion_blocks=["down_blocks.9.attn1"])


def test_reference_timestep_writes_the_bank_from_the_noised_latent(pipe):
    """reference_timestep=t: the ReferenceNet gets add_noise(ref_latents, noise, t) and the timestep t; the
    noise is the generator's next draw after the starting latents. Checked with a ReferenceNet spy."""
    ref, poses = inputs(3)
    seen = []
    hook = pipe.reference_unet.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].clone(), args[1])), with_kwargs=False
    )
    try:
        kw = dict(num_inference_steps=1, guidance_scale=1.0, output_type="latent")
        pipe(ref, poses, generator=torch.Generator().manual_seed(4), **kw)
        pipe(ref, poses, generator=torch.Generator().manual_seed(4), reference_timestep=500, **kw)
    finally:
        hook.remove()
    (clean, t0), (noisy, t500) = seen
    assert int(torch.as_tensor(t0)) == 0 and int(torch.as_tensor(t500)) == 500
    g = torch.Generator().manual_seed(4)
    torch.randn((1, 4, 3, 8, 8), generator=g)  # the starting latents are drawn first
    noise = torch.randn(clean.shape, generator=g)
    expected = pipe.scheduler.add_noise(clean, noise, torch.tensor([500]))
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reference_timestep"):
        pipe(ref, poses, reference_timestep=1000, **kw)


def test_latents_are_the_starting_noise(pipe):
    """latents=: the same noise the generator would draw gives the same video; another noise another one; a
    wrong shape is refused before any work."""
    ref, poses = inputs(4)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, context_frames=4, context_overlap=1)
    kw["output_type"] = "pt"
    drawn = pipe(ref, poses, generator=torch.Generator().manual_seed(9), **kw).frames
    noise = torch.randn((1, 4, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(pipe(ref, poses, latents=noise, **kw).frames, drawn, rtol=0, atol=0)
    assert (pipe(ref, poses, latents=-noise, **kw).frames - drawn).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"latents must be a float tensor of shape \(1, 4, 4, 8, 8\)"):
        pipe(ref, poses, latents=noise[:, :, :3], **kw)


# --- determinism, outputs, callbacks ------------------------------------------------------------------------
def test_cpu_fp32_is_bit_identical_for_the_same_generator(pipe):
    ref, poses = inputs(5)
    kw = dict(num_inference_steps=2, context_frames=4, context_overlap=2, output_type="np")
    a = pipe(ref, poses, generator=torch.Generator().manual_seed(11), **kw).frames
    b = pipe(ref, poses, generator=torch.Generator().manual_seed(11), **kw).frames
    c = pipe(ref, poses, generator=torch.Generator().manual_seed(12), **kw).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_output_types_agree(pipe, tmp_path):
    ref, poses = inputs(3)
    run = {
        t: pipe(
            ref, poses, num_inference_steps=1, generator=torch.Generator().manual_seed(5), output_type=t
        ).frames
        for t in ("pt", "np", "pil", "latent")
    }
    assert run["pt"].shape == (1, 3, 3, SIZE, SIZE) and run["np"].shape == (1, 3, SIZE, SIZE, 3)
    np.testing.assert_allclose(rearrange(run["pt"], "b f c h w -> b f h w c").numpy(), run["np"], atol=1e-6)
    assert len(run["pil"]) == 1 and len(run["pil"][0]) == 3 and run["pil"][0][0].size == (SIZE, SIZE)
    np.testing.assert_array_equal(
        np.asarray(run["pil"][0][1]), (run["np"][0, 1] * 255).round().astype(np.uint8)
    )
    assert run["latent"].shape == (1, 4, 3, SIZE // 8, SIZE // 8)
    # save_video takes any of them; mp4 and gif
    for kind, suffix in (("pil", ".gif"), ("np", ".mp4"), ("pt", ".gif")):
        path = save_video(run[kind], tmp_path / f"v_{kind}{suffix}", fps=10)
        frames, _ = read_video(path)
        assert frames.shape == (3, SIZE, SIZE, 3)
    tup = pipe(ref, poses, num_inference_steps=1, output_type="np", return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (1, 3, SIZE, SIZE, 3)
    assert isinstance(pipe(ref, poses, num_inference_steps=1, output_type="np"), Pose2VideoPipelineOutput)


def test_save_video_errors_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="must end in .mp4 or .gif"):
        save_video(np.zeros((2, 8, 8, 3)), tmp_path / "v.avi")
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        save_video(np.zeros((8, 8, 3)), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    ref, poses = inputs(3)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}

    out = pipe(ref, poses, num_inference_steps=2, callback_on_step_end=callback, output_type="latent").frames
    timesteps = build_scheduler()
    timesteps.set_timesteps(2)
    assert [s[:2] for s in seen] == [(0, int(timesteps.timesteps[0])), (1, int(timesteps.timesteps[1]))]
    assert torch.equal(out, torch.zeros_like(out))  # the last step's replacement is what comes out


def test_progress_bar_counts_steps(pipe, capsys):
    ref, poses = inputs(2)
    pipe.set_progress_bar_config(disable=False, desc="denoise")
    try:
        pipe(ref, poses, num_inference_steps=3, output_type="latent")
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pose_images=[]), "pose_images is empty"),
        (dict(video_length=9), "video_length must be between 1 and the number of pose images"),
        (dict(height=60), "multiples of 8"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
        (dict(output_type="gif"), "output_type must be"),
        (dict(context_overlap=24), r"context_overlap must be in \[0, context_frames\)"),
        (dict(pose_images=[np.zeros((64, 64), np.float32)] * 2), "pose image 0 must be a PIL image"),
    ],
)
def test_bad_requests(pipe, kwargs, match):
    ref, poses = inputs(2)
    call = dict(ref_image=ref, pose_images=poses, num_inference_steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        pipe(**call)


# --- anim_lab's own layout ----------------------------------------------------------------------------------
def test_save_pretrained_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(
        [
            "model_index.json",
            "vae",
            "image_encoder",
            "scheduler",
            "reference_unet",
            "denoising_unet",
            "pose_guider",
        ]
    )
    loaded = Pose2VideoPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    for name in ("vae", "image_encoder", "reference_unet", "denoising_unet", "pose_guider"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    ref, poses = inputs(3)
    kw = dict(num_inference_steps=2, output_type="np")
    a = pipe(ref, poses, generator=torch.Generator().manual_seed(1), **kw).frames
    b = loaded(ref, poses, generator=torch.Generator().manual_seed(1), **kw).frames
    # bit for bit: from_pretrained realigns the tensors read at the files' byte offsets (weights.realign)
    np.testing.assert_array_equal(a, b)
    # saving again over a saved pipeline replaces it; a folder that is not one is refused
    loaded.save_pretrained(tmp_path / "p")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files this program did not write: notes.txt"):
        pipe.save_pretrained(tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("kwargs", [{"variant": "fp16"}, {"max_shard_size": "1MB"}, {"push_to_hub": True}])
def test_save_pretrained_refuses_diffusers_keywords_by_name(pipe, tmp_path, kwargs):
    with pytest.raises(ValueError, match=f"does not take {next(iter(kwargs))}"):
        pipe.save_pretrained(tmp_path / "saved", **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_official_pipeline"):
        Pose2VideoPipeline.from_pretrained(tmp_path)


def test_pipeline_moves_with_to(pipe):
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    pipe.to(torch.float64)
    try:
        assert pipe.dtype == torch.float64 and pipe.vae.dtype == torch.float64
        ref, poses = inputs(2)
        out = pipe(ref, poses, num_inference_steps=1, output_type="latent").frames
        assert out.dtype == torch.float64
    finally:
        pipe.to(torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_runs_close_to_fp32(dtype):
    pipe = tiny_pipeline().to("cuda")
    ref, poses = inputs(6)
    kw = dict(num_inference_steps=2, context_frames=4, context_overlap=1, output_type="pt")
    full = pipe(ref, poses, generator=torch.Generator().manual_seed(2), **kw).frames
    half = pipe.to(dtype=dtype)(ref, poses, generator=torch.Generator().manual_seed(2), **kw).frames
    assert half.shape == full.shape and torch.isfinite(half).all()
    assert (half.float() - full).abs().mean() < 0.05


def test_enable_compile_compiles_the_named_networks_and_keeps_the_output():
    """The switch's plumbing, with a backend that records each graph dynamo hands it and runs it as traced
    (inductor's own speed and differences are the benchmark's: ``bench_pose2video.py --means``). The run
    compiles the VAE decoder only: tracing the UNet takes a minute on this CPU."""
    pipe, ref, poses = tiny_pipeline(), *inputs(3)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    eager = pipe(ref, poses, generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.enable_compile()  # the default: the denoising UNet and the VAE decoder
    assert (
        pipe.denoising_unet._compiled_call_impl is not None
        and pipe.vae.decoder._compiled_call_impl is not None
    )
    assert pipe.reference_unet._compiled_call_impl is None and pipe.vae.encoder._compiled_call_impl is None
    pipe.disable_compile()
    assert all(pipe._module_at(n)._compiled_call_impl is None for n in pipe.COMPILABLE)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pipe.enable_compile("vae.decoder", backend=recording_backend)
    compiled = pipe(ref, poses, generator=torch.Generator().manual_seed(0), **kw).frames
    assert graphs  # the decoder really went through torch.compile
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="cannot compile \\['unet'\\]"):
        pipe.enable_compile("unet")
