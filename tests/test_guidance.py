"""Guidance, condition dropout and the official DDIM sampler (anim_lab.guidance), checked against the facts
of implementations.md §1.9/§1.10/§3.2, diffusers' own scheduler and formulas written out here."""

import random

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from anim_lab.guidance import (
    DDIM_ETA,
    DDIM_INFERENCE_V1,
    DDIM_OFFICIAL,
    build_scheduler,
    cfg_batch,
    cfg_combine,
    cfg_encoder_hidden_states,
    check_prediction_type,
    convert_prediction,
    do_classifier_free_guidance,
    draw_hallo_uncond,
    draw_uncond,
    drop_condition,
    hallo_uncond_tokens,
    set_timesteps,
)


def _v1_scheduler():
    return build_scheduler(**{k: v for k, v in DDIM_INFERENCE_V1.items() if k != "beta_schedule"})


# --- the sampler --------------------------------------------------------------------------------------------
def test_scheduler_is_the_official_config():
    scheduler = build_scheduler()
    assert isinstance(scheduler, DDIMScheduler)
    expected = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "thresholding": False,
    }
    assert {k: scheduler.config[k] for k in expected} == expected
    assert DDIM_ETA == 0.0
    assert scheduler.init_noise_sigma == 1.0 and float(scheduler.final_alpha_cumprod) == 1.0


# implementations.md §1.9, verified on the reference with diffusers 0.24: head and tail of each list.
@pytest.mark.parametrize(
    "steps, head, tail",
    [
        (20, [999, 949], [99, 49]),
        (25, [999, 959, 919, 879], [119, 79, 39]),
        (30, [999, 966, 932, 899], [99, 66, 32]),
        (40, [999, 974, 949, 924], [74, 49, 24]),
    ],
)
def test_trailing_timesteps_equal_the_reference_lists(steps, head, tail):
    timesteps = set_timesteps(build_scheduler(), steps).tolist()
    assert timesteps[: len(head)] == head and timesteps[-len(tail) :] == tail
    # the whole list: trailing spacing written out, round(1000 - k * 1000 / n) - 1 for k = 0..n-1
    assert timesteps == [round(1000 - k * 1000 / steps) - 1 for k in range(steps)]


def test_legacy_v1_timesteps_and_terminal_alpha():
    scheduler = _v1_scheduler()
    timesteps = set_timesteps(scheduler, 30).tolist()
    assert timesteps[:3] == [958, 925, 892] and timesteps[-2:] == [34, 1]  # §1.9: [958, 925, ..., 34, 1]
    assert float(scheduler.alphas_cumprod[999]) == pytest.approx(0.00158, abs=1e-5)


def test_zero_terminal_snr_and_reference_alphas():
    a = build_scheduler().alphas_cumprod
    assert float(a[999]) == 0.0
    assert float(a[0]) == pytest.approx(0.99915, abs=1e-5)
    assert float(a[499]) == pytest.approx(0.14253, abs=1e-5)
    assert float(a[998]) == pytest.approx(6.3e-8, rel=0.05)


def _rescaled_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in float64: shift and scale sqrt(alpha_bar) so that its last value is
    0 and its first unchanged."""
    sqrt_ab = np.sqrt(np.cumprod(1 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_betas_and_rescale_match_a_plain_computation(beta_schedule):
    scheduler = build_scheduler(beta_schedule)
    assert scheduler.config.beta_schedule == beta_schedule
    if beta_schedule == "linear":
        betas = np.linspace(0.00085, 0.012, 1000)
    else:  # linear in sqrt(beta), then squared
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    expected = _rescaled_alphas_cumprod(betas)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), expected, atol=2e-6, rtol=1e-4)


def test_scaled_linear_keeps_more_signal_mid_schedule():
    # the training schedule (scaled_linear) against the inference one (linear): different SNR at the same t
    linear, scaled = build_scheduler("linear").alphas_cumprod, build_scheduler("scaled_linear").alphas_cumprod
    assert float(scaled[499]) > float(linear[499]) + 0.05
    assert float(scaled[999]) == float(linear[999]) == 0.0


def _noisy(scheduler, batch=3, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    x0 = torch.randn(batch, 4, 2, 5, 5, generator=g)
    eps = torch.randn(batch, 4, 2, 5, 5, generator=g)
    t = torch.tensor([999, 500, 3][:batch])
    x_t = scheduler.add_noise(x0, eps, t)
    return x0, eps, t, x_t


def test_v_prediction_conversions_match_diffusers_and_round_trip():
    scheduler = build_scheduler()
    x0, eps, t, x_t = _noisy(scheduler)
    v = scheduler.get_velocity(x0, eps, t)  # diffusers' target for v-prediction training
    torch.testing.assert_close(convert_prediction(scheduler, v, x_t, t, "epsilon"), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(convert_prediction(scheduler, v, x_t, t, "sample"), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(convert_prediction(scheduler, v, x_t, t, "v_prediction"), v)
    # at zero SNR (t = 999) x_t is pure noise and x0 = -v
    torch.testing.assert_close(convert_prediction(scheduler, v, x_t, t, "sample")[0], -v[0])
    torch.testing.assert_close(x_t[0], eps[0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_other_prediction_types_round_trip_through_v(prediction_type):
    scheduler = build_scheduler(prediction_type=prediction_type, rescale_betas_zero_snr=False)
    x0, eps, t, x_t = _noisy(scheduler)
    v = scheduler.get_velocity(x0, eps, t)
    output = eps if prediction_type == "epsilon" else x0
    torch.testing.assert_close(
        convert_prediction(scheduler, output, x_t, t, "v_prediction"), v, atol=2e-5, rtol=1e-4
    )
    v_scheduler = build_scheduler(rescale_betas_zero_snr=False)  # same betas, v-prediction
    back_type = "epsilon" if prediction_type == "epsilon" else "sample"
    back = convert_prediction(v_scheduler, v, x_t, t, back_type)
    torch.testing.assert_close(back, output, atol=2e-5, rtol=1e-4)


def test_conversion_agrees_with_the_schedulers_own_x0():
    for scheduler in (build_scheduler(), _v1_scheduler()):
        set_timesteps(scheduler, 25)
        x0, eps, _, _ = _noisy(scheduler, batch=1)
        t = int(scheduler.timesteps[3])
        x_t = scheduler.add_noise(x0, eps, torch.tensor([t]))
        output = torch.randn_like(x_t)
        expected = scheduler.step(output, t, x_t, eta=0.0).pred_original_sample
        torch.testing.assert_close(convert_prediction(scheduler, output, x_t, t, "sample"), expected)


def _ddim_step_by_hand(scheduler, v, t, x_t):
    """DDIM (eta = 0) for a v-prediction, written from the DDIM paper's eq. 12: predict x0 and eps, then move
    to the previous timestep t - 1000 // n (alpha_bar = 1 past the end)."""
    n = scheduler.num_inference_steps
    prev_t = t - scheduler.config.num_train_timesteps // n
    a_t = scheduler.alphas_cumprod[t].double()
    a_prev = (
        scheduler.alphas_cumprod[prev_t].double() if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    )
    v, x_t = v.double(), x_t.double()
    x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * v
    eps = a_t.sqrt() * v + (1 - a_t).sqrt() * x_t
    return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()


@pytest.mark.parametrize("index", [0, 1, 12, 29])
def test_one_ddim_step_by_hand_equals_scheduler_step(index):
    scheduler = build_scheduler()
    timesteps = set_timesteps(scheduler, 30)
    t = int(timesteps[index])
    g = torch.Generator().manual_seed(index)
    x_t = torch.randn(2, 4, 3, 6, 6, generator=g)
    v = torch.randn(2, 4, 3, 6, 6, generator=g)
    expected = scheduler.step(v, t, x_t, eta=DDIM_ETA).prev_sample
    torch.testing.assert_close(_ddim_step_by_hand(scheduler, v, t, x_t), expected, atol=1e-5, rtol=1e-5)


def test_epsilon_at_zero_snr_is_refused_not_nan():
    # built with diffusers directly (build_scheduler refuses this combination)
    raw = DDIMScheduler(**{**DDIM_OFFICIAL, "prediction_type": "epsilon"})
    x = torch.randn(1, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="zero SNR"):
        convert_prediction(raw, torch.randn_like(x), x, 999, "sample")
    torch.testing.assert_close(
        convert_prediction(raw, x, x, 999, "epsilon"), x
    )  # eps -> eps needs no division
    # what the library itself does there: a non-finite x0
    raw.set_timesteps(30)
    assert not torch.isfinite(raw.step(torch.randn_like(x), 999, x).pred_original_sample).all()


# --- classifier-free guidance -------------------------------------------------------------------------------
def test_cfg_batch_puts_uncond_rows_first():
    x = torch.randn(3, 4, 2, 5, 5)
    batch = cfg_batch(x)
    assert batch.shape == (6, 4, 2, 5, 5)
    torch.testing.assert_close(batch[:3], x)
    torch.testing.assert_close(batch[3:], x)
    tokens = torch.randn(3, 1, 8)
    context = cfg_encoder_hidden_states(tokens)
    assert torch.equal(context[:3], torch.zeros_like(tokens)) and torch.equal(context[3:], tokens)
    own = torch.randn(3, 1, 8)
    assert torch.equal(cfg_encoder_hidden_states(tokens, own)[:3], own)


def test_cfg_combine_is_the_reference_arithmetic():
    uncond, cond = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    s = 3.5
    guided = cfg_combine(torch.cat([uncond, cond]), s)
    torch.testing.assert_close(guided, uncond + s * (cond - uncond))
    torch.testing.assert_close(guided, s * cond + (1 - s) * uncond)  # the seed notes' way of writing it
    torch.testing.assert_close(cfg_combine(torch.cat([uncond, cond]), 1.0), cond)
    torch.testing.assert_close(cfg_combine(torch.cat([uncond, cond]), 0.0), uncond)


def test_guidance_rescale_matches_lin_et_al():
    uncond, cond = torch.randn(2, 4, 3, 5, 5), 2.0 * torch.randn(2, 4, 3, 5, 5)
    s, phi = 7.5, 0.7
    guided = uncond + s * (cond - uncond)
    std = lambda x: x.flatten(1).std(dim=1).reshape(-1, 1, 1, 1, 1)  # noqa: E731 -- per-sample std
    rescaled = guided * std(cond) / std(guided)
    expected = phi * rescaled + (1 - phi) * guided
    torch.testing.assert_close(cfg_combine(torch.cat([uncond, cond]), s, guidance_rescale=phi), expected)
    full = cfg_combine(torch.cat([uncond, cond]), s, guidance_rescale=1.0)
    torch.testing.assert_close(std(full), std(cond))
    torch.testing.assert_close(cfg_combine(torch.cat([uncond, cond]), s, guidance_rescale=0.0), guided)


@pytest.mark.parametrize("scale, expected", [(0.0, False), (1.0, False), (1.5, True), (3.5, True)])
def test_guidance_is_on_above_one(scale, expected):
    assert do_classifier_free_guidance(scale) is expected


# --- condition dropout and unconditional inputs -------------------------------------------------------------
def test_draw_uncond_is_one_coin_per_step():
    rng, twin = random.Random(7), random.Random(7)
    draws = [draw_uncond(rng, 0.1) for _ in range(20000)]
    assert draws == [twin.random() < 0.1 for _ in range(20000)]
    assert abs(np.mean(draws) - 0.1) < 0.01


def test_hallo_dropout_faithful_is_two_independent_coins():
    rng, twin = random.Random(3), random.Random(3)
    draws = [draw_hallo_uncond(rng, faithful=True) for _ in range(40000)]
    assert draws == [(twin.random() < 0.05, twin.random() < 0.05) for _ in range(40000)]
    image, audio = np.array(draws).T
    assert abs(image.mean() - 0.05) < 0.005 and abs(audio.mean() - 0.05) < 0.005
    assert abs((image & audio).mean() - 0.0025) < 0.0015  # both: the product, not the config's 0.05


def test_hallo_dropout_exclusive_follows_the_config_names():
    rng = random.Random(5)
    draws = [draw_hallo_uncond(rng, faithful=False) for _ in range(40000)]
    counts = {
        k: sum(d == k for d in draws) / len(draws) for k in [(True, False), (False, True), (True, True)]
    }
    for frequency in counts.values():
        assert abs(frequency - 0.05) < 0.006


def test_training_dropout_feeds_the_encoder_zeros_inference_feeds_zero_tokens():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    encoder = CLIPVisionModelWithProjection(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    dropped = drop_condition(pixels, True)
    assert torch.equal(dropped, torch.zeros_like(pixels)) and drop_condition(pixels, False) is pixels
    with torch.no_grad():
        trained_uncond = encoder(pixel_values=dropped).image_embeds  # what training fed on dropped steps
        tokens = encoder(pixel_values=pixels).image_embeds[:, None]  # (2, 1, 16)
    inference_uncond = cfg_encoder_hidden_states(tokens)[:2, 0]  # what inference feeds
    assert torch.equal(inference_uncond, torch.zeros_like(inference_uncond))
    assert float(trained_uncond.norm(dim=-1).min()) > 0.1  # the encoder of zero pixels is not zero


class _ImageProj(nn.Module):
    """Hallo's ImageProjModel structure: Linear(512 -> 4*D), reshape to 4 tokens, LayerNorm."""

    def __init__(self, dim=16, tokens=4):
        super().__init__()
        self.proj, self.norm, self.tokens = nn.Linear(512, tokens * dim), nn.LayerNorm(dim), tokens
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)

    def forward(self, x):
        return self.norm(self.proj(x).reshape(x.shape[0], self.tokens, -1))


def test_hallo_uncond_is_the_projection_of_zeros():
    image_proj = _ImageProj()
    face_emb = torch.randn(2, 512)
    with torch.no_grad():
        uncond = hallo_uncond_tokens(image_proj, face_emb)
        expected = image_proj(torch.zeros(2, 512))
    torch.testing.assert_close(uncond, expected)
    assert uncond.shape == (2, 4, 16) and float(uncond.abs().mean()) > 0.1


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf")])
def test_bad_guidance_scale(scale):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        do_classifier_free_guidance(scale)
    with pytest.raises(ValueError, match="guidance_scale"):
        cfg_combine(torch.randn(2, 3), scale)


def test_bad_guidance_rescale_and_odd_batch():
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        cfg_combine(torch.randn(2, 3), 3.5, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="even number of rows"):
        cfg_combine(torch.randn(3, 3), 3.5)
    with pytest.raises(ValueError, match="must have the shape of the cond tokens"):
        cfg_encoder_hidden_states(torch.randn(2, 1, 8), torch.randn(1, 1, 8))


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_bad_num_inference_steps(steps):
    scheduler = build_scheduler()
    with pytest.raises(ValueError, match="between 1 and the 1000 training timesteps"):
        set_timesteps(scheduler, steps)
    assert scheduler.num_inference_steps is None  # nothing half-set


@pytest.mark.parametrize("steps", [2.5, "30", True])
def test_non_integer_num_inference_steps(steps):
    with pytest.raises(ValueError, match="num_inference_steps must"):
        set_timesteps(build_scheduler(), steps)


def test_prediction_type_the_sampler_was_not_built_for():
    scheduler = build_scheduler()
    check_prediction_type(scheduler, "v_prediction")  # fine
    with pytest.raises(ValueError, match="built for 'v_prediction' but the model predicts 'epsilon'"):
        check_prediction_type(scheduler, "epsilon")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        check_prediction_type(scheduler, "flow")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        build_scheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="to must be one of"):
        convert_prediction(scheduler, torch.randn(1, 2), torch.randn(1, 2), 5, "noise")
    with pytest.raises(ValueError, match="must have one shape"):
        convert_prediction(scheduler, torch.randn(1, 2), torch.randn(1, 3), 5, "sample")


def test_bad_scheduler_options():
    with pytest.raises(ValueError, match="epsilon prediction cannot sample a zero-terminal-SNR schedule"):
        build_scheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        build_scheduler("cosine")
    with pytest.raises(ValueError, match=r"unknown DDIMScheduler arguments \['eta'\]"):
        build_scheduler(eta=0.0)


def test_bad_dropout_ratios():
    rng = random.Random(0)
    with pytest.raises(ValueError, match=r"uncond_ratio is a probability and must be in \[0, 1\]"):
        draw_uncond(rng, 1.5)
    with pytest.raises(ValueError, match="uncond_audio_ratio is a probability"):
        draw_hallo_uncond(rng, uncond_audio_ratio=-0.1)
    with pytest.raises(ValueError, match="sum to"):
        draw_hallo_uncond(rng, 0.5, 0.4, 0.3, faithful=False)
