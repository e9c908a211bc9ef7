"""Diffusion posterior sampling on Stable Diffusion 2.0: DMAP, DPS, DSG, FreeDOM, ReSample, PSLD.

Xu et al., "Rethinking Diffusion Posterior Sampling: From Conditional Score Estimator to
Maximizing a Posterior", ICLR 2025, arXiv 2501.18913. Restore an image:

    python dmap.py --method dmap --op blur img.png

Reading order: (1)-(3) are model-free and run unchanged on the exact toy priors of toy_gmm.py:
(1) the forward noising, Tweedie's formula and the Karras schedule; (2) the unguided
Euler-ancestral step; (3) the samplers, one function each with one signature. Then (4) Stable
Diffusion 2.0: its schedule, its denoiser (and the CSE's) and loading; (5) restoring an image,
`restore`, a function; (6) its command line. Every sampler works in "variance exploding"
coordinates, x = x0 + sigma * noise, as the official code does (diffusers' Euler-ancestral
scheduler runs on latents scaled by sqrt(1 + sigma^2)), so the paper's step sizes carry over.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

import clip
import controlnet
import metrics
import operators
import plot
import unet
import vae
from checkpoint import read_config

# ---------------------------------------------------------------------------------------------
# (1) The diffusion: the forward noising q(x_t | x_0) (Eq. 1), its two coordinates, Tweedie's
#     formula (Eq. 4), and a noise schedule (Stable Diffusion's is in section (4))
# ---------------------------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) (Eq. 1; DDPM's "variance preserving" coordinates): sqrt(abar_t) x0 +
    sqrt(1 - abar_t) noise, as diffusers' DDPMScheduler.add_noise (used to train the CSE and the
    pixel prior). The samplers use x = x_t / sqrt(abar_t) = x0 + sigma_t noise instead."""
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def velocity(x0: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(abar) noise - sqrt(1 - abar) x0 (Salimans & Ho 2022;
    DDPMScheduler.get_velocity), for 768-v models."""
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def sigma_of_abar(abar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t): the noise level of x_t / sqrt(abar_t) = x0 + sigma_t
    noise, the "variance exploding" coordinates every sampler below works in."""
    return ((1 - abar) / abar) ** 0.5


def abar_of_sigma(sigma):
    """Its inverse, abar_t = 1 / (1 + sigma_t^2) (a float or a tensor)."""
    return 1 / (1 + sigma**2)


def tweedie(x: torch.Tensor, sigma: float, eps_hat: torch.Tensor) -> torch.Tensor:
    """Tweedie's formula (Eq. 4) with a noise prediction: x0_hat = E[x0 | x] = x - sigma eps_hat."""
    return x - sigma * eps_hat


def score(x: torch.Tensor, x0_hat: torch.Tensor, sigma: float) -> torch.Tensor:
    """Tweedie's formula (Eq. 4) read the other way: grad log p_sigma(x) = (x0_hat - x) / sigma^2,
    flattened to (N, n)."""
    return (x0_hat - x).flatten(1) / sigma**2


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n sigmas from sigma_max to sigma_min, then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


# ---------------------------------------------------------------------------------------------
# (2) The unguided Euler-ancestral step; the denoiser is any callable denoiser(x, sigma) ->
#     x0_hat = E[x0 | x] (Tweedie, Eq. 4): SDDenoiser below, or toy_gmm's exact GMM.denoiser
# ---------------------------------------------------------------------------------------------


def noise_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (as diffusers'
    randn_tensor), so a seed gives the same samples on CPU and GPU."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ancestral_step(x, x0_hat, sigma: float, sigma_next: float, eta=1.0, generator=None):
    """One Euler-ancestral step from sigma to sigma_next -> (x_next, mu, sigma_up).

    k-diffusion get_ancestral_step / diffusers EulerAncestralDiscreteScheduler.step. With eta = 1
    this is DDPM's ancestral step (mu is the posterior mean of x_{t-1} given x_t and x0_hat);
    with eta < 1 it equals DDIM(eta); eta = 0 is the deterministic DDIM / PF-ODE step. Noise is
    drawn even when sigma_up = 0, as diffusers does, so seeds give the same samples.
    """
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    # Euler step of the PF-ODE to sigma_down: mu = x + (x - x0_hat) / sigma * (sigma_down - sigma),
    # i.e. x moved towards x0_hat by 1 - sigma_down / sigma; lerp and torch.add(a, b, alpha=c) =
    # a + c b are one pass over the tensors each (the toy benchmark's 2000 x 800 particles)
    mu = torch.lerp(x, x0_hat, 1 - sigma_down / sigma)
    return torch.add(mu, noise_like(x, generator), alpha=sigma_up), mu, sigma_up


# ---------------------------------------------------------------------------------------------
# (3) The samplers: method(denoiser, x, y, A, sigmas, *, hyper-parameters, eta, generator,
#     callback) -> x0. A maps the denoiser's space to the measurement space (for SD latents
#     A(z) = H(decode(z)), H the pixel operator). Every batch element is an independent sample:
#     losses, norms and sphere radii are per sample, so 2000 particles of a toy prior and one SD
#     latent share the code. The callback gets, after step i: x (the returned x_{t-1}), sigma
#     (= sigmas[i]), x0_hat (= x0_hat(x_t) at sigma), and loss (||A(x0_hat) - y|| per sample;
#     DMAP: at the returned point; ddpm: None).
# ---------------------------------------------------------------------------------------------


def per_step(value, sigmas: torch.Tensor) -> list:
    """A hyper-parameter as one float per step: a float, or a tensor of len(sigmas) - 1 values."""
    return torch.as_tensor(value, dtype=torch.float64).broadcast_to(len(sigmas) - 1).tolist()


def loop_step(fraction: float, n: int) -> int:
    """The step of an n-step loop at a loop fraction, the nearest one, halves rounded up
    (FreeDOM's window, ReSample's stops): 0.2 of 500 is step 100, as the official code's."""
    return math.floor(fraction * n + 0.5)


def sample_norm(v: torch.Tensor) -> torch.Tensor:
    """The norm of each batch element, shaped (N, 1, ..., 1) to broadcast against v."""
    return v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))


def measurement_grad(denoiser, x, sigma: float, y, A):
    """x0_hat(x), the loss ||A(x0_hat) - y|| per sample, and its gradient w.r.t. x.

    The loss is the un-squared norm, as in the official code (torch.linalg.norm, pipe.py:3890);
    the gradient flows through the denoiser (and, for latents, the VAE decoder inside A).
    Summing the per-sample losses keeps the samples independent: each gradient is its own.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        x0_hat = denoiser(x, sigma)
        loss = (A(x0_hat) - y).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return x0_hat.detach(), loss.detach(), grad


@torch.no_grad()
def ddpm(denoiser, x, y, A, sigmas, *, eta=1.0, generator=None, callback=None):
    """Unguided ancestral sampling: DDPM (Ho et al., NeurIPS 2020, arXiv 2006.11239, Alg. 2) for
    eta = 1, DDIM (Song et al., ICLR 2021, arXiv 2010.02502) for eta < 1. y and A are unused:
    the callback gets loss None, as measuring it would cost a decoder pass per step on SD."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0_hat = denoiser(x, s[i])
        x, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=None))
    return x


@torch.no_grad()
def dps(denoiser, x, y, A, sigmas, *, zeta=4.8, eta=1.0, generator=None, callback=None):
    """DPS: Chung et al., ICLR 2023, arXiv 2209.14687, Algorithm 1; Eq. 3 of Xu et al.

    The official order (pipe.py:4100-4140): the ancestral step from x_t first, then a step of
    size zeta against the gradient of ||A(x0_hat(x_t)) - y|| w.r.t. x_t.
    zeta: 4.8 for SR x8, 0.6 for Gaussian blur (official Record.md; docs/official_code.md §5).
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    for i in range(len(s) - 1):
        x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
        x_next, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        x = torch.add(x_next, grad, alpha=-zetas[i])  # Eq. 3: x_next - zeta grad
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def dsg(denoiser, x, y, A, sigmas, *, zeta=0.08, eta=1.0, generator=None, callback=None):
    """DSG: Yang et al., ICML 2024, arXiv 2402.03201, Algorithm 1; Eq. 40-41 of Xu et al.

    The ancestral noise sigma_up * eps lies, in high dimension n, on the sphere of radius
    r = sqrt(n) sigma_up around the mean mu. DSG mixes that direction with the steepest-descent
    direction d* = -r g / ||g|| at guidance rate zeta and puts the result back on the sphere
    (official pipe.py:5516-5521, the norms with + 1e-8). zeta: 0.08 (official Record.md).
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    root_n = math.sqrt(x[0].numel())
    for i in range(len(s) - 1):
        x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
        x_next, mu, sigma_up = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        r = root_n * sigma_up
        d_star = grad * (-r / (sample_norm(grad) + 1e-8))  # Eq. 40: -r g / ||g||
        d_mix = torch.lerp(x_next - mu, d_star, zetas[i])  # Eq. 41: d + zeta (d* - d), d = x - mu
        x = torch.addcmul(mu, d_mix, r / (sample_norm(d_mix) + 1e-8))  # back onto the sphere
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def dmap(denoiser, x, y, A, sigmas, *, zeta=4.8, K=3, eta=1.0, generator=None, callback=None):
    """DMAP: Xu et al., ICLR 2025, arXiv 2501.18913, Algorithm 2 (Algorithm 4 with CSE).

    Each step maximises p(y | x_{t-1}) over the high-probability shell of p(x_{t-1} | x_t): start
    at the ancestral sample, then K times take a gradient step on ||A(x0_hat(x_{t-1})) - y|| w.r.t.
    x_{t-1} (a fresh denoiser call at the NEXT sigma) and project back onto the sphere of radius
    sqrt(n) sigma_up around the ancestral mean mu (official run_dsg_max, pipe.py:5764-5779).
    The last step has sigma_up = 0 and returns mu, as the official code does. Each step's first
    (gradient-free) denoiser call is made at the end of the step before, on the point it returns,
    so the callback's loss is measured there (a decoder pass, only when there is a callback).
    Paper settings: "DMAP (full)" K=3 at 500 steps; "DMAP (same)" K=2 at 250 steps, zeta doubled.
    """
    if K < 1:
        raise ValueError(f"DMAP needs K >= 1 inner steps, got {K}")
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    root_n = math.sqrt(x[0].numel())
    x0_hat = denoiser(x, s[0])
    for i in range(len(s) - 1):
        x_next, mu, sigma_up = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        for _ in range(K if sigma_up > 0 else 0):  # radius 0: the sphere is the point mu
            _, _, grad = measurement_grad(denoiser, x_next, s[i + 1], y, A)  # inner x0_hat unused
            d = torch.add(x_next, grad, alpha=-zetas[i]) - mu  # x* - mu, x* = x_{t-1} - zeta g
            x_next = torch.addcmul(mu, d, root_n * sigma_up / sample_norm(d))  # onto the sphere
        # x0_hat(x_{t-1}), the next step's start; at sigma = 0 Tweedie's denoiser is the identity
        x0_next = denoiser(x_next, s[i + 1]) if s[i + 1] > 0 else x_next
        if callback is not None:
            loss = (A(x0_next) - y).flatten(1).norm(dim=1)  # at the returned point
            callback(dict(i=i, sigma=s[i], x=x_next, x0_hat=x0_hat, loss=loss))
        x, x0_hat = x_next, x0_next
    return x


@torch.no_grad()
def freedom(denoiser, x, y, A, sigmas, *, zeta=4.8, repeats=2, window=(0.2, 0.5), eta=1.0,
            generator=None, callback=None):
    """FreeDOM: Yu et al., ICCV 2023, arXiv 2303.09833, Algorithm 1; Eq. 36 of Xu et al.

    DPS steps, with "time travel" inside `window` (loop fractions, both ends included, loop_step):
    after a guided step to sigma_next, re-noise back to sigma (x += sqrt(sigma^2 - sigma_next^2)
    eps) and redo the step, `repeats` times in all. Official public code (ddps main.py:44-46):
    K=2 for loop steps 100..250 of 500. The dev code's VP re-noising on VE latents is a bug we
    skip (docs/official_code.md §4.4).
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    n = len(s) - 1
    first, last = loop_step(window[0], n), loop_step(window[1], n)
    for i in range(n):
        for r in range(repeats if first <= i <= last else 1):
            if r > 0:  # time travel: x_t = x_{t-1} + sqrt(sigma_t^2 - sigma_{t-1}^2) eps
                x = x + math.sqrt(s[i] ** 2 - s[i + 1] ** 2) * noise_like(x, generator)
            x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
            x_next, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
            x = torch.add(x_next, grad, alpha=-zetas[i])
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def resample(denoiser, x, y, A, sigmas, *, zeta=4.8, at=(0.1, 0.2), gamma=40.0, iters=200,
             lr=5e-3, tol=1e-6, eta=1.0, generator=None, callback=None):
    """ReSample: Song et al., ICLR 2024, arXiv 2307.08123, Algorithm 1; Eq. 37-39 of Xu et al.

    DPS steps; at the loop fractions `at` (loop_step; official: steps 50 and 100 of 500) hard
    data consistency: (i) optimise x0* = argmin_z ||y - A(z)||^2 from x0_hat (official rsp_lo:
    AdamW, lr 5e-3, 200 iterations, stop once every sample's mean squared error is below tol =
    1e-6); (ii) stochastic resampling: draw x_{t-1} from the product of N(x0*, sigma_{t-1}^2)
    (forward diffusion of x0*) and N(x'_{t-1}, tau^2) (the unconditional sample), tau^2 = gamma
    (1-a')/(1-a) (1-a/a') / a', a = abar_t, a' = abar_{t-1}.
    Departure from the official code: it reads abar at the loop counter and applies the VP
    formula to VE latents (docs/official_code.md §4.5); we use the step's sigmas, in VE form.
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    n = len(s) - 1
    stops = {loop_step(f, n) for f in at}
    for i in range(n):
        x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
        x_next, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        x = torch.add(x_next, grad, alpha=-zetas[i])
        if i in stops and s[i + 1] > 0:
            z = x0_hat.clone().requires_grad_(True)
            opt = torch.optim.AdamW([z], lr=lr, fused=True)  # one pass per iteration
            with torch.enable_grad():
                for _ in range(iters):
                    mse = (A(z) - y).pow(2).flatten(1).mean(dim=1)  # per sample
                    if bool((mse < tol).all()):
                        break
                    opt.zero_grad()
                    mse.sum().backward()
                    opt.step()
            abar, abar_next = abar_of_sigma(s[i]), abar_of_sigma(s[i + 1])
            v = gamma * (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)  # official, VP
            tau2, s2 = v / abar_next, s[i + 1] ** 2  # the VP variance in VE coordinates
            mean = (tau2 * z.detach() + s2 * x) / (tau2 + s2)  # Eq. 39
            x = mean + math.sqrt(tau2 * s2 / (tau2 + s2)) * noise_like(x, generator)
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def psld(denoiser, x, y, A, sigmas, *, H, adjoint, decode, encode, zeta=4.8, gamma=0.002,
         eta=1.0, generator=None, callback=None):
    """PSLD: Rout et al., NeurIPS 2023, arXiv 2307.00619, Algorithm 2; Eq. 35 of Xu et al.

    DPS on latents plus the "gluing" term gamma ||E(H^T y + (I - H^T H) D(x0_hat)) - x0_hat||,
    which asks x0_hat to be a fixed point of decode -> project onto {H x = y} -> encode. Besides
    A = H o decode it needs its factors: the pixel operator H, its true adjoint H^T (`adjoint`),
    `decode` D and `encode` E (in pixel space, as in toy_gmm.py, H = A and D = E = identity).
    A(x0_hat) is computed as H(D(x0_hat)), which it equals, so one decoder pass serves the loss
    and the gluing term. The official code used nearest upsampling as H^T for SR and the
    identity for blur (docs/official_code.md §4.6); we use the true adjoint. gamma: 0.002
    (official dev code).
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    for i in range(len(s) - 1):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = denoiser(xg, s[i])
            image = decode(x0_hat)
            Hx = H(image)  # = A(x0_hat)
            loss = (Hx - y).flatten(1).norm(dim=1)
            glued = encode(adjoint(y) + image - adjoint(Hx))
            total = loss + gamma * (glued - x0_hat).flatten(1).norm(dim=1)  # Eq. 35
            (grad,) = torch.autograd.grad(total.sum(), xg)
        x_next, _, _ = ancestral_step(x, x0_hat.detach(), s[i], s[i + 1], eta, generator)
        x = torch.add(x_next, grad, alpha=-zetas[i])
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat.detach(), loss=loss.detach()))
    return x


SAMPLERS = {"ddpm": ddpm, "dps": dps, "dsg": dsg, "dmap": dmap, "freedom": freedom,
            "resample": resample, "psld": psld}


def model_parts(method: str, **parts) -> dict:
    """The keyword-only parts a sampler takes beyond A (PSLD: H, adjoint, decode, encode),
    picked by name from `parts`, so that every caller treats every method alike."""
    wanted = inspect.signature(SAMPLERS[method]).parameters
    return {name: part for name, part in parts.items() if name in wanted}


def implied_score(name, denoiser, x, y, A, sigma: float, sigma_next: float, *, repeats=1,
                  seed=0, parts=None, **hyper):
    """The score that one step of sampler `name` from sigma to sigma_next implies at x (eta = 1),
    the quantity of Observation I (Xu et al. Sec. 3.1, Prop. 1, Eq. 9).

    Derivation for dps: x_next = mu + sigma_up eps - zeta g, mu = x + (x - x0_hat)/sigma
    (sigma_down - sigma). Writing this as an unguided step, x_next = x + (x - x0_hat')/sigma
    (sigma_down - sigma) + sigma_up eps, defines x0_hat' = x0_hat - zeta g sigma/(sigma -
    sigma_down), and by Tweedie s' = (x0_hat' - x)/sigma^2 = s - zeta g/(sigma (sigma -
    sigma_down)); with eta = 1, sigma_down = sigma_next^2/sigma, so sigma (sigma - sigma_down) =
    sigma^2 - sigma_next^2. For any sampler we use the same identity with the mean shift
    E[x_next - x_next(ddpm)] over `repeats` noise draws eps shared by both: exact for dps (the
    shift does not depend on eps); for dsg and dmap, which redraw the noise direction, it is
    the drift of the step, the part of it a score can describe. s = (x0_hat - x) / sigma^2 is
    the denoiser's own (Tweedie, Eq. 4). Returns the score (N, n) and the Monte Carlo variance
    of its estimate, (N,), zero for repeats = 1 (to debias squared errors); parts: PSLD's.
    """
    sigmas = torch.tensor([sigma, sigma_next], dtype=torch.float64)
    xs = x.repeat_interleave(repeats, 0)
    step = {}
    for method in (name, "ddpm"):
        generator = torch.Generator(x.device).manual_seed(seed)
        step[method] = SAMPLERS[method](denoiser, xs, y, A, sigmas, generator=generator,
                                        **model_parts(method, **(parts or {})),
                                        **(hyper if method == name else {}))
    shift = (step[name] - step["ddpm"]).view(len(x), repeats, -1) / (sigma**2 - sigma_next**2)
    mc_var = shift.var(1).sum(1) / repeats if repeats > 1 else x.new_zeros(len(x))
    with torch.no_grad():
        own = score(x, denoiser(x, sigma), sigma)
    return own + shift.mean(1), mc_var


# ---------------------------------------------------------------------------------------------
# (4) Stable Diffusion 2.0 (and 1.x): its schedule in sigma space, its denoiser, loading the
#     weights
# ---------------------------------------------------------------------------------------------


def sd_abar(beta_start=0.00085, beta_end=0.012, n=1000) -> torch.Tensor:
    """alpha_bar_t of SD 2.0 ("scaled_linear": betas = linspace(sqrt(b0), sqrt(b1))^2, float32 as
    diffusers computes them; LDM uses float64, |d abar| <= 5e-7)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def sd_sigmas(steps: int, abar: torch.Tensor) -> torch.Tensor:
    """The official schedule, bit for bit diffusers' EulerAncestralDiscreteScheduler
    .set_timesteps with "linspace" spacing (docs/official_code.md §2.2): fractional timesteps
    linspace(999, 0, steps) (float64, rounded to float32), sigma_t = sqrt((1 - abar) / abar)
    (float32) interpolated linearly in t (np.interp, float64), a final 0, rounded to float32.
    500 steps: sigma_max 14.6146."""
    t = np.linspace(0, len(abar) - 1, steps, dtype=np.float32)[::-1]
    table = sigma_of_abar(abar).numpy()
    sigmas = np.interp(t, np.arange(len(abar)), table)
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def sigma_to_t(sigma: float, table: np.ndarray) -> float:
    """The fractional timestep whose sigma this is: the inverse of sd_sigmas' interpolation,
    np.interp of the same table with the axes swapped (table = sqrt((1 - abar) / abar),
    increasing in t; sigmas outside it clamp to t = 0 or the last t)."""
    return float(np.interp(sigma, table, np.arange(len(table))))


class SDDenoiser:
    """denoiser(x, sigma) -> x0_hat = E[x0 | x] for SD 2.0 latents.

    The UNet sees x / sqrt(sigma^2 + 1) (diffusers' scale_model_input) at the fractional timestep
    of sigma, with the text context `context` (1, 77, 1024) shared by the whole batch.
    Mixed precision: the UNet runs in the dtype of its context (--dtype); x, sigma and x0_hat stay
    in x's dtype (float32), so the guidance arithmetic never rounds to bfloat16.
    """

    def __init__(self, unet, context: torch.Tensor, abar: torch.Tensor, prediction: str = "eps"):
        assert prediction in ("eps", "v"), prediction
        self.unet, self.context, self.prediction = unet, context, prediction
        self.table = sigma_of_abar(abar).double().numpy()

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        t = torch.full((x.shape[0],), sigma_to_t(sigma, self.table), device=x.device)
        x_in = (x / math.sqrt(sigma**2 + 1)).to(self.context.dtype)
        out = self.unet(x_in, t, self.context.expand(x.shape[0], -1, -1)).to(x.dtype)
        if self.prediction == "eps":
            return tweedie(x, sigma, out)
        # v-prediction (768-v model): x0 = sqrt(abar) x_vp - sqrt(1 - abar) v, in sigma space
        return x / (sigma**2 + 1) - out * sigma / math.sqrt(sigma**2 + 1)


class CSEDenoiser(SDDenoiser):
    """denoiser(x, sigma) -> x0_hat = E[x0 | x, y] with the CSE (Xu et al., §4; Tweedie, Eq. 4).

    SDDenoiser (scaling, fractional timestep, eps / v) whose network, `self.unet`, is the
    controlnet.ControlledUNet (`.unet`, `.controlnet`, `.hint` inside); scale:
    conditioning_scale (1.0 in the official runs, docs/official_code.md §4.7). Gradients flow
    through the ControlNet and the UNet, as in DPS+CSE (pipe.py:1732-1737).
    """

    def __init__(self, unet, controlnet_net, context: torch.Tensor, abar: torch.Tensor,
                 hint: torch.Tensor, prediction: str = "eps", scale: float = 1.0):
        super().__init__(controlnet.ControlledUNet(unet, controlnet_net, hint, scale), context,
                         abar, prediction)


HUB_REPO = "stabilityai/stable-diffusion-2-base"
FETCH = (f"pip install huggingface_hub && hf download {HUB_REPO} --include 'unet/*' 'vae/*' "
         "'text_encoder/*' 'tokenizer/*' 'scheduler/*' --exclude '*.bin' '*.fp16.*' "
         "--local-dir {path}")


class Pipeline(NamedTuple):
    """The parts of Stable Diffusion 2.0 (or 1.x) the samplers need; or of a pixel-space model of
    the same UNet (mini.py's), which has no VAE and no text encoder: its latents are the images."""

    unet: nn.Module
    vae: nn.Module | None  # None: pixel space
    text_encoder: nn.Module | None  # None: pixel space (the empty context, encode_prompt)
    tokenizer: "clip.Tokenizer | None"  # None: a single file without a tokenizer/ folder beside
    abar: torch.Tensor  # the DDPM table alpha_bar_t, t = 0..999
    prediction: str  # "eps" (512-base, SD 1.x) or "v" (768-v)
    path: str = ""  # where it was loaded from (its defaults.json, if any, is read from there)
    # "sd1" or "sd2": which Stable Diffusion (a pixel model's UNet has SD 2's layout, "sd2");
    # it decides the empty prompt's padding where no tokenizer/ folder says it (encode_prompt)
    family: str = "sd2"

    def latent(self, size: int) -> tuple[int, int, int]:
        """The shape of the latent of one size x size image: (4, size / 8, size / 8) for SD 2.0
        (the VAE halves the side 3 times), (3, size, size) in pixel space."""
        side = size if self.vae is None else size // 2 ** (len(self.vae.cfg.block_out_channels) - 1)
        return self.unet.cfg.in_channels, side, side

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image in about [-1, 1] (the VAE sees z / 0.18215), in z's dtype; the VAE
        runs in its own (mixed precision, as SDDenoiser). In pixel space: z itself."""
        if self.vae is None:
            return z
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((z / vae.SCALING_FACTOR).to(dtype)).to(z.dtype)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> latent: the posterior mean, scaled (official PSLD samples from it). In pixel
        space: the image itself."""
        if self.vae is None:
            return image
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(image.to(dtype))[0].to(image.dtype) * vae.SCALING_FACTOR


def is_pixel_model(path: str) -> bool:
    """A pixel-space model folder: unet/ with 3 input channels and scheduler/, no vae/ (what
    `cse.py train --train unet` writes for mini.py's prior)."""
    unet_dir = os.path.join(path, "unet")
    return not os.path.exists(os.path.join(path, "vae")) and \
        os.path.isfile(os.path.join(unet_dir, "config.json")) and \
        read_config(unet_dir, "config.json").get("in_channels") == 3


def family_of(unet_net: nn.Module) -> str:
    """"sd1" or "sd2", from the UNet's config: SD 1.x projects into its transformers with 1x1
    convs, SD 2.x with Linear layers (use_linear_projection; docs/sd2_formats.md §8)."""
    return "sd2" if unet_net.cfg.linear_projection else "sd1"


def load_sd2(path: str, prediction: str | None = None, device=None, dtype=None) -> Pipeline:
    """Stable Diffusion 1.x or 2.x, told apart by the files, from a diffusers pipeline folder
    (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or a single-file LDM checkpoint
    (v1-5-pruned-emaonly.safetensors, 512-base-ema.safetensors; docs/sd2_formats.md §2.2, §8);
    or a pixel-space model folder (unet/ scheduler/, is_pixel_model).

    512-base (eps) and 768-v (v) have identical keys: a folder's scheduler config decides; for a
    single file the `prediction` flag does (default "eps", the model of the paper; SD 1.x has
    no v model).
    """
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' (512-base) or 'v' (768-v), got {prediction!r}")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder; check --model (to get SD 2.0, 5.2 GB: "
                         f"{FETCH.format(path=path)})")
    if os.path.isfile(path):
        text_family = clip.single_file_family(path)  # from the text encoder's keys
        if text_family == "sd1" and prediction == "v":
            raise ValueError(f"{path} is an SD 1.x checkpoint; SD 1.x has no v-prediction model: "
                             "drop --prediction v")
        unet_net = unet.unet_from_single_file(path, device=device, dtype=dtype)
        if family_of(unet_net) != text_family:
            raise ValueError(f"{path}: its UNet is {family_of(unet_net)}'s but its text encoder "
                             f"{text_family}'s; the file mixes two models: re-download it")
        tokenizer_dir = os.path.join(os.path.dirname(path), "tokenizer")
        return Pipeline(unet_net, vae.vae_from_single_file(path, device=device, dtype=dtype),
                        clip.text_encoder_from_single_file(path, device=device, dtype=dtype),
                        clip.Tokenizer.from_folder(tokenizer_dir) if os.path.isdir(tokenizer_dir)
                        else None, sd_abar(), prediction or "eps", path, text_family)
    pixel = is_pixel_model(path)
    parts = ("unet", "scheduler") if pixel else \
        ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [p for p in parts if not os.path.isdir(os.path.join(path, p))]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} folder(s); not a Stable Diffusion "
                         f"pipeline folder; fetch SD 2.0 with: {FETCH.format(path=path)}")
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        with open(config_path) as f:
            scheduler = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: unreadable ({e}); re-download scheduler/") from None
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"{config_path}: beta_schedule {scheduler['beta_schedule']!r} is not "
                         "Stable Diffusion's scaled_linear; this is not an SD 1.x / 2.x model")
    folder_prediction = {"epsilon": "eps", "v_prediction": "v"}.get(
        scheduler.get("prediction_type", "epsilon"))
    if folder_prediction is None or prediction not in (None, folder_prediction):
        raise ValueError(f"{config_path} says prediction_type "
                         f"{scheduler.get('prediction_type')!r}; drop --prediction {prediction}")
    abar = sd_abar(scheduler.get("beta_start", 0.00085), scheduler.get("beta_end", 0.012),
                   scheduler.get("num_train_timesteps", 1000))
    unet_net = unet.load_unet(os.path.join(path, "unet"), device, dtype)
    if pixel:
        return Pipeline(unet_net, None, None, None, abar, folder_prediction, path,
                        family_of(unet_net))
    return Pipeline(unet_net, vae.load_vae(os.path.join(path, "vae"), device, dtype),
                    clip.load_text_encoder(os.path.join(path, "text_encoder"), device, dtype),
                    clip.Tokenizer.from_folder(os.path.join(path, "tokenizer")), abar,
                    folder_prediction, path, family_of(unet_net))


CHECKPOINTING = ("none", "vae", "all")


def set_checkpointing(unet_net: nn.Module, vae_net: nn.Module, which: str) -> None:
    """Activation checkpointing for guided steps: `none`; `vae`, the decoder's layers are
    recomputed in the backward pass instead of stored (most of a DPS step's memory at 512 px);
    `all`, the UNet's blocks too. Costs about one more forward of what it covers."""
    if vae_net is not None:  # None: pixel space
        vae_net.decoder.gradient_checkpointing = which in ("vae", "all")
    unet_net.gradient_checkpointing = which == "all"


def compile_networks(sd: "Pipeline", *controlnets: nn.Module) -> None:
    """Opt-in `--compile`: the networks a step calls (sd's UNet and VAE decoder, a CSE's
    ControlNets) compiled in place by torch.compile (nn.Module.compile: same modules, same
    weights). The first calls with and without a gradient compile (minutes on a CPU); after
    that a step is faster or not as README, Speed, measured; the outputs differ at rounding
    level. ValueError (one line) where it cannot work: no C++ compiler for
    the CPU, no triton for the GPU, another device, or with activation checkpointing."""
    nets = [sd.unet, *controlnets, *([] if sd.vae is None else [sd.vae.decoder])]
    device = next(sd.unet.parameters()).device
    if any(getattr(net, "gradient_checkpointing", False) for net in nets):
        raise ValueError("--compile and --checkpointing cannot be combined: pick one")
    if device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        raise ValueError("--compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, "
                         "or $CXX): install one, or run without --compile")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError("--compile on a GPU needs triton (pip install triton; Linux CUDA "
                         "builds of torch bring it): install it, or run without --compile")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--compile runs on cpu or cuda, not {device.type}")
    for net in nets:
        net.compile()


def encode_prompt(sd: Pipeline, prompt: str) -> torch.Tensor:
    """The (1, 77, 1024) text context ((1, 77, 768) for SD 1.x). The paper conditions on the empty
    prompt (no CFG), whose ids need no vocabulary: [bos, eos, pad x 75], pad 0 for SD 2 and eos
    for SD 1.x (docs/sd2_formats.md §1.5, §8). A pixel-space model has no text encoder: its
    fixed empty context is one token of zeros (its cross-attention then adds a learnt
    constant)."""
    if sd.text_encoder is None:
        if prompt != "":
            raise ValueError("a pixel-space model has no text encoder; it takes no --prompt")
        weight = sd.unet.conv_in.weight
        return weight.new_zeros(1, 1, sd.unet.cfg.cross_attention_dim)
    if sd.tokenizer is not None:
        ids = sd.tokenizer([prompt])
    elif prompt == "":
        ids = torch.tensor([[49406, 49407] + [clip.PAD_ID[sd.family]] * 75])
    else:
        raise ValueError("a non-empty prompt needs the model's tokenizer/ folder (vocab.json, "
                         "merges.txt) next to the single-file checkpoint")
    device = next(sd.text_encoder.parameters()).device
    with torch.no_grad():
        return sd.text_encoder(ids.to(device))


# ---------------------------------------------------------------------------------------------
# (5) Restoring an image: the defaults (one table, read by sampler_settings), the operator,
#     the sampler on the model's latents, the record
# ---------------------------------------------------------------------------------------------

# zeta per method for (SR x8, every other operator): official Record.md and ddps README
# (docs/official_code.md §5), logged for SR x8 and Gaussian blur. The other operators have no
# logged value; they use the Gaussian-blur column (our choice).
ZETA = {"dps": (4.8, 0.6), "dsg": (0.08, 0.08), "dmap": (4.8, 0.6), "freedom": (4.8, 0.6),
        "resample": (4.8, 0.6), "psld": (4.8, 0.6)}
# The paper's two DMAP budgets (Table 4): "full" = K 3 at 500 steps, "same" = the NFE of DPS at
# 500 steps: K 2 at 250 steps with zeta doubled.
DMAP_SETTINGS = {"full": dict(steps=500, K=3, zeta_scale=1.0),
                 "same": dict(steps=250, K=2, zeta_scale=2.0)}
# The paper's method names (Table 4) -> (sampler, DMAP budget), for eval.py, speed.py and mini.py;
# "NAME+cse" puts the CSE in the denoiser (Algorithms 3-4), "cse" alone is the unguided sampler
# on the CSE.
METHODS = {"ddpm": ("ddpm", None), "dps": ("dps", None), "dsg": ("dsg", None),
           "dmap": ("dmap", "full"), "dmap-same": ("dmap", "same"),
           "freedom": ("freedom", None), "resample": ("resample", None),
           "psld": ("psld", None), "cse": ("ddpm", None)}
# Method knobs the command exposes; each flag is named as the sampler keyword it sets.
KNOBS = ("K", "gamma", "repeats", "window", "at", "iters", "lr")
# The operators --op names: the built-in ones, or a user's class (operators.py, section (6))
OP_HELP = f"{', '.join(operators.OPERATORS)}, or FILE.py:CLASS, your own (operators.py)"
# Operator flags and the operators they apply to (the operator's keyword, the default).
OPERATOR_FLAGS = {"sr_factor": ("sr", "factor", 8), "blur_std": ("blur", "std", 3.0),
                  "kernel_weights": ("nonlinear_blur", "weights", "weights/GOPRO_wVAE.safetensors")}
# A model folder may carry its own restoration defaults in `defaults.json` (the prior that ships
# in models/, trained and tuned by mini.py at 32 px): {"size": 32, "steps": 25, "operators":
# {op: {keyword: value}}, "zeta": {op: {method: zeta}}}; flags the user gives still win.
MODEL_DEFAULTS = "defaults.json"
DEFAULT_MODEL = cli.DEFAULT_MODEL  # $SD2_MODEL, else ./weights/stable-diffusion-2-base
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def model_defaults(model: str) -> dict:
    """The model folder's defaults.json, or {} (SD 2.0: the paper's defaults above)."""
    path = os.path.join(model, MODEL_DEFAULTS)
    return read_config(model, MODEL_DEFAULTS) if os.path.isfile(path) else {}


def usable_device(name: str) -> torch.device:
    """torch.device(name), checked by allocating on it: a ValueError that says what to do."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # CPU-only torch asserts on "cuda"
        raise ValueError(f"--device {name} is not usable here ({str(e).splitlines()[0]}); "
                         "try --device cpu") from None
    return device


def read_image(path: str, size: int, crop: bool = True) -> torch.Tensor:
    """Any image PIL reads (grayscale, RGBA, 16-bit, at least size x size) -> (1, 3, size, size)
    in [-1, 1]: centre-cropped to a square (unless crop is False), downsized with Lanczos."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{path}: the image is empty")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale
        a = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.uint8(np.clip(a / (65535 if a.max() > 255 else 255), 0, 1)
                                         * 255 + 0.5))
    image = image.convert("RGB")
    if min(image.size) < size:
        raise ValueError(f"{path} is {image.width}x{image.height}, smaller than the {size}x{size} "
                         "the operator needs; pass a smaller --size or a larger image")
    if crop and image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return x / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def check_op(op: str) -> None:
    """ValueError for an operator name that is neither built in nor FILE.py:CLASS."""
    if op not in operators.OPERATORS and operators.plugin_spec(op) is None:
        raise ValueError(f"unknown --op {op}; choose from {OP_HELP}")


def sampler_settings(method: str, op: str, *, model: str | None = None, steps: int | None = None,
                     zeta: float | None = None, dmap_setting: str | None = None, eta: float = 1.0,
                     **knobs) -> tuple[int, dict, str | None]:
    """The one place the defaults are read: (steps, the sampler's keyword arguments, where zeta
    came from) for `method` on operator `op`. Given values win; then the model folder's
    defaults.json (`model`); then the paper's: ZETA, DMAP_SETTINGS and 500 steps. knobs: the
    method's own (KNOBS; None = its default). ValueError on nonsense and on a setting the method
    does not take (named as the command's flag, which is the keyword with dashes)."""
    check_op(op)
    fn = SAMPLERS[method]
    params = inspect.signature(fn).parameters
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; the knobs are {KNOBS}")
    for name, value in dict(knobs, zeta=zeta).items():
        if value is not None and name not in params:
            raise ValueError(f"--{name} does not apply to --method {method}")
    if dmap_setting is not None and fn is not dmap:
        raise ValueError(f"--dmap-setting does not apply to --method {method}")
    budget = DMAP_SETTINGS[dmap_setting or "full"]
    defaults = model_defaults(model) if model and os.path.isdir(model) else {}
    full = defaults.get("steps", 500)  # DMAP (same): the same fraction of the model's steps
    if steps is None:
        steps = max(1, full * budget["steps"] // 500) if fn is dmap else full
    kwargs, zeta_from = {"eta": eta}, None
    if "zeta" in params and zeta is not None:
        kwargs["zeta"], zeta_from = zeta, "--zeta"
    elif "zeta" in params and defaults:
        name = "dmap-same" if fn is dmap and dmap_setting == "same" else method
        table = defaults.get("zeta", {}).get(op, {})
        if name not in table:
            raise ValueError(f"{model}/{MODEL_DEFAULTS} has no zeta for {name} on {op} (it has "
                             f"{', '.join(defaults.get('zeta', {})) or 'none'}); pass --zeta")
        kwargs["zeta"] = table[name]
        zeta_from = os.path.join(os.path.abspath(model), MODEL_DEFAULTS)
    elif "zeta" in params:
        value = ZETA[method][0 if op == "sr" else 1]
        kwargs["zeta"] = value * budget["zeta_scale"] if fn is dmap else value
        zeta_from = "dmap.ZETA (the official log)"
    if fn is dmap:
        kwargs["K"] = budget["K"]
    for name in KNOBS:
        value = knobs.get(name)
        if value is not None:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    fractions = kwargs.get("window", ()) + kwargs.get("at", ())
    checks = [(steps >= 1, f"--steps must be >= 1, got {steps}"),
              (kwargs.get("zeta", 0) >= 0, f"--zeta must be >= 0, got {kwargs.get('zeta')}"),
              (0 <= eta <= 1, f"--eta must be in [0, 1], got {eta}"),
              (kwargs.get("K", 1) >= 1, f"--K must be >= 1, got {kwargs.get('K')}"),
              (all(v >= 0 for k, v in kwargs.items() if k in ("gamma", "iters", "lr")),
               "--gamma, --iters and --lr must be >= 0"),
              (kwargs.get("repeats", 1) >= 1, f"--repeats must be >= 1, got "
               f"{kwargs.get('repeats')}"),
              (all(0 <= f <= 1 for f in fractions), "--window and --at are loop fractions in "
               f"[0, 1], got {list(fractions)}")]
    cli.check(checks)
    return steps, kwargs, zeta_from


def make_operator(op: str, size: int, *, seed: int = 0, model: str | None = None,
                  **flags) -> tuple[operators.Operator, dict]:
    """Operator `op` for size x size images with the settings that apply to it (OPERATOR_FLAGS:
    sr_factor, blur_std, kernel_weights; None = the model folder's default, else the paper's),
    the seed of a random one; -> (operator, its arguments for the record). op: a name of
    operators.OPERATORS, or FILE.py:CLASS, your own operator (operators.py's docstring)."""
    unknown = set(flags) - set(OPERATOR_FLAGS)
    if unknown:
        raise TypeError(f"unknown operator settings {sorted(unknown)}; they are "
                        f"{tuple(OPERATOR_FLAGS)}")
    for name, (applies, _, _) in OPERATOR_FLAGS.items():
        if flags.get(name) is not None and op != applies:
            raise ValueError(f"--{name.replace('_', '-')} applies to --op {applies} only")
    if op not in operators.OPERATORS:
        check_op(op)
        return operators.load_plugin(op, size, seed)
    cls = operators.OPERATORS[op]
    op_args = {"size": size}
    defaults = model_defaults(model) if model and os.path.isdir(model) else {}
    for name, (applies, keyword, default) in OPERATOR_FLAGS.items():
        if op == applies:
            default = defaults.get("operators", {}).get(op, {}).get(keyword, default)
            op_args[keyword] = default if flags.get(name) is None else flags[name]
    if "seed" in inspect.signature(cls).parameters:
        op_args["seed"] = seed
    operator = cls(**op_args)
    if "weights" in op_args:
        op_args["weights"] = os.path.abspath(op_args["weights"])
    return operator, op_args


def default_size(model) -> int:
    """The image size a model restores by default: its defaults.json's, else SD 2.0's 512."""
    return model_defaults(model).get("size", 512) if isinstance(model, str) and \
        os.path.isdir(model) else 512


def posterior_sample(sd: Pipeline, denoiser, op, y, *, method: str, size: int, steps: int,
                     sampler_kwargs: dict, generator: torch.Generator) -> torch.Tensor:
    """Sampler `method` on the latents of size x size images, from seeded noise, with a progress
    bar; -> z0, one latent per measurement in the batch y (the samplers treat batch elements
    independently). A(z) = op(decode(z)): the measurement operator on latents."""

    def A(z):
        return op(sd.decode(z))

    parts = model_parts(method, H=op, adjoint=getattr(op, "adjoint", None), decode=sd.decode,
                        encode=sd.encode)
    sigmas = sd_sigmas(steps, sd.abar)
    noise = noise_like(torch.empty((len(y), *sd.latent(size)), device=y.device, dtype=y.dtype),
                       generator)
    bar = tqdm(total=steps, desc=f"{method} {type(op).__name__}", unit="step", leave=None)

    def callback(d):
        if not torch.isfinite(d["x"]).all():
            raise FloatingPointError(f"NaN or inf at step {d['i']} (sigma {d['sigma']:.3g}); "
                                     "try a smaller --zeta")
        if d["loss"] is not None:
            bar.set_postfix(loss=f"{d['loss'].max().item():.4g}")
        bar.update(1)

    try:
        return SAMPLERS[method](denoiser, sigmas[0].item() * noise, y, A, sigmas,
                                generator=generator, callback=callback, **parts,
                                **sampler_kwargs)
    except FloatingPointError as e:
        raise ValueError(str(e)) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"at step {bar.n + 1} of {steps}; nothing written") from None
    finally:
        bar.close()


def restore(image: str, *, model: "str | Pipeline" = DEFAULT_MODEL, method: str = "dmap",
            op: str = "sr", size: int | None = None, steps: int | None = None,
            zeta: float | None = None, dmap_setting: str | None = None, eta: float = 1.0,
            sigma_y: float = 0.0, cse: str | None = None, prompt: str = "", seed: int = 0,
            observed: bool = False, crop: bool = True, prediction: str | None = None,
            device: str = DEVICE, dtype: str = "float32", checkpointing: str = "none",
            compile: bool = False, **settings) -> dict:
    """Restore one image: read it (centre crop, `size` px), synthesise y = A(x) + sigma_y noise
    (or, observed, read y itself), sample the posterior with `method`, decode. `model`: a folder
    or file for load_sd2, or a Pipeline already loaded (then `device`, `dtype`, `prediction`
    and `checkpointing` are the caller's business); compile: compile_networks on its networks
    and the CSE's, in place (a Pipeline passed in stays compiled). settings: the method's knobs
    (KNOBS) and the operator's (OPERATOR_FLAGS), None = defaults (sampler_settings,
    make_operator).
    -> {"restored", "measurement", "reference" (None when observed): (H, W, 3) uint8 images;
    "record": every setting used, PSNR, seconds}."""
    start = time.perf_counter()
    path = model.path if isinstance(model, Pipeline) else model
    size = default_size(path) if size is None else size
    knobs = {k: settings.pop(k) for k in KNOBS if k in settings}
    steps, kwargs, zeta_from = sampler_settings(method, op, model=path, steps=steps, zeta=zeta,
                                                dmap_setting=dmap_setting, eta=eta, **knobs)
    checks = [(not (observed and sigma_y), "--sigma-y synthesises noise; with --observed, y is "
               "read as it is"), (sigma_y >= 0, f"--sigma-y must be >= 0, got {sigma_y}"),
              (size >= 8 and size % 8 == 0, f"--size must be a multiple of 8, got {size}")]
    cli.check(checks)
    device = usable_device(device) if not isinstance(model, Pipeline) else \
        next(model.unet.parameters()).device
    operator, op_args = make_operator(op, size, seed=seed, model=path, **settings)
    if "adjoint" in inspect.signature(SAMPLERS[method]).parameters and \
            not hasattr(operator, "adjoint"):
        raise ValueError(f"{method} needs a linear operator with an adjoint; {op} has none")
    operator = operator.to(device)  # images, measurements and latents in float32
    generator = torch.Generator(device).manual_seed(seed)
    if observed:
        y_size = size // op_args["factor"] if op == "sr" else size
        x_ref, y = None, read_image(image, y_size, crop).to(device)
    else:
        x_ref = read_image(image, size, crop).to(device)
        y = operator.measure(x_ref, sigma_y, generator)
    if isinstance(model, Pipeline):
        sd = model
    else:
        sd = load_sd2(model, prediction, device, getattr(torch, dtype))
        set_checkpointing(sd.unet, sd.vae, checkpointing)
    context = encode_prompt(sd, prompt)
    net, info = controlnet.load_cse(cse, op, size, device, context.dtype) if cse else (None, {})
    if compile:
        compile_networks(sd, *[net] if cse else [])
    if cse:
        denoiser = CSEDenoiser(sd.unet, net, context, sd.abar, operator.hint(y), sd.prediction)
        cse_record = dict(path=os.path.abspath(cse), step=info.get("step"), images=info.get("n"))
    else:
        denoiser, cse_record = SDDenoiser(sd.unet, context, sd.abar, sd.prediction), None
    loaded = time.perf_counter()
    z0 = posterior_sample(sd, denoiser, operator, y, method=method, size=size, steps=steps,
                          sampler_kwargs=kwargs, generator=generator)
    with torch.no_grad():
        restored = to_uint8(sd.decode(z0))
    sampled = time.perf_counter()
    record = dict(image=os.path.abspath(image), observed=observed, method=method, op=op,
                  operator=op_args, sampler=dict(kwargs, steps=steps),
                  sigma_y=None if observed else sigma_y, seed=seed, crop=crop, prompt=prompt,
                  model=os.path.abspath(path), zeta_from=zeta_from, prediction=sd.prediction,
                  device=str(device), dtype=str(context.dtype).removeprefix("torch."),
                  checkpointing=checkpointing, compile=compile, cse=cse_record,
                  seconds=dict(load=round(loaded - start, 1), sample=round(sampled - loaded, 1),
                               total=round(time.perf_counter() - start, 1)))
    reference = None if x_ref is None else to_uint8(x_ref)
    if reference is not None:
        record["psnr"] = round(metrics.psnr(restored, reference), 3)
    hint = operator.hint(y)  # y as an image (a plugin's class scores: their colour map)
    shown = y if y.ndim == 4 and y.shape[1] == 3 else hint
    return dict(restored=restored, measurement=to_uint8(shown), hint=to_uint8(hint),
                reference=reference, record=record)


# ---------------------------------------------------------------------------------------------
# (6) The command line: python dmap.py IMAGE [flags]; each flag is restore's keyword
# ---------------------------------------------------------------------------------------------

# The settings that name the outputs when they differ from their defaults, in this order.
IN_NAME = ("size", "steps", "zeta", "dmap_setting", "eta", "K", "gamma", "repeats", "window",
           "at", "iters", "lr", "sigma_y", "sr_factor", "blur_std", "seed", "dtype")


def add_operator_flags(p: argparse.ArgumentParser) -> None:
    """The operator flags (OPERATOR_FLAGS), shared by dmap.py, cse.py train and eval.py."""
    p.add_argument("--sr-factor", type=int, help="SR downscaling factor (default: 8)")
    p.add_argument("--blur-std", type=float, help="Gaussian blur std in pixels (default: 3.0, "
                   "the paper's at 512 px)")
    p.add_argument("--kernel-weights", help="bkse KernelWizard weights for nonlinear_blur "
                   "(default: weights/GOPRO_wVAE.safetensors; README.md says how to convert)")


def command_line() -> argparse.ArgumentParser:
    def default(method, name):  # a sampler's own default, for the help text
        value = inspect.signature(SAMPLERS[method]).parameters[name].default
        return " ".join(map(str, value)) if isinstance(value, tuple) else value

    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("image", help="the reference image (or, with --observed, the measurement y)")
    p.add_argument("--method", default="dmap", choices=list(SAMPLERS),
                   help="posterior sampler (default: %(default)s)")
    p.add_argument("--op", default="sr", help=f"degradation operator A: {OP_HELP} (default: "
                   "%(default)s)")
    p.add_argument("--out", default="./results", help="output folder (default: %(default)s)")
    p.add_argument("--name", help="stem of the output files (default: image_method_op, then "
                   "every setting that differs from its default, e.g. astronaut_dps_sr_zeta2)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--observed", action="store_true",
                   help="the image is the measurement y (a real low-res or blurry photo)")
    p.add_argument("--no-crop", action="store_true", help="resize without centre-cropping")
    p.add_argument("--steps", type=int, help="sampling steps (default: 500; DMAP: "
                   "--dmap-setting's, 500 full or 250 same)")
    p.add_argument("--zeta", type=float, help="step size (DSG: guidance rate) (default: per "
                   "method and operator, the table in README.md, SD 2.0's, also for SD 1.x; "
                   "DMAP same: x2)")
    p.add_argument("--dmap-setting", choices=list(DMAP_SETTINGS),
                   help="DMAP budget: full = K 3 at 500 steps; same = K 2 at 250, zeta x2 "
                   "(default: full)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="ancestral noise, 1 DDPM, 0 DDIM (default: %(default)s)")
    p.add_argument("--K", type=int, help="DMAP inner gradient steps (default: --dmap-setting's)")
    p.add_argument("--gamma", type=float, help=f"PSLD gluing weight (default: "
                   f"{default('psld', 'gamma')}) / ReSample variance scale (default: "
                   f"{default('resample', 'gamma')})")
    p.add_argument("--repeats", type=int, help="FreeDOM time-travel repeats (default: "
                   f"{default('freedom', 'repeats')})")
    p.add_argument("--window", type=float, nargs=2, help="FreeDOM time-travel window, loop "
                   f"fractions (default: {default('freedom', 'window')})")
    p.add_argument("--at", type=float, nargs="+", help="ReSample optimisation steps, loop "
                   f"fractions (default: {default('resample', 'at')})")
    p.add_argument("--iters", type=int, help="ReSample optimisation iterations (default: "
                   f"{default('resample', 'iters')})")
    p.add_argument("--lr", type=float, help="ReSample optimisation learning rate (default: "
                   f"{default('resample', 'lr')})")
    p.add_argument("--sigma-y", type=float, default=0.0,
                   help="measurement noise std on [-1, 1] (default: %(default)s, as the paper)")
    add_operator_flags(p)
    p.add_argument("--cse", help="a trained CSE (`python cse.py train`'s checkpoint-N folder, "
                   "or a diffusers ControlNet folder or single file): the sampler's denoiser "
                   "becomes the UNet with its residuals; with --method ddpm, the CSE alone "
                   "(default: none)")
    p.add_argument("--prompt", default="", help="text prompt (default: none, as the paper)")
    cli.add_model_flags(p, size=None, device=DEVICE, size_help="restored image size in pixels, a "
                        f"multiple of 8 (default: 512, or the model's {MODEL_DEFAULTS})")
    p.add_argument("--checkpointing", default="none", choices=CHECKPOINTING,
                   help="recompute activations in the backward pass: the VAE decoder's (vae) "
                   "or also the UNet's (all); less memory, more time (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE "
                   "decoder: the first steps compile (minutes on a CPU), the others may run "
                   "faster (README, Speed); for long runs")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return command_line().parse_args(argv)


def output_paths(args, parser: argparse.ArgumentParser) -> dict:
    """The four outputs, named by --name or by the image, method, operator and every setting
    that differs from its default, so a sweep over one flag needs no new --out per run."""
    stem = args.name
    if stem is None:
        tags = []
        for key in IN_NAME:
            value = getattr(args, key)
            default = default_size(args.model) if key == "size" else parser.get_default(key)
            if value is None or value == default:
                continue
            if isinstance(value, str):
                tags.append(value)
            else:
                text = "-".join(f"{v:g}" for v in value) if isinstance(value, list) else \
                    f"{value:g}"
                tags.append(key.replace("_", "-") + text)
        image = os.path.splitext(os.path.basename(args.image))[0]
        stem = "_".join([image, args.method + ("+cse" if args.cse else ""),
                         operators.short_name(args.op)] + tags)
    return {k: os.path.join(args.out, stem + suffix) for k, suffix in
            (("restored", ".png"), ("measurement", "_y.png"), ("panel", "_panel.png"),
             ("record", ".json"))}


def check_outputs(paths: dict, force: bool) -> None:
    """Refuse to overwrite without --force, and check that the folder can be created and
    written, before anything slow runs; it is made only when the outputs are written."""
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite, or --name or --out")
    parent = os.path.abspath(os.path.dirname(paths["record"]))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))  # the one sure test of "can I create here"
    except OSError as e:
        raise ValueError(f"cannot create files under {parent} ({e.strerror}); choose another "
                         "--out") from None


def save(paths: dict, result: dict) -> None:
    """restore's result as four files: the restored image, the measurement, a labelled panel
    and the JSON record (which lists them), each written atomically (a crash or Ctrl-C never
    leaves half a file); when one cannot be written (a full disk), those already written are
    removed again, so a rerun finds none of them."""
    panel = {"measurement": result["hint"], "restored": result["restored"]}
    if result["reference"] is not None:
        panel["reference"] = result["reference"]
    record = dict(result["record"], outputs=[os.path.basename(p) for p in paths.values()])
    panel = plot.image_grid([list(panel.values())], [list(panel)])
    writers = {"restored": Image.fromarray(result["restored"]).save,
               "measurement": Image.fromarray(result["measurement"]).save,
               "panel": panel.save,
               "record": lambda tmp: cli.write_text(tmp, json.dumps(record, indent=2))}
    written, key = [], "restored"
    try:
        os.makedirs(os.path.dirname(paths["record"]) or ".", exist_ok=True)
        for key, write in writers.items():
            cli.write_atomic(paths[key], write)
            written.append(paths[key])
    except (OSError, KeyboardInterrupt) as e:
        for path in written:
            os.remove(path)
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt("while writing; nothing written") from None
        raise ValueError(f"cannot write {paths[key]} ({e.strerror or e}); nothing written: free "
                         "space (or choose another --out) and rerun") from None


def main(argv=None) -> int:
    parser = command_line()
    args = parser.parse_args(argv)

    def body():
        paths = output_paths(args, parser)
        check_outputs(paths, args.force)
        knobs = {k: getattr(args, k) for k in KNOBS + tuple(OPERATOR_FLAGS)}
        result = restore(args.image, model=args.model, method=args.method, op=args.op,
                         size=args.size, steps=args.steps, zeta=args.zeta,
                         dmap_setting=args.dmap_setting, eta=args.eta, sigma_y=args.sigma_y,
                         cse=args.cse, prompt=args.prompt, seed=args.seed,
                         observed=args.observed, crop=not args.no_crop,
                         prediction=args.prediction, device=args.device, dtype=args.dtype,
                         checkpointing=args.checkpointing, compile=args.compile, **knobs)
        save(paths, result)
        record = result["record"]
        quality = f"PSNR {record['psnr']} dB, " if "psnr" in record else ""
        return (f"wrote {', '.join(os.path.basename(p) for p in paths.values())} to {args.out}: "
                f"{quality}{record['seconds']['total']} s in all (sampling "
                f"{record['seconds']['sample']} s)")

    return cli.run(body, interrupted="before sampling; nothing written")


if __name__ == "__main__":
    sys.exit(main())
