"""Diffusion posterior sampling on Stable Diffusion 2.0: DMAP, DPS, DSG, FreeDOM, ReSample, PSLD.

Xu et al., "Rethinking Diffusion Posterior Sampling: From Conditional Score Estimator to
Maximizing a Posterior", ICLR 2025, arXiv 2501.18913. Restore an image:

    python dmap.py --method dmap --op blur img.png

Reading order: (1) the noise schedule in sigma space; (2) the denoiser (Tweedie, Eq. 4) and the
unguided Euler-ancestral step; (3) the samplers, one function each with one signature; (4) loading
SD 2.0; (5) the restoration command. Every sampler works in "variance exploding" coordinates,
x = x0 + sigma * noise, as the official code does (diffusers' Euler-ancestral scheduler runs on
latents scaled by sqrt(1 + sigma^2)), so the paper's step sizes zeta carry over unchanged.
"""

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

import clip
import operators
import unet
import vae

# ---------------------------------------------------------------------------------------------
# (1) Noise schedules: pure functions returning descending sigmas that end in 0
# ---------------------------------------------------------------------------------------------


def sd_abar(beta_start=0.00085, beta_end=0.012, n=1000) -> torch.Tensor:
    """alpha_bar_t of SD 2.0 ("scaled_linear": betas = linspace(sqrt(b0), sqrt(b1))^2, float32 as
    diffusers computes them; LDM uses float64, |d abar| <= 5e-7)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def sd_sigmas(steps: int, abar: torch.Tensor) -> torch.Tensor:
    """The official schedule: diffusers' Euler-ancestral "linspace" spacing (official_code.md
    §2.2): fractional timesteps linspace(999, 0, steps), sigma_t = sqrt((1-abar)/abar)
    interpolated linearly in t, then a final 0. 500 steps: sigma_max 14.6146."""
    t = torch.linspace(0, len(abar) - 1, steps, dtype=torch.float32).flip(0).double()
    table = ((1 - abar) / abar).sqrt().double()
    lo = t.floor().long().clamp(max=len(abar) - 2)
    sigmas = torch.lerp(table[lo], table[lo + 1], t - lo)  # np.interp, as diffusers does
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n sigmas from sigma_max to sigma_min, then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sigma_to_t(sigma: float, table: torch.Tensor) -> float:
    """The fractional timestep whose sigma this is (inverts sd_sigmas' linear interpolation);
    table = sqrt((1 - abar) / abar), float64, increasing in t."""
    sigma = min(max(sigma, table[0].item()), table[-1].item())
    hi = min(max(int(torch.searchsorted(table, torch.tensor([sigma], dtype=table.dtype))), 1),
             len(table) - 1)
    return hi - 1 + (sigma - table[hi - 1].item()) / (table[hi] - table[hi - 1]).item()


# ---------------------------------------------------------------------------------------------
# (2) The denoiser (Tweedie's formula) and the unguided Euler-ancestral step
# ---------------------------------------------------------------------------------------------


class SDDenoiser:
    """denoiser(x, sigma) -> x0_hat = E[x0 | x] for SD 2.0 latents (contract 1 of DESIGN.md).

    The UNet sees x / sqrt(sigma^2 + 1) (diffusers' scale_model_input) at the fractional timestep
    of sigma, with the text context `context` (1, 77, 1024) shared by the whole batch.
    """

    def __init__(self, unet, context: torch.Tensor, abar: torch.Tensor, prediction: str = "eps"):
        assert prediction in ("eps", "v"), prediction
        self.unet, self.context, self.prediction = unet, context, prediction
        self.table = ((1 - abar) / abar).sqrt().double()

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        t = torch.full((x.shape[0],), sigma_to_t(sigma, self.table), device=x.device)
        out = self.unet(x / math.sqrt(sigma**2 + 1), t, self.context.expand(x.shape[0], -1, -1))
        if self.prediction == "eps":
            return x - sigma * out  # Tweedie, Eq. 4: x0_hat = x - sigma * eps_hat
        # v-prediction (768-v model): x0 = sqrt(abar) x_vp - sqrt(1 - abar) v, in sigma space
        return x / (sigma**2 + 1) - out * sigma / math.sqrt(sigma**2 + 1)


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
    mu = x + (x - x0_hat) / sigma * (sigma_down - sigma)  # Euler step of the PF-ODE to sigma_down
    return mu + sigma_up * noise_like(x, generator), mu, sigma_up


# ---------------------------------------------------------------------------------------------
# (3) The samplers: method(denoiser, x, y, A, sigmas, *, hyper-parameters, eta, generator,
#     callback) -> x0. Every batch element is an independent sample: losses, norms and sphere
#     radii are per sample, so 2000 particles of a toy prior and one SD latent share the code.
# ---------------------------------------------------------------------------------------------


def per_step(value, sigmas: torch.Tensor) -> list:
    """A hyper-parameter as one float per step: a float, or a tensor of len(sigmas) - 1 values."""
    return torch.as_tensor(value, dtype=torch.float64).broadcast_to(len(sigmas) - 1).tolist()


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
    zeta: 4.8 for SR x8, 0.6 for Gaussian blur (official Record.md).
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    for i in range(len(s) - 1):
        x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
        x_next, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        x = x_next - zetas[i] * grad  # Eq. 3
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
        d_star = -r * grad / (sample_norm(grad) + 1e-8)  # Eq. 40
        d_sample = x_next - mu
        d_mix = d_sample + zetas[i] * (d_star - d_sample)  # Eq. 41
        x = mu + r * d_mix / (sample_norm(d_mix) + 1e-8)
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
    The last step has sigma_up = 0 and returns mu, as the official code does.
    Paper settings: "DMAP (full)" K=3 at 500 steps; "DMAP (same)" K=2 at 250 steps, zeta doubled.
    """
    if K < 1:
        raise ValueError(f"DMAP needs K >= 1 inner steps, got {K}")
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    root_n = math.sqrt(x[0].numel())
    for i in range(len(s) - 1):
        x0_hat = denoiser(x, s[i])
        x_next, mu, sigma_up = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        if sigma_up > 0:
            for _ in range(K):
                x0_hat, loss, grad = measurement_grad(denoiser, x_next, s[i + 1], y, A)
                x_star = x_next - zetas[i] * grad  # gradient step on x_{t-1}
                x_next = mu + (x_star - mu) / sample_norm(x_star - mu) * (root_n * sigma_up)
        else:  # radius 0: the sphere is the point mu (last step, or eta = 0)
            x_next, loss = mu, (A(x0_hat) - y).flatten(1).norm(dim=1)
        x = x_next
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def freedom(denoiser, x, y, A, sigmas, *, zeta=4.8, repeats=2, window=(0.2, 0.5), eta=1.0,
            generator=None, callback=None):
    """FreeDOM: Yu et al., ICCV 2023, arXiv 2303.09833, Algorithm 1; Eq. 36 of Xu et al.

    DPS steps, with "time travel" inside `window` (fractions of the loop, inclusive): after a
    guided step to sigma_next, re-noise back to sigma (x += sqrt(sigma^2 - sigma_next^2) eps)
    and redo the step, `repeats` times in all. Official public code (ddps main.py:44-46): K=2
    for loop steps 100..250 of 500. The dev code's VP re-noising on VE latents is a bug we skip.
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    n = len(s) - 1
    first, last = int(window[0] * n), int(window[1] * n)
    for i in range(n):
        for r in range(repeats if first <= i <= last else 1):
            if r > 0:  # time travel: x_t = x_{t-1} + sqrt(sigma_t^2 - sigma_{t-1}^2) eps
                x = x + math.sqrt(s[i] ** 2 - s[i + 1] ** 2) * noise_like(x, generator)
            x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
            x_next, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
            x = x_next - zetas[i] * grad
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def resample(denoiser, x, y, A, sigmas, *, zeta=4.8, at=(0.1, 0.2), gamma=40.0, iters=200,
             lr=5e-3, eta=1.0, generator=None, callback=None):
    """ReSample: Song et al., ICLR 2024, arXiv 2307.08123, Algorithm 1; Eq. 37-39 of Xu et al.

    DPS steps; at the loop fractions `at` (official: steps 50 and 100 of 500) hard data
    consistency: (i) optimise x0* = argmin_z ||y - A(z)||^2 from x0_hat (official rsp_lo: AdamW,
    lr 5e-3, 200 iterations, stop below 1e-6); (ii) stochastic resampling: draw x_{t-1} from the
    product of N(x0*, sigma_{t-1}^2) (forward diffusion of x0*) and N(x'_{t-1}, tau^2) (the
    unconditional sample), tau^2 = gamma (1-a')/(1-a) (1-a/a') / a', a = abar_t, a' = abar_{t-1}.
    Departure from the official code: it reads abar at the loop counter and applies the VP
    formula to VE latents (official_code.md §4.5); we use the sigmas of the step, in VE form.
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    n = len(s) - 1
    stops = {round(f * n) for f in at}
    for i in range(n):
        x0_hat, loss, grad = measurement_grad(denoiser, x, s[i], y, A)
        x_next, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        x = x_next - zetas[i] * grad
        if i in stops and s[i + 1] > 0:
            z = x0_hat.clone().requires_grad_(True)
            opt = torch.optim.AdamW([z], lr=lr)
            with torch.enable_grad():
                for _ in range(iters):
                    mse = (A(z) - y).pow(2).flatten(1).mean(dim=1)  # per sample
                    if bool((mse < 1e-6).all()):
                        break
                    opt.zero_grad()
                    mse.sum().backward()
                    opt.step()
            abar, abar_next = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
            v = gamma * (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)  # official, VP
            tau2, s2 = v / abar_next, s[i + 1] ** 2  # the VP variance in VE coordinates
            mean = (tau2 * z.detach() + s2 * x) / (tau2 + s2)  # Eq. 39
            x = mean + math.sqrt(tau2 * s2 / (tau2 + s2)) * noise_like(x, generator)
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
    return x


@torch.no_grad()
def psld(denoiser, x, y, A, sigmas, *, adjoint, zeta=4.8, gamma=0.002, decode=lambda z: z,
         encode=lambda x: x, eta=1.0, generator=None, callback=None):
    """PSLD: Rout et al., NeurIPS 2023, arXiv 2307.00619, Algorithm 2; Eq. 35 of Xu et al.

    DPS on latents plus the "gluing" term gamma ||E(A^T y + (I - A^T A) D(x0_hat)) - x0_hat||,
    which asks x0_hat to be a fixed point of decode -> project onto {A x = y} -> encode.
    Unlike the other samplers, A here is the PIXEL-space operator and `adjoint` its true
    adjoint A^T; decode/encode map latents to images and back (identity in pixel space).
    The official code used nearest upsampling as A^T for SR and the identity for blur
    (official_code.md §4.6); we use the true adjoint. gamma: 0.002 (official dev code).
    """
    s, zetas = sigmas.tolist(), per_step(zeta, sigmas)
    for i in range(len(s) - 1):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = denoiser(xg, s[i])
            image = decode(x0_hat)
            Ax = A(image)
            loss = (Ax - y).flatten(1).norm(dim=1)
            glued = encode(adjoint(y) + image - adjoint(Ax))
            total = loss + gamma * (glued - x0_hat).flatten(1).norm(dim=1)  # Eq. 35
            (grad,) = torch.autograd.grad(total.sum(), xg)
        x_next, _, _ = ancestral_step(x, x0_hat.detach(), s[i], s[i + 1], eta, generator)
        x = x_next - zetas[i] * grad
        if callback is not None:
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat.detach(), loss=loss.detach()))
    return x


# ---------------------------------------------------------------------------------------------
# (4) Loading SD 2.0: a diffusers pipeline folder or one single-file LDM checkpoint
# ---------------------------------------------------------------------------------------------

HUB_REPO = "stabilityai/stable-diffusion-2-base"
FETCH = (f"hf download {HUB_REPO} --include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' "
         "'scheduler/*' --exclude '*.bin' '*.fp16.*' --local-dir {path}")


class SD2(NamedTuple):
    """The parts of Stable Diffusion 2.0 the samplers need."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: "clip.Tokenizer | None"  # None: a single file without a tokenizer/ folder beside
    abar: torch.Tensor  # the DDPM table alpha_bar_t, t = 0..999
    prediction: str  # "eps" (512-base) or "v" (768-v)


def load_sd2(path: str, prediction: str | None = None, device=None, dtype=None) -> SD2:
    """SD 2.0 from a diffusers pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    or a single-file LDM checkpoint (512-base-ema.safetensors layout).

    512-base (eps) and 768-v (v) have identical keys: a folder's scheduler config decides; for a
    single file the `prediction` flag does (default "eps", the model of the paper).
    """
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' (512-base) or 'v' (768-v), got {prediction!r}")
    if not os.path.exists(path):
        raise ValueError(f"no SD 2.0 weights at {path}; fetch them with: {FETCH.format(path=path)}")
    if os.path.isfile(path):
        tokenizer_dir = os.path.join(os.path.dirname(path), "tokenizer")
        return SD2(unet.unet_from_single_file(path, device=device, dtype=dtype),
                   vae.vae_from_single_file(path, device=device, dtype=dtype),
                   clip.text_encoder_from_single_file(path, device=device, dtype=dtype),
                   clip.Tokenizer.from_folder(tokenizer_dir) if os.path.isdir(tokenizer_dir)
                   else None, sd_abar(), prediction or "eps")
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [p for p in parts if not os.path.isdir(os.path.join(path, p))]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} folder(s); not an SD 2.0 pipeline "
                         f"folder; fetch it with: {FETCH.format(path=path)}")
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        with open(config_path) as f:
            scheduler = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: unreadable ({e}); re-download scheduler/") from None
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"{config_path}: beta_schedule {scheduler['beta_schedule']!r} is not "
                         "SD 2.0's scaled_linear; this is not an SD 2.0 model")
    folder_prediction = {"epsilon": "eps", "v_prediction": "v"}.get(
        scheduler.get("prediction_type", "epsilon"))
    if folder_prediction is None or prediction not in (None, folder_prediction):
        raise ValueError(f"{config_path} says prediction_type "
                         f"{scheduler.get('prediction_type')!r}; drop --prediction {prediction}")
    abar = sd_abar(scheduler.get("beta_start", 0.00085), scheduler.get("beta_end", 0.012),
                   scheduler.get("num_train_timesteps", 1000))
    return SD2(unet.load_unet(os.path.join(path, "unet"), device, dtype),
               vae.load_vae(os.path.join(path, "vae"), device, dtype),
               clip.load_text_encoder(os.path.join(path, "text_encoder"), device, dtype),
               clip.Tokenizer.from_folder(os.path.join(path, "tokenizer")), abar,
               folder_prediction)


def encode_prompt(sd: SD2, prompt: str) -> torch.Tensor:
    """The (1, 77, 1024) text context. The paper conditions on the empty prompt (no CFG), whose
    ids need no vocabulary: [bos, eos, pad x 75] (sd2_formats.md §1.5)."""
    if sd.tokenizer is not None:
        ids = sd.tokenizer([prompt])
    elif prompt == "":
        ids = torch.tensor([[49406, 49407] + [0] * 75])
    else:
        raise ValueError("a non-empty prompt needs SD 2.0's tokenizer/ folder (vocab.json, "
                         "merges.txt) next to the single-file checkpoint")
    device = next(sd.text_encoder.parameters()).device
    with torch.no_grad():
        return sd.text_encoder(ids.to(device))



# ---------------------------------------------------------------------------------------------
# (5) The restoration command
# ---------------------------------------------------------------------------------------------

# zeta per method for (SR x8, every other operator): official Record.md and ddps README
# (official_code.md §5), logged for SR x8 and Gaussian blur. The other operators have no logged
# value; they use the Gaussian-blur column (our choice).
ZETA = {"dps": (4.8, 0.6), "dsg": (0.08, 0.08), "dmap": (4.8, 0.6), "freedom": (4.8, 0.6),
        "resample": (4.8, 0.6), "psld": (4.8, 0.6)}
# The paper's two DMAP budgets (Table 4): "full" = K 3 at 500 steps, "same" = the NFE of DPS at
# 500 steps: K 2 at 250 steps with zeta doubled.
DMAP_SETTINGS = {"full": dict(steps=500, K=3, zeta_scale=1.0),
                 "same": dict(steps=250, K=2, zeta_scale=2.0)}
# Method knobs the command exposes; each flag is named as the sampler keyword it sets.
KNOBS = ("K", "gamma", "repeats", "window", "at", "iters", "lr")


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images on [0, 1] (official fid.py:22-24, per image)."""
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float("inf") if mse == 0 else float(-10 * np.log10(mse))


def write_atomic(path: str, save) -> None:
    """save(tmp) then rename onto path, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="the reference image (or, with --observed, the measurement y)")
    p.add_argument("--method", default="dmap", choices=list(SAMPLERS), help="posterior sampler")
    p.add_argument("--op", default="sr", choices=list(operators.OPERATORS),
                   help="degradation operator A")
    p.add_argument("--model", default=os.environ.get("SD2_MODEL",
                                                     "./weights/stable-diffusion-2-base"),
                   help="SD 2.0 pipeline folder or single .safetensors file (env SD2_MODEL)")
    p.add_argument("--prediction", choices=["eps", "v"],
                   help="eps (512-base) or v (768-v); needed for a single-file 768-v checkpoint")
    p.add_argument("--out", default="./results", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--observed", action="store_true",
                   help="the image is the measurement y (a real low-res or blurry photo)")
    p.add_argument("--size", type=int, default=512, help="restored image size in pixels")
    p.add_argument("--no-crop", action="store_true", help="resize without centre-cropping")
    p.add_argument("--steps", type=int, help="sampling steps (default 500; DMAP: --dmap-setting)")
    p.add_argument("--zeta", type=float, help="step size / guidance rate (default: per operator)")
    p.add_argument("--dmap-setting", choices=list(DMAP_SETTINGS), default="full",
                   help="DMAP budget: full = K 3 at 500 steps; same = K 2 at 250, zeta x2")
    p.add_argument("--eta", type=float, default=1.0, help="ancestral noise (1 DDPM, 0 DDIM)")
    p.add_argument("--K", type=int, help="DMAP inner gradient steps")
    p.add_argument("--gamma", type=float, help="PSLD gluing weight / ReSample variance scale")
    p.add_argument("--repeats", type=int, help="FreeDOM time-travel repeats")
    p.add_argument("--window", type=float, nargs=2, help="FreeDOM window, loop fractions")
    p.add_argument("--at", type=float, nargs="+", help="ReSample steps, loop fractions")
    p.add_argument("--iters", type=int, help="ReSample latent-optimisation iterations")
    p.add_argument("--lr", type=float, help="ReSample latent-optimisation learning rate")
    p.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise std on [-1, 1]")
    p.add_argument("--sr-factor", type=int, default=8, help="SR downscaling factor")
    p.add_argument("--kernel-weights", default="weights/GOPRO_wVAE.safetensors",
                   help="bkse KernelWizard weights for nonlinear_blur")
    p.add_argument("--prompt", default="", help="text prompt (the paper uses none)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model and latent dtype (official: float32)")
    return p.parse_args(argv)


def settings(args) -> tuple[int, dict]:
    """The steps and the sampler's keyword arguments from the flags and the defaults;
    ValueError on nonsense."""
    fn = SAMPLERS[args.method]
    params = inspect.signature(fn).parameters
    kwargs = {"eta": args.eta}
    default_steps = DMAP_SETTINGS[args.dmap_setting]["steps"] if fn is dmap else 500
    steps = default_steps if args.steps is None else args.steps
    if "zeta" in params:
        zeta = ZETA[args.method][0 if args.op == "sr" else 1]
        if fn is dmap:
            zeta *= DMAP_SETTINGS[args.dmap_setting]["zeta_scale"]
            kwargs["K"] = DMAP_SETTINGS[args.dmap_setting]["K"]
        kwargs["zeta"] = zeta if args.zeta is None else args.zeta
    for name in KNOBS:
        value = getattr(args, name)
        if value is not None:
            if name not in params:
                raise ValueError(f"--{name} does not apply to --method {args.method}")
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    fractions = kwargs.get("window", ()) + kwargs.get("at", ())
    checks = [(steps >= 1, f"--steps must be >= 1, got {steps}"),
              (kwargs.get("zeta", 0) >= 0, f"--zeta must be >= 0, got {kwargs.get('zeta')}"),
              (0 <= args.eta <= 1, f"--eta must be in [0, 1], got {args.eta}"),
              (kwargs.get("K", 1) >= 1, f"--K must be >= 1, got {kwargs.get('K')}"),
              (args.sigma_y >= 0, f"--sigma-y must be >= 0, got {args.sigma_y}"),
              (args.size >= 8 and args.size % 8 == 0, f"--size must be a multiple of 8, got "
               f"{args.size}"),
              (all(v >= 0 for k, v in kwargs.items() if k in ("gamma", "iters", "lr")),
               "--gamma, --iters and --lr must be >= 0"),
              (kwargs.get("repeats", 1) >= 1, f"--repeats must be >= 1, got {args.repeats}"),
              (all(0 <= f <= 1 for f in fractions), "--window and --at are loop fractions in "
               f"[0, 1], got {list(fractions)}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return steps, kwargs


def restore(args) -> dict:
    """Load everything, synthesise (or read) y, sample, write the outputs; returns the record."""
    steps, kwargs = settings(args)
    stem = f"{os.path.splitext(os.path.basename(args.image))[0]}_{args.method}_{args.op}"
    paths = {k: os.path.join(args.out, f"{stem}{suffix}") for k, suffix in
             (("restored", ".png"), ("measurement", "_y.png"), ("panel", "_panel.png"),
              ("record", ".json"))}
    try:
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # CPU-only torch asserts on "cuda"
        raise ValueError(f"--device {args.device} is not usable here ({str(e).splitlines()[0]}); "
                         "try --device cpu") from None
    op_kwargs = {"size": args.size, "factor": args.sr_factor, "seed": args.seed,
                 "weights": args.kernel_weights}
    cls = operators.OPERATORS[args.op]
    op = cls(**{k: v for k, v in op_kwargs.items() if k in inspect.signature(cls).parameters})
    op = op.to(device, dtype)
    generator = torch.Generator(device).manual_seed(args.seed)
    if args.observed:
        y_size = args.size // args.sr_factor if args.op == "sr" else args.size
        x_ref, y = None, read_image(args.image, y_size, not args.no_crop).to(device, dtype)
    else:
        x_ref = read_image(args.image, args.size, not args.no_crop).to(device, dtype)
        y = op.measure(x_ref, args.sigma_y, generator)
    if args.method == "psld" and not hasattr(op, "adjoint"):
        raise ValueError(f"psld needs a linear operator with an adjoint; {args.op} has none")
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite or choose --out")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {args.out} ({e.strerror}); "
                         "choose another --out") from None
    if not os.access(args.out, os.W_OK):
        raise ValueError(f"output folder {args.out} is not writable; choose another --out")

    sd = load_sd2(args.model, args.prediction, device, dtype)
    denoiser = SDDenoiser(sd.unet, encode_prompt(sd, args.prompt), sd.abar, sd.prediction)

    def decode(z):  # latent -> image
        return sd.vae.decode(z / vae.SCALING_FACTOR)

    def encode(image):  # image -> latent: the posterior mean (official PSLD samples from it)
        return sd.vae.encode(image)[0] * vae.SCALING_FACTOR

    if args.method == "psld":  # PSLD works with the pixel operator and its adjoint
        A, kwargs = op, dict(kwargs, adjoint=op.adjoint, decode=decode, encode=encode)
    else:
        def A(z):
            return op(decode(z))

    sigmas = sd_sigmas(steps, sd.abar)
    latent = (1, sd.unet.cfg.in_channels, args.size // 8, args.size // 8)
    x = sigmas[0].item() * noise_like(torch.empty(latent, device=device, dtype=dtype), generator)
    bar = tqdm(total=steps, desc=f"{args.method} {args.op}", unit="step")

    def callback(d):
        if not torch.isfinite(d["x"]).all():
            raise FloatingPointError(f"NaN or inf at step {d['i']} (sigma {d['sigma']:.3g}); "
                                     "try a smaller --zeta")
        if d["loss"] is not None:
            bar.set_postfix(loss=f"{d['loss'].max().item():.4g}")
        bar.update(1)

    start = time.perf_counter()
    try:
        z0 = SAMPLERS[args.method](denoiser, x, y, A, sigmas, generator=generator,
                                   callback=callback, **kwargs)
    except FloatingPointError as e:
        raise ValueError(str(e)) from None
    finally:
        bar.close()
    with torch.no_grad():
        restored = to_uint8(decode(z0))
    seconds = time.perf_counter() - start
    y_image = to_uint8(op.hint(y) if y.shape[-1] != args.size else y)
    columns = [y_image, restored] + ([to_uint8(x_ref)] if x_ref is not None else [])
    record = dict(vars(args), sampler_kwargs={k: v for k, v in kwargs.items()
                                              if isinstance(v, (int, float, tuple))},
                  steps=steps, seconds=round(seconds, 1),
                  psnr=None if x_ref is None else round(psnr(restored, to_uint8(x_ref)), 3))
    write_atomic(paths["restored"], Image.fromarray(restored).save)
    write_atomic(paths["measurement"], Image.fromarray(to_uint8(y)).save)
    write_atomic(paths["panel"], Image.fromarray(np.concatenate(columns, axis=1)).save)

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)

    write_atomic(paths["record"], dump)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = restore(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: PSNR {record['psnr']} dB, {record['seconds']} s")
    return 0


SAMPLERS = {"ddpm": ddpm, "dps": dps, "dsg": dsg, "dmap": dmap, "freedom": freedom,
            "resample": resample, "psld": psld}


if __name__ == "__main__":
    sys.exit(main())
