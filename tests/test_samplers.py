"""The schedule and step against diffusers, and every sampler on an analytic Gaussian prior."""

import json
import math

import pytest
import torch
from conftest import assert_close, linear_operator

import dmap

# The scheduler config of stabilityai/stable-diffusion-2-base (docs/sd2_formats.md §1.3).
SD2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                     clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


def euler_ancestral(steps):
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler.from_config(SD2_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps", [25, 50, 250, 500, 1000])
def test_sd_schedule_is_diffusers_bit_for_bit(steps):
    scheduler = euler_ancestral(steps)
    abar = dmap.sd_abar()
    assert torch.equal(abar, scheduler.alphas_cumprod)
    assert torch.equal(dmap.sd_sigmas(steps, abar), scheduler.sigmas)
    if steps == 500:  # docs/official_code.md §2.2
        sigmas = dmap.sd_sigmas(steps, abar)
        assert abs(sigmas[0].item() - 14.6146) < 1e-4 and abs(sigmas[-2].item() - 0.02917) < 1e-5


@pytest.mark.parametrize("steps", [37, 500])
def test_sigma_to_t_inverts_the_schedule(steps):
    abar = dmap.sd_abar()
    table = (((1 - abar) / abar) ** 0.5).double().numpy()
    sigmas = dmap.sd_sigmas(steps, abar)[:-1].tolist()
    t = torch.tensor([dmap.sigma_to_t(s, table) for s in sigmas], dtype=torch.float64)
    assert_close(t, euler_ancestral(steps).timesteps, 2e-4, rel=False, what="timesteps")
    assert dmap.sigma_to_t(0.0, table) == 0 and dmap.sigma_to_t(1e3, table) == 999


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ancestral_step_equals_diffusers(prediction):
    scheduler = euler_ancestral(50)
    scheduler.register_to_config(prediction_type=prediction)
    sigmas, x = scheduler.sigmas, torch.randn(2, 4, 8, 8) * scheduler.sigmas[0]
    for i in range(0, 50, 7):
        t, out = scheduler.timesteps[i], torch.randn(2, 4, 8, 8)
        scheduler._step_index = i
        ref = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        s = sigmas[i].item()
        # our SDDenoiser's x0_hat for this model output (eps or v), then our step
        x0_hat = x - s * out if prediction == "epsilon" else \
            x / (s**2 + 1) - out * s / math.sqrt(s**2 + 1)
        ours, _, _ = dmap.ancestral_step(x, x0_hat, s, sigmas[i + 1].item(),
                                         generator=torch.Generator().manual_seed(i))
        assert_close(ours, ref, 1e-5, what=f"step {i}")


def test_karras_sigmas():
    s = dmap.karras_sigmas(100, 0.002, 4.0, 7.0)
    assert len(s) == 101 and s[-1] == 0 and torch.all(s[:-1] > s[1:])
    assert_close(s[[0, 99]], torch.tensor([4.0, 0.002]), 1e-6, what="ends")


# --- An analytic prior: x0 ~ N(m, I) in d dimensions, y = A x0 (+ noise) -------------------
D, DY = 64, 8


def gaussian_problem(seed=0, batch=16):
    """denoiser, x, y, A, sigmas and the model parts PSLD takes (dmap.model_parts)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(D, generator=g)
    M = torch.randn(DY, D, generator=g) / math.sqrt(D)
    x_true = m + torch.randn(D, generator=g)
    y = (M @ x_true)[None]

    def denoiser(x, sigma):  # E[x0 | x0 + sigma n] for x0 ~ N(m, I)
        return (x + sigma**2 * m) / (1 + sigma**2)

    sigmas = dmap.karras_sigmas(30, 0.01, 20.0)
    x = sigmas[0] * torch.randn(batch, D, generator=g)
    A, parts = linear_operator(M)
    return denoiser, x, y, A, sigmas, parts


HYPER = {"ddpm": {}, "dps": dict(zeta=0.5), "dsg": dict(zeta=0.3), "dmap": dict(zeta=0.5),
         "freedom": dict(zeta=0.5), "resample": dict(zeta=0.5, iters=50, lr=0.05),
         "psld": dict(zeta=0.5, gamma=0.1)}


def run(method, seed=0, batch=16, **extra):
    denoiser, x, y, A, sigmas, parts = gaussian_problem(seed, batch)
    return dmap.SAMPLERS[method](denoiser, x, y, A, sigmas, generator=torch.Generator()
                                 .manual_seed(1), **dmap.model_parts(method, **parts),
                                 **dict(HYPER[method], **extra)), y, A


def fit(x, y, A):
    return (A(x) - y).norm(dim=1).mean().item()


@pytest.mark.parametrize("method", sorted(HYPER))
def test_sampler_fits_y_and_is_reproducible(method):
    x0, y, A = run(method)
    assert x0.shape == (16, D) and torch.isfinite(x0).all() and not x0.requires_grad
    again, _, _ = run(method)
    assert torch.equal(x0, again), "same seed, same samples"
    unguided, _, _ = run("ddpm")
    print(method, "fit", fit(x0, y, A), "unguided", fit(unguided, y, A))
    if method != "ddpm":
        assert fit(x0, y, A) < 0.3 * fit(unguided, y, A)


@pytest.mark.parametrize("method", sorted(HYPER))
def test_batch_elements_are_independent(method):
    """Sample 0 does not depend on what else is in the batch (per-sample norms and radii)."""
    denoiser, x, y, A, sigmas, parts = gaussian_problem(0, 2)
    kwargs = dict(HYPER[method], **dmap.model_parts(method, **parts))
    outs = []
    for other in (1.0, -3.0):
        xb, yb = x.clone(), y.repeat(2, 1)
        xb[1], yb[1] = other * xb[1], other * yb[1]
        outs.append(dmap.SAMPLERS[method](denoiser, xb, yb, A, sigmas, **kwargs,
                                          generator=torch.Generator().manual_seed(3))[0])
    assert_close(outs[0], outs[1], 1e-5, what=method)


def test_dmap_stays_on_the_sphere():
    """After every step, ||x_{t-1} - mu|| = sqrt(n) sigma_up, mu the ancestral mean (Alg. 2)."""
    denoiser, x, y, A, sigmas, _ = gaussian_problem(0, 4)
    xs = [x]
    dmap.dmap(denoiser, x, y, A, sigmas, zeta=0.5, generator=torch.Generator().manual_seed(0),
              callback=lambda d: xs.append(d["x"]))
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        _, mu, sigma_up = dmap.ancestral_step(xs[i], denoiser(xs[i], s[i]), s[i], s[i + 1])
        radius = (xs[i + 1] - mu).norm(dim=1)
        assert_close(radius, torch.full_like(radius, math.sqrt(D) * sigma_up), 1e-4,
                     rel=False, what=f"radius at step {i}")


def test_ddpm_matches_exact_prior_and_ddim_is_deterministic():
    denoiser, x, y, A, sigmas, _ = gaussian_problem(0, 4000)
    m = torch.randn(D, generator=torch.Generator().manual_seed(0))  # gaussian_problem's mean
    x0 = dmap.ddpm(denoiser, x, y, A, dmap.karras_sigmas(200, 0.002, 80.0),
                   generator=torch.Generator().manual_seed(0))
    assert_close(x0.mean(0), m, 0.1, rel=False, what="prior mean")
    assert_close(x0.std(0), torch.ones(D), 0.1, rel=False, what="prior std")
    a, b = (dmap.ddpm(denoiser, x[:4], y, A, sigmas, eta=0.0,
                      generator=torch.Generator().manual_seed(seed)) for seed in (0, 9))
    assert torch.equal(a, b)


def test_zeta_per_step_tensor_equals_float():
    a, _, _ = run("dps", zeta=0.5)
    b, _, _ = run("dps", zeta=torch.full((30,), 0.5))
    assert torch.equal(a, b)


def test_denoiser_calls_per_step():
    """Cost in denoiser calls per step (for the closing note); DMAP: 1 + K (no grad + K grads)."""
    calls = {}
    for method in HYPER:
        denoiser, x, y, A, sigmas, parts = gaussian_problem(0, 2)
        count = [0]

        def counted(x, sigma, denoiser=denoiser, count=count):
            count[0] += 1
            return denoiser(x, sigma)

        dmap.SAMPLERS[method](counted, x, y, A, sigmas, **dmap.model_parts(method, **parts),
                              **HYPER[method])
        calls[method] = count[0] / (len(sigmas) - 1)
    print(json.dumps(calls))
    n = len(sigmas) - 1
    assert calls["dps"] == calls["dsg"] == calls["psld"] == calls["resample"] == calls["ddpm"] == 1
    assert calls["dmap"] == (n + 3 * (n - 1)) / n  # 1 + K per step; the last step has radius 0
    first, last = dmap.loop_step(0.2, n), dmap.loop_step(0.5, n)
    assert calls["freedom"] == (n + last - first + 1) / n


def test_dmap_callback_reports_x0_hat_at_sigma_and_loss_at_the_returned_point():
    """After step i: x0_hat = x0_hat(x_t) at sigmas[i]; loss = ||A(x0_hat(x_{t-1})) - y|| at the
    point the step returns (x0_hat at sigma 0 is the point itself)."""
    denoiser, x, y, A, sigmas, _ = gaussian_problem(0, 4)
    seen = []
    dmap.dmap(denoiser, x, y, A, sigmas, zeta=0.5, generator=torch.Generator().manual_seed(0),
              callback=seen.append)
    s = sigmas.tolist()
    assert [d["i"] for d in seen] == list(range(len(s) - 1))
    for d in seen:
        i = d["i"]
        assert d["sigma"] == s[i]
        assert_close(d["x0_hat"], denoiser(x, s[i]), 1e-6, what=f"x0_hat at step {i}")
        x0_next = denoiser(d["x"], s[i + 1]) if s[i + 1] > 0 else d["x"]
        assert_close(d["loss"], (A(x0_next) - y).norm(dim=1), 1e-5, what=f"loss at step {i}")
        x = d["x"]
