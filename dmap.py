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

import math

import torch

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
    eta = 1, DDIM (Song et al., ICLR 2021, arXiv 2010.02502) for eta < 1. y and A are only used
    to report the loss to the callback."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0_hat = denoiser(x, s[i])
        x, _, _ = ancestral_step(x, x0_hat, s[i], s[i + 1], eta, generator)
        if callback is not None:
            loss = (A(x0_hat) - y).flatten(1).norm(dim=1)
            callback(dict(i=i, sigma=s[i], x=x, x0_hat=x0_hat, loss=loss))
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


SAMPLERS = {"ddpm": ddpm, "dps": dps, "dsg": dsg, "dmap": dmap, "freedom": freedom,
            "resample": resample, "psld": psld}
