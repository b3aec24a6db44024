"""HalloPipeline against a plain loop written here from Hallo's inference (scripts/inference.py +
FaceAnimatePipeline), on tiny random nonzero weights: segments and motion frames, the CFG rows' conditions,
bad inputs refused before work, save/load."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.image_processor import VaeImageProcessor
from helpers import MICRO_W2V
from transformers import Wav2Vec2Config, Wav2Vec2Model

from anim_lab import audio as A
from anim_lab import toy
from anim_lab.clip import build_image_encoder
from anim_lab.configs import TINY
from anim_lab.errors import InputError
from anim_lab.guidance import build_scheduler
from anim_lab.hallo import AudioProjModel, ImageProjModel, face_region_masks
from anim_lab.landmarks import NoFaceError
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import HalloPipeline
from anim_lab.pipelines.hallo import identity_embedding
from anim_lab.plain import randomize
from anim_lab.pose_guider import PoseGuider
from anim_lab.reference import reference_attention
from anim_lab.unet import ReferenceUNet, VideoUNet
from anim_lab.vae import build_vae

torch.set_num_threads(1)
SIZE = 64
AUDIO_DIM = 8  # the audio tokens' width (audio_attention_dim)


def tiny_pipeline(seed: int = 0) -> HalloPipeline:
    torch.manual_seed(seed)
    w2v = Wav2Vec2Config(**MICRO_W2V)
    pipe = HalloPipeline(
        vae=build_vae(TINY.vae),
        image_encoder=build_image_encoder(TINY.image_encoder),
        reference_unet=ReferenceUNet(TINY.unet),
        denoising_unet=VideoUNet(
            TINY.unet, MOTION_TINY, audio_kwargs=dict(audio_attention_dim=AUDIO_DIM, zero_initialize=True)
        ),
        face_locator=PoseGuider(**TINY.pose_guider),
        image_proj=ImageProjModel(
            cross_attention_dim=TINY.unet["cross_attention_dim"],
            clip_embeddings_dim=TINY.image_encoder["projection_dim"],
            clip_extra_context_tokens=2,
        ),
        audio_proj=AudioProjModel(
            seq_len=5,
            blocks=w2v.num_hidden_layers,
            channels=w2v.hidden_size,
            intermediate_dim=16,
            output_dim=AUDIO_DIM,
            context_tokens=3,
        ),
        audio_encoder=Wav2Vec2Model(w2v),
        scheduler=build_scheduler("linear"),
    )
    # every weight random and nonzero, the zero-initialised convs (audio modules, face locator) included
    names = ("vae", "image_encoder", "reference_unet", "denoising_unet", "face_locator", "image_proj")
    for i, name in enumerate((*names, "audio_proj", "audio_encoder")):
        randomize(getattr(pipe, name), seed=10 * seed + i).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def face():
    """A toy portrait (SIZE x SIZE uint8) and its exact landmarks (478, 2)."""
    ident = toy.sample_identity(np.random.default_rng(3))
    image, lmk = toy.render(ident, toy.HeadPose(yaw=8), toy.Expression(mouth_open=0.5), size=SIZE)
    return image, lmk


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(round(seconds * A.SAMPLE_RATE))).astype(np.float32)


def test_all_weights_nonzero(pipe):
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for key, p in module.named_parameters():
                assert p.count_nonzero() > 0, f"{name}.{key} is all zeros"


# --- (a) the pipeline equals a plain loop of Hallo's semantics ----------------------------------------------
@torch.no_grad()
def plain_hallo(pipe, ref_u8, lmk, audio, *, steps, guidance, clip_length, n_motion, motion_scale, seed):
    """Hallo's inference, written out: the audio embedding padded to whole clips, process_audio_emb, the
    audio projection of the whole sequence; image_proj of the identity embedding (uncond: image_proj(0));
    get_mask; clip by clip: [ref, motion frames] through the ReferenceNet with *each video's own* tokens,
    read mode (reference for the cond rows, motion frames for every row), CFG rows [uncond ; cond] with zero
    audio tokens and zero face-locator features for the uncond row, DDIM, decode, the last frames as the next
    clip's motion frames (decoded, clamped, back to [-1, 1])."""
    dtype = next(pipe.denoising_unet.parameters()).dtype
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    feats, length = A.hallo_audio_features(audio, pipe.audio_encoder, A.feature_extractor(), 25, clip_length)
    f_pad = feats.shape[0]
    idx = np.clip(np.arange(f_pad)[:, None] + np.arange(-2, 3)[None], 0, f_pad - 1)  # process_audio_emb
    audio_emb = pipe.audio_proj(feats[torch.from_numpy(idx)][None])  # (1, F_pad, T, D)
    times = f_pad // clip_length

    ref = PIL.Image.fromarray(ref_u8)
    face_emb = identity_embedding(pipe.image_encoder, ref)  # the ArcFace stand-in
    cond_tokens, uncond_tokens = pipe.image_proj(face_emb), pipe.image_proj(torch.zeros_like(face_emb))
    masks = face_region_masks(lmk, SIZE, SIZE, num_levels=4, latent_factor=8)
    mask_levels = {r: [m.to(dtype) for m in getattr(masks, r)] for r in ("full", "face", "lip")}
    box = masks.box.to(dtype)[None, None, None].expand(1, 3, clip_length, -1, -1)  # (1, 3, F, H, W)
    face_fea = pipe.face_locator(box)
    face_fea = torch.cat([torch.zeros_like(face_fea), face_fea])

    ref_px = VaeImageProcessor(vae_scale_factor=8).preprocess(ref, height=SIZE, width=SIZE).to(dtype)

    def encode(px):  # (n, 3, H, W) -> the posterior mean x scaling factor
        return vae.encode(px).latent_dist.mean * sf

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    motion_px = ref_px.repeat(n_motion, 1, 1, 1)  # the first clip: copies of the reference
    out_frames, out_latents = [], []
    with reference_attention(
        pipe.reference_unet, pipe.denoising_unet, do_classifier_free_guidance=True
    ) as bank:
        for k in range(times):
            lat_ref = encode(torch.cat([ref_px, motion_px]))  # (3, 4, h, w): [ref, m1, m2]
            per_video = []
            for toks in (uncond_tokens, cond_tokens):  # each video's images with its own tokens
                bank.write(lat_ref, 0, toks.expand(lat_ref.shape[0], -1, -1))
                per_video.append(dict(bank.entries))
            bank.load({n: torch.stack([e[n][0] for e in per_video]) for n in bank.names})  # the references
            motion = {n: torch.stack([e[n][1:] for e in per_video]) for n in bank.names}  # (2, n, HW, C)
            seg_audio = audio_emb[:, k * clip_length : (k + 1) * clip_length]
            seg_audio = torch.cat([torch.zeros_like(seg_audio), seg_audio])
            context = torch.cat([uncond_tokens, cond_tokens])
            latents = torch.randn((1, 4, clip_length, 8, 8), generator=g, dtype=dtype)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                pred = pipe.denoising_unet(
                    torch.cat([latents] * 2), t, context, pose_cond_fea=face_fea, audio_tokens=seg_audio,
                    audio_masks=mask_levels, motion_scale=motion_scale, motion_frame_features=motion,
                )  # fmt: skip
                uncond, cond = pred.chunk(2)
                latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, eta=0.0).prev_sample
            frames = torch.cat([vae.decode(latents[:, :, i] / sf).sample for i in range(clip_length)])
            frames = frames.clamp(-1, 1)  # (F, 3, H, W): Hallo's (x / 2 + 0.5).clamp(0, 1) * 2 - 1
            motion_px = frames[clip_length - n_motion :]
            out_frames.append(frames)
            out_latents.append(latents)
    video = torch.cat(out_frames)[:length]  # cut to the audio's true length
    return (video / 2 + 0.5).clamp(0, 1), torch.cat(out_latents, dim=2)[:, :, :length]


@pytest.mark.parametrize("dtype", [torch.float64])
def test_pipeline_equals_plain_hallo_loop(face, dtype):
    pipe = tiny_pipeline().to(dtype)
    image, lmk = face
    audio = speech(0.3)  # ceil(0.3 * 25) = 8 frames -> 2 segments of 4 (the second padded to a whole clip)
    kw = dict(steps=2, guidance=3.5, clip_length=5, n_motion=2, motion_scale=(0.7, 1.3, 2.0), seed=5)
    want_frames, want_latents = plain_hallo(pipe, image, lmk, audio, **kw)
    out = pipe(
        image, audio, landmarks=lmk, num_inference_steps=2, guidance_scale=3.5, clip_length=5,
        n_motion_frames=2, motion_scale=(0.7, 1.3, 2.0), generator=torch.Generator().manual_seed(5),
        output_type="pt",
    )  # fmt: skip
    assert out.num_frames == 8 and out.frames.shape == (1, 8, 3, SIZE, SIZE)
    # float64 latents: the same numbers to rounding; the frames come out as float32 (as Pose2Video's)
    torch.testing.assert_close(out.latents, want_latents, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.frames[0].to(dtype), want_frames, atol=1e-6, rtol=0)
    # the second segment really reads the first one's frames: other motion frames change it
    other = pipe(
        image, audio, landmarks=lmk, num_inference_steps=2, guidance_scale=3.5, clip_length=5,
        n_motion_frames=0, motion_scale=(0.7, 1.3, 2.0), generator=torch.Generator().manual_seed(5),
        output_type="latent",
    )  # fmt: skip
    assert (other.latents[:, :, 5:] - out.latents[:, :, 5:]).abs().max() > 1e-3


# --- (b) segments -------------------------------------------------------------------------------------------
def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize(("seconds", "clip_length"), [(0.3, 3), (0.32, 4), (0.1, 16)])
def test_frame_count_is_the_audios_and_segments_cover_it(pipe, face, seconds, clip_length):
    image, lmk = face
    audio = speech(seconds)
    want = A.frame_count(len(audio), 25)
    calls, handle = count_calls(pipe.denoising_unet)
    try:
        out = pipe(
            image, audio, landmarks=lmk, num_inference_steps=1, clip_length=clip_length, output_type="np"
        )
    finally:
        handle.remove()
    assert out.num_frames == want and out.frames.shape == (1, want, SIZE, SIZE, 3)
    assert out.latents.shape == (1, 4, want, 8, 8)
    assert len(calls) == -(-want // clip_length)  # one UNet call per segment and step


# --- (c) the uncond and cond rows get Hallo's conditions ----------------------------------------------------
def test_uncond_rows_get_hallos_uncond_conditions(pipe, face):
    image, lmk = face
    audio = speech(0.3)
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs[k] for k in ("encoder_hidden_states", "pose_cond_fea", "audio_tokens")})
        seen[-1]["motion"] = kwargs["motion_frame_features"]
        seen[-1]["sample"] = args[0]

    handle = pipe.denoising_unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(image, audio, landmarks=lmk, num_inference_steps=1, clip_length=4, output_type="latent")
    finally:
        handle.remove()
    assert len(seen) == 2  # 8 frames: 2 segments x 1 step
    with torch.no_grad():
        emb = identity_embedding(pipe.image_encoder, PIL.Image.fromarray(image))
        tokens, uncond = pipe.image_proj(emb), pipe.image_proj(torch.zeros_like(emb))
        feats, _ = A.hallo_audio_features(audio, pipe.audio_encoder, None, 25, 4)
        audio_tokens = pipe.audio_proj(A.hallo_window(feats)[None])  # (1, 8, T, D)
    for k, call in enumerate(seen):
        ehs, pose, aud = call["encoder_hidden_states"], call["pose_cond_fea"], call["audio_tokens"]
        assert call["sample"].shape[0] == 2 and torch.equal(call["sample"][0], call["sample"][1])
        torch.testing.assert_close(ehs[0], uncond[0])  # identity: the projected zeros, not zero tokens
        torch.testing.assert_close(ehs[1], tokens[0])
        assert ehs[0].count_nonzero() > 0
        assert torch.equal(aud[0], torch.zeros_like(aud[0]))  # audio: zeros after the projection
        torch.testing.assert_close(aud[1], audio_tokens[0, 4 * k : 4 * (k + 1)])
        assert torch.equal(pose[0], torch.zeros_like(pose[0])) and pose[1].abs().max() > 0  # face locator
        # (2 videos, 2 motion frames, HW, C): each video's images encoded with its own tokens (the first
        # attn1 comes before any cross-attention, the later ones differ)
        assert all(value.shape[:2] == (2, 2) for value in call["motion"].values())
        assert any(not torch.allclose(value[0], value[1]) for value in call["motion"].values())


# --- (d) bad inputs are refused before any network runs -----------------------------------------------------
BAD = {
    "steps 0": (dict(num_inference_steps=0), "num_inference_steps"),
    "steps float": (dict(num_inference_steps=1.5), "num_inference_steps"),
    "motion_scale 2": (dict(motion_scale=(1.0, 1.0)), "motion_scale"),
    "motion_scale nan": (dict(motion_scale=(1.0, float("nan"), 1.0)), "motion_scale"),
    "clip_length 0": (dict(clip_length=0), "clip_length"),
    "too many motion frames": (dict(clip_length=2, n_motion_frames=3), "n_motion_frames"),
    "frames past the positions": (dict(clip_length=32), "positions"),
    "height": (dict(height=60), "multiples"),
    "guidance": (dict(guidance_scale=-1.0), "guidance"),
    "fps": (dict(fps=0), "fps"),
    "output_type": (dict(output_type="gif"), "output_type"),
    "landmarks": (dict(landmarks=np.zeros((10, 2))), "landmarks"),
}


@pytest.fixture()
def no_work(pipe):
    """Fails the test if any network of the pipeline runs."""
    handles = []
    for name in ("audio_encoder", "denoising_unet", "reference_unet", "vae", "image_encoder", "face_locator"):

        def stop(module, args, kwargs, name=name):
            raise AssertionError(f"{name} ran before the inputs were checked")

        handles.append(getattr(pipe, name).register_forward_pre_hook(stop, with_kwargs=True))
    yield
    for h in handles:
        h.remove()


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_refused_before_work(pipe, face, no_work, case):
    image, lmk = face
    kwargs, words = BAD[case]
    kwargs = {"landmarks": lmk, **kwargs}
    with pytest.raises(InputError, match=words):
        pipe(image, speech(0.3), **kwargs)


@pytest.mark.parametrize(
    ("audio", "words"),
    [
        (np.zeros(8000, np.float32), "silent"),
        (np.zeros(0, np.float32), "empty"),
        (np.full(8000, np.nan, np.float32), "NaN|finite"),
        (speech(0.01), "short|samples"),
    ],
)
def test_bad_audio_refused_before_work(pipe, face, no_work, audio, words):
    image, lmk = face
    with pytest.raises(InputError, match=words):
        pipe(image, audio, landmarks=lmk)


def test_bad_reference_refused_before_work(pipe, face, no_work):
    _, lmk = face
    with pytest.raises(InputError, match="uint8"):
        pipe(np.zeros((SIZE, SIZE, 3), np.float32), speech(0.3), landmarks=lmk)
    with pytest.raises(FileNotFoundError):
        pipe(face[0], "no/such/speech.wav", landmarks=lmk)


def test_reference_without_a_face_is_named(pipe, no_work):
    blank = np.full((SIZE * 2, SIZE * 2, 3), 128, np.uint8)
    with pytest.raises(NoFaceError, match="reference"):
        pipe(blank, speech(0.3))


def test_components_that_do_not_fit_are_named(face):
    pipe = tiny_pipeline()
    pipe.audio_proj = AudioProjModel(seq_len=5, blocks=3, channels=16, intermediate_dim=4, output_dim=8)
    with pytest.raises(InputError, match="audio encoder"):
        pipe(face[0], speech(0.3), landmarks=face[1])


# --- (e) save / load ----------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_frames(pipe, face, tmp_path):
    image, lmk = face
    kw = dict(landmarks=lmk, num_inference_steps=2, clip_length=4, output_type="pt")
    before = pipe(image, speech(0.3), generator=torch.Generator().manual_seed(1), **kw)
    pipe.save_pretrained(tmp_path / "hallo")
    again = HalloPipeline.from_pretrained(tmp_path / "hallo")
    again.set_progress_bar_config(disable=True)
    after = again(image, speech(0.3), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(before.frames, after.frames) and torch.equal(before.latents, after.latents)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="notes.txt|not"):
        pipe.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# --- faithful and audio files -------------------------------------------------------------------------------
def test_faithful_is_passed_through(pipe, face):
    """faithful=True: the ReferenceNet's tokens tiled over [ref, m1, m2] ([u, c, u, c, u, c]) and the UNet
    told to skip the motion modules of blocks without attention; default: each video's own tokens."""
    image, lmk = face
    seen = {"ref": [], "den": []}
    hooks = [
        pipe.reference_unet.register_forward_pre_hook(
            lambda m, a, k: seen["ref"].append(a[2] if len(a) > 2 else k["encoder_hidden_states"]),
            with_kwargs=True,
        ),
        pipe.denoising_unet.register_forward_pre_hook(
            lambda m, a, k: seen["den"].append(k["faithful"]), with_kwargs=True
        ),
    ]
    try:
        outs = {
            f: pipe(image, speech(0.1), landmarks=lmk, num_inference_steps=1, clip_length=3, faithful=f,
                    output_type="latent").latents
            for f in (False, True)
        }  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    assert seen["den"] == [False, True]
    plain, tiled = seen["ref"]
    assert plain.shape[0] == tiled.shape[0] == 6
    u, c = plain[0], plain[3]
    assert not torch.equal(u, c)
    assert all(torch.equal(plain[i], u if i < 3 else c) for i in range(6))
    assert all(torch.equal(tiled[i], u if i % 2 == 0 else c) for i in range(6))
    assert not torch.equal(outs[False], outs[True])


def test_audio_file_equals_the_array(pipe, face, tmp_path):
    image, lmk = face
    audio = speech(0.2)
    path = A.write_audio(tmp_path / "speech.wav", audio)
    kw = dict(landmarks=lmk, num_inference_steps=1, clip_length=3, output_type="latent")
    from_file = pipe(image, path, generator=torch.Generator().manual_seed(0), **kw).latents
    array = pipe(image, A.load_audio(path), generator=torch.Generator().manual_seed(0), **kw).latents
    assert torch.equal(from_file, array) and from_file.shape[2] == 5
