"""anim_lab.flow: rectified flow, the shift, both i2v conditions and the sampler, against hand computations
and diffusers' own HunyuanVideo-I2V pipeline (tiny random models, every weight nonzero)."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoImageToVideoPipeline
from torch.nn import functional as F

from anim_lab import flow
from anim_lab.causal_vae import CAUSAL_VAE_TINY, CausalVAE
from anim_lab.metrics import psnr
from anim_lab.plain import randomize
from anim_lab.tiling import TileSettings

C = 4  # TINY latent channels


def tiny(kind: str, latent_channels: int = C) -> torch.nn.Module:
    return randomize(flow.build_transformer(kind, flow.TINY_I2V, latent_channels=latent_channels)).eval()


def text(batch: int = 1, length: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = flow.TINY_I2V
    return dict(
        encoder_hidden_states=torch.randn(batch, length, cfg["text_embed_dim"], generator=g),
        encoder_attention_mask=torch.ones(batch, length),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
    )


# --- scheduler: the Euler step and the shift ----------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_euler_step_by_hand_equals_scheduler(shift):
    sched = flow.make_scheduler(shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 6)[:-1])
    x = torch.randn(2, C, 2, 4, 4)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn_like(x)
        sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        by_hand = x + (sigma_next - sigma) * v  # x_{t'} = x_t + (t' - t) v
        x = sched.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(x, by_hand)
    assert float(sched.sigmas[-1]) == 0.0  # the last step lands on the data end


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.0])
def test_shifted_timesteps_equal_published_formula(shift):
    n = 10
    sigmas = np.linspace(1.0, 0.0, n + 1)[:-1]
    sched = flow.make_scheduler(shift)
    sched.set_timesteps(sigmas=sigmas)
    published = [
        shift * s / (1 + (shift - 1) * s) for s in sigmas
    ]  # SD3 / HunyuanVideo: s*sigma/(1+(s-1)sigma)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), published, rtol=1e-5)
    np.testing.assert_allclose(sched.timesteps.numpy(), np.array(published) * 1000, rtol=1e-5)
    np.testing.assert_allclose(flow.shift_sigmas(sigmas, shift), published, rtol=1e-12)
    # shift > 1 spends more steps at high noise (sigma > 0.5)
    high = int((np.array(published) > 0.5).sum())
    assert high > n // 2 if shift > 1 else high <= n // 2


def test_rectified_flow_path_and_velocity():
    x0, eps = torch.randn(3, C, 2, 4, 4), torch.randn(3, C, 2, 4, 4)
    torch.testing.assert_close(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(flow.interpolate(x0, eps, torch.ones(3)), eps)
    t, dt = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    dxdt = (flow.interpolate(x0, eps, t + dt) - flow.interpolate(x0, eps, t - dt)) / (2 * dt)
    torch.testing.assert_close(dxdt, flow.velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_flow_loss_equals_hand_computation():
    x0, eps = torch.randn(2, C, 3, 4, 4), torch.randn(2, C, 3, 4, 4)
    img, t, tx = torch.randn(2, C, 1, 4, 4), torch.tensor([0.3, 0.8]), text(2)
    for kind in flow.IMAGE_CONDITION_TYPES:
        model = tiny(kind)
        x_t = (1 - t.view(2, 1, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1, 1) * eps
        if kind == "latent_concat":
            padded = torch.cat([img, torch.zeros(2, C, 2, 4, 4)], dim=2)
            mask = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1, 1).expand(2, 1, 3, 4, 4)
            inp = torch.cat([x_t, padded, mask], dim=1)
        else:
            inp = torch.cat([img, x_t[:, :, 1:]], dim=2)
        pred = model(hidden_states=inp, timestep=t * 1000, return_dict=False, **tx)[0]
        sl = slice(None) if kind == "latent_concat" else slice(1, None)
        expected = F.mse_loss(pred[:, :, sl], (eps - x0)[:, :, sl])
        torch.testing.assert_close(flow.flow_loss(model, x0, img, tx, t, eps), expected)


# --- the condition layouts against diffusers' HunyuanVideo-I2V pipeline -------------------------------------
def _run_pipeline(kind: str, steps: int = 2):
    """diffusers' HunyuanVideoImageToVideoPipeline on a tiny config; records every transformer input."""
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**CAUSAL_VAE_TINY).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    model = tiny(kind)
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=model,
        vae=vae,
        scheduler=flow.make_scheduler(3.0),
        text_encoder_2=None,
        tokenizer_2=None,
        image_processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # [0, 1]
    tx = text(1)
    out = pipe(
        image=image,
        prompt_embeds=tx["encoder_hidden_states"],
        prompt_attention_mask=tx["encoder_attention_mask"],
        pooled_prompt_embeds=tx["pooled_projections"],
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).frames
    ours_vae = CausalVAE(**CAUSAL_VAE_TINY).eval()
    ours_vae.load_state_dict(vae.state_dict(), strict=True)
    return seen, out, image * 2 - 1, ours_vae, model, tx


def test_latent_concat_layout_matches_diffusers_pipeline():
    seen, _, image, vae, _, _ = _run_pipeline("latent_concat")
    img_lat = flow.encode_condition_image(vae, image, size=(32, 32))  # (1, C, 1, 4, 4)
    for hidden in seen:  # (1, 2C + 1, 3, 4, 4) at each step
        assert hidden.shape == (1, 2 * C + 1, 3, 4, 4)
        ours = flow.latent_concat_input(hidden[:, :C], img_lat)
        torch.testing.assert_close(ours, hidden, atol=1e-5, rtol=1e-5)
    # the layout spelled out: [noisy latents | image latent in frame 0, zeros | mask 1, 0, 0]
    h = seen[0]
    torch.testing.assert_close(h[:, C : 2 * C, :1], img_lat, atol=1e-5, rtol=1e-5)
    assert h[:, C : 2 * C, 1:].abs().max() == 0
    assert h[:, 2 * C, 0].eq(1).all() and h[:, 2 * C, 1:].eq(0).all()


def test_token_replace_input_and_sampler_match_diffusers_pipeline():
    seen, out, image, vae, model, tx = _run_pipeline("token_replace", steps=3)
    img_lat = flow.encode_condition_image(vae, image, size=(32, 32))
    for hidden in seen:  # (1, C, 3, 4, 4): frame 0 is the clean image latent at every step
        torch.testing.assert_close(flow.token_replace_input(hidden, img_lat), hidden)
        torch.testing.assert_close(hidden[:, :, :1], img_lat, atol=1e-5, rtol=1e-5)
    # our written-out loop from the same starting noise gives the pipeline's latents
    noise = torch.randn((1, C, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    ours = flow.sample_i2v(  # the diffusers pipeline's start: faithful=True
        model, img_lat, tx, num_frames=9, num_inference_steps=3, shift=3.0, latents=noise, faithful=True
    )
    torch.testing.assert_close(ours, out, atol=1e-4, rtol=1e-4)


def test_latent_concat_sampler_matches_diffusers_pipeline():
    _, out, image, vae, model, tx = _run_pipeline("latent_concat", steps=3)
    img_lat = flow.encode_condition_image(vae, image)
    noise = torch.randn((1, C, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    ours = flow.sample_i2v(  # the diffusers pipeline's start: faithful=True
        model, img_lat, tx, num_frames=9, num_inference_steps=3, shift=3.0, latents=noise, faithful=True
    )
    torch.testing.assert_close(ours[:, :, 1:], out, atol=1e-4, rtol=1e-4)  # the pipeline drops latent frame 0


# --- the sampler against a plain loop (shift, CFG) ----------------------------------------------------------
def test_sampler_equals_plain_euler_loop_with_cfg():
    model, tx, un = tiny("latent_concat"), text(2, seed=0), text(2, seed=5)
    img = torch.randn(2, C, 1, 4, 4)
    noise = torch.randn(2, C, 3, 4, 4)
    shift, steps, w = 3.0, 4, 2.5
    ours = flow.sample_i2v(
        model, img, tx, 9, steps, shift, guidance_scale=w, uncond_text=un, latents=noise, faithful=False
    )
    u = np.linspace(1.0, 0.0, steps + 1)
    sig = [shift * s / (1 + (shift - 1) * s) for s in u]
    x = noise.clone()
    mask = torch.zeros(2, 1, 3, 4, 4)
    mask[:, :, 0] = 1
    cond = torch.cat([img, torch.zeros(2, C, 2, 4, 4)], dim=2)
    for i in range(steps):
        inp = torch.cat([x, cond, mask], dim=1)
        ts = torch.full((2,), sig[i] * 1000)
        v_c = model(hidden_states=inp, timestep=ts, return_dict=False, **tx)[0]
        v_u = model(hidden_states=inp, timestep=ts, return_dict=False, **un)[0]
        x = x + (sig[i + 1] - sig[i]) * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_token_replace_frame0_is_the_condition_image_within_vae_reconstruction():
    from anim_lab import toy

    vae = CausalVAE.from_pretrained()  # the trained toy causal VAE
    frame = toy.make_clip(toy.identity_from_seed(1_000_001), num_frames=1, size=64, seed=0).frames[0]
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, 64, 64)
    img_lat = flow.encode_condition_image(vae, image, size=(64, 64))  # (1, 16, 1, 8, 8)
    model = tiny("token_replace", latent_channels=16)
    cfg = flow.TINY_I2V
    assert model.config.in_channels == 16 and cfg["text_embed_dim"] == 16
    latents = flow.sample_i2v(model, img_lat, text(1), num_frames=17, num_inference_steps=3, shift=3.0)
    assert torch.equal(latents[:, :, :1], img_lat)  # frame 0 is the clean image latent, exactly
    tiles = TileSettings(32, 32, 24, 24, 8, 4)
    for tiling in (None, tiles):
        reconstruction = flow.decode_latents(vae, img_lat, tiling=tiling)[
            :, :, 0
        ]  # the VAE's own, same tiles
        video = flow.decode_latents(vae, latents, tiling=tiling)  # (1, 3, 17, 64, 64)
        assert video.shape == (1, 3, 17, 64, 64)
        own, ours = float(psnr(reconstruction, image)), float(psnr(video[:, :, 0], image))
        assert own > 20  # the toy VAE reconstructs it well (tiles of 32 px cost it ~6 dB) ...
        # ... and frame 0 of the generated clip is that reconstruction, up to what the decoder's GroupNorms
        # leak from the other (here random-model, off-distribution) latent frames into frame 0
        assert ours > own - 3.0, (ours, own)
        assert float(psnr(video[:, :, 0], reconstruction)) > 27


def test_latent_concat_channel_counts():
    model = flow.build_transformer("latent_concat")
    assert model.config.in_channels == 33 and model.config.out_channels == 16  # 16 + 16 + 1
    assert flow.build_transformer("token_replace").config.in_channels == 16


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_condition_image_size():
    vae = CausalVAE(**CAUSAL_VAE_TINY).eval()
    with pytest.raises(ValueError, match=r"condition image is \(32, 32\) pixels but the video is \(64, 64\)"):
        flow.encode_condition_image(vae, torch.zeros(1, 3, 32, 32), size=(64, 64))
    with pytest.raises(ValueError, match=r"must be a \(B, 3, H, W\) tensor"):
        flow.encode_condition_image(vae, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="image_latents must be"):
        flow.latent_concat_input(torch.zeros(1, C, 3, 8, 8), torch.zeros(1, C, 1, 4, 4))
    with pytest.raises(ValueError, match="encode the condition image at the video's frame size"):
        flow.sample_i2v(
            tiny("token_replace"),
            torch.zeros(1, C, 1, 4, 4),
            text(1),
            9,
            1,
            latents=torch.zeros(1, C, 3, 6, 6),
        )


def test_bad_frame_counts():
    model = tiny("latent_concat")
    with pytest.raises(ValueError, match=r"needs 4k\+1 frames .* got 16"):
        flow.sample_i2v(model, torch.zeros(1, C, 1, 4, 4), text(1), num_frames=16)
    with pytest.raises(ValueError, match=r"latents have 4 latent frames but num_frames=9 needs 3"):
        flow.sample_i2v(
            model, torch.zeros(1, C, 1, 4, 4), text(1), num_frames=9, latents=torch.zeros(1, C, 4, 4, 4)
        )
    with pytest.raises(ValueError, match=r"needs 4k\+1 frames"):
        flow.latent_frames_for(14)


def test_bad_image_condition_type():
    with pytest.raises(
        ValueError, match=r"image_condition_type must be one of \('latent_concat', 'token_replace'\)"
    ):
        flow.build_transformer("channel_concat")
    with pytest.raises(ValueError, match="image_condition_type must be one of"):
        flow.i2v_model_input("token_concat", torch.zeros(1, C, 3, 4, 4), torch.zeros(1, C, 1, 4, 4))
    with pytest.raises(ValueError, match="image_condition_type must be one of"):
        flow.load_toy_i2v("none")


@pytest.mark.parametrize("shift", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_shift(shift):  # inf gave NaN sigmas before it was refused
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        flow.make_scheduler(shift)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        flow.shift_sigmas(np.linspace(1, 0, 5), shift)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        flow.sample_i2v(tiny("token_replace"), torch.zeros(1, C, 1, 4, 4), text(1), 9, 1, shift=shift)


@pytest.mark.parametrize("kind", flow.IMAGE_CONDITION_TYPES)
def test_committed_toy_i2v_loads_and_keeps_frame0(kind):
    """The trained toy models load with the TOY_I2V config; token_replace keeps the condition latent."""
    model = flow.load_toy_i2v(kind)
    reference = flow.build_transformer(kind)
    public = lambda cfg: {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k[0] != "_"}  # noqa: E731
    assert public(model.config) == public(reference.config)
    assert model.state_dict().keys() == reference.state_dict().keys()
    text = flow.toy_text_tokens(["brown hair , short hair"])
    img = torch.randn(1, 16, 1, 8, 8)
    out = flow.sample_i2v(model, img, text, 17, 2, 3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 16, 5, 8, 8) and torch.isfinite(out).all()
    if kind == "token_replace":
        assert torch.equal(out[:, :, :1], img)
