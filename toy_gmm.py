"""Exact Gaussian-mixture ground truth for every posterior sampler of dmap.SAMPLERS.

With a Gaussian-mixture prior everything the paper (Xu et al., ICLR 2025, arXiv 2501.18913) can
only approximate is exact: the noisy marginals, the denoiser, the score, the conditional score,
and, for y = A x0 + sigma_y noise, the posterior itself (again a mixture). This file runs the
samplers of dmap.py unchanged on such priors:

    python toy_gmm.py               # Fig. 8 and the three observations (20-30 s on 2 cores)
    python toy_gmm.py fig8          # Fig. 8 alone

The MCGdiff benchmark and the inexact CSE of Sec. 4.2 run on these mixtures in
gmm_benchmark.py. In a notebook each part is a function: fig8(), observations().

Reading order: (1) the mixture and its exact formulas; (2) running a sampler on it; (3) Fig. 8
(Appendix A.4); (4) the three observations of Sec. 3, exact; (5) the figures (plot.py draws
them) and tables; (6) the parts as functions, and what both commands share; (7) the command
line. Everything runs in float64 on the CPU.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dmap
import plot

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# (1) The Gaussian mixture: sum_k w_k N(m_k, C_k), C_k = U_k diag(lam_k) U_k^T
# ---------------------------------------------------------------------------------------------


class GMM:
    """A mixture of K Gaussians in d dimensions, held in each component's eigenbasis.

    weights (K,), means (K, d), lam the covariance eigenvalues, (K, d), or (K, 1) for isotropic
    components; U the eigenvectors as columns: None for axis-aligned (scalar or diagonal)
    covariances, (1, d, d) for one basis shared by all components (the posterior of isotropic
    components), (K, d, d) otherwise. Every exact formula below is diagonal in these bases; with
    one basis the squared distances expand into (N, d) @ (d, K) products, so 2000 samples x 25
    components x d = 800 stay cheap.
    The noisy marginal at sigma (x = x0 + sigma noise) is the same mixture with lam + sigma^2.
    """

    def __init__(self, weights, means, lam, U=None):
        self.weights, self.means, self.lam, self.U = weights, means, lam, U
        if U is None:
            self.mr = means  # the means in their eigenbases, U_k^T m_k: (K, d)
        elif len(U) == 1:
            self.mr = means @ U[0]
        else:
            self.mr = torch.einsum("kd,kde->ke", means, U)

    @classmethod
    def from_cov(cls, weights, means, cov) -> "GMM":
        """cov: (K,) scalar, (K, d) diagonal or (K, d, d) full covariances."""
        if cov.ndim == 1:
            return cls(weights, means, cov[:, None])
        if cov.ndim == 2:
            return cls(weights, means, cov)
        lam, U = torch.linalg.eigh((cov + cov.mT) / 2)
        return cls(weights, means, lam.clamp_min(0), U)

    @property
    def cov(self) -> torch.Tensor:
        """The covariances C_k, (K, d, d)."""
        lam = self.lam.expand_as(self.means)
        if self.U is None:
            return torch.diag_embed(lam)
        return self.U @ (lam[..., None] * self.U.mT)

    def noisy(self, sigma) -> "GMM":
        """The marginal of x = x0 + sigma noise: the prior convolved with N(0, sigma^2 I)."""
        return GMM(self.weights, self.means, self.lam + sigma**2, self.U)

    def scaled(self, alpha, sigma) -> "GMM":
        """The law of alpha x0 + sigma noise: means alpha m_k, eigenvalues alpha^2 lam + sigma^2
        (MCGdiff's VP marginal q_t: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t))."""
        return GMM(self.weights, self.means * alpha, self.lam * alpha**2 + sigma**2, self.U)

    def reweighted(self, weights) -> "GMM":
        """The same components with other weights."""
        return GMM(weights, self.means, self.lam, self.U)

    def to(self, dtype) -> "GMM":
        """The same mixture in another floating dtype."""
        return GMM(*(None if v is None else v.to(dtype)
                     for v in (self.weights, self.means, self.lam, self.U)))

    def _rotate(self, x):
        """x (N, d) in the eigenbases: (N, d) when one basis serves all components, else
        (N, K, d)."""
        if self.U is None:
            return x
        if len(self.U) == 1:
            return x @ self.U[0]
        return torch.einsum("nd,kde->nke", x, self.U)

    def _unrotate(self, v, k):
        """U_k v for row n's component k[n]: v (N, d) -> (N, d)."""
        if self.U is None:
            return v
        if len(self.U) == 1:
            return v @ self.U[0].mT
        return torch.einsum("ne,nde->nd", v, self.U[k])

    def _log_joint(self, xr, sigma):
        """log w_k + log N(x; m_k, C_k + sigma^2 I) from the rotated x: (N, K)."""
        lam = self.lam + sigma**2
        if xr.ndim == 3:
            maha = ((xr - self.mr) ** 2 / lam).sum(-1)
        elif lam.shape[1] == 1:  # isotropic, one basis: (|x|^2 - 2 x.m + |m|^2) / lam
            maha = ((xr**2).sum(-1, keepdim=True) - 2 * xr @ self.mr.T
                    + (self.mr**2).sum(-1)) / lam.T
        else:  # one basis: |x - m|^2_lam = x^2/lam - 2 x m/lam + m^2/lam
            maha = xr**2 @ (1 / lam).T - 2 * xr @ (self.mr / lam).T + (self.mr**2 / lam).sum(-1)
        log_det = torch.log(2 * math.pi * lam).expand_as(self.mr).sum(-1)
        return self.weights.log() - 0.5 * (maha + log_det)

    def _mix(self, xr, r, a, b):
        """sum_k r_k U_k (a_k * U_k^T x + b_k): r (N, K) responsibilities, a, b (K, d)."""
        if xr.ndim == 2:
            out = xr * (r @ a) + r @ b
            return out if self.U is None else out @ self.U[0].mT
        return torch.einsum("nke,kde->nd", r[..., None] * (a * xr + b), self.U)

    def log_prob(self, x, sigma=0.0) -> torch.Tensor:
        """log p_sigma(x) of the noisy marginal, (N,)."""
        return self._log_joint(self._rotate(x), sigma).logsumexp(-1)

    def responsibilities(self, x, sigma=0.0) -> torch.Tensor:
        """p(k | x) under the noisy marginal, (N, K)."""
        return self._log_joint(self._rotate(x), sigma).softmax(-1)

    def denoiser(self, x, sigma) -> torch.Tensor:
        """x0_hat = E[x0 | x] (Tweedie, Eq. 4) = sum_k r_k(x) (m_k + C_k (C_k + sigma^2)^-1
        (x - m_k)); contract 1 of DESIGN.md, differentiable in x."""
        xr, lam_s = self._rotate(x), self.lam + sigma**2
        r = self._log_joint(xr, sigma).softmax(-1)
        return self._mix(xr, r, self.lam / lam_s, self.mr * sigma**2 / lam_s)

    def score(self, x, sigma=0.0) -> torch.Tensor:
        """grad_x log p_sigma(x) = sum_k r_k(x) (C_k + sigma^2)^-1 (m_k - x); for sigma > 0 it
        equals (denoiser(x, sigma) - x) / sigma^2 (Tweedie)."""
        xr, lam_s = self._rotate(x), self.lam + sigma**2
        r = self._log_joint(xr, sigma).softmax(-1)
        return self._mix(xr, r, -1 / lam_s, self.mr / lam_s)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """n exact samples, (n, d)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self._unrotate(self.lam[k].sqrt() * z, k)

    def sample_x0(self, x, sigma, generator=None) -> torch.Tensor:
        """Exact samples of p(x0 | x0 + sigma noise = x), one per row of x: pick k ~ r_k(x),
        then x0 ~ N(m_k + C_k (C_k + sigma^2)^-1 (x - m_k), C_k sigma^2 (C_k + sigma^2)^-1)."""
        xr, lam_s = self._rotate(x), self.lam + sigma**2
        r = self._log_joint(xr, sigma).softmax(-1)
        k = torch.multinomial(r, 1, generator=generator)[:, 0]
        if xr.ndim == 3:
            xr = xr[torch.arange(len(x)), k]
        mean = (self.lam / lam_s)[k] * xr + (self.mr * sigma**2 / lam_s)[k]
        std = (self.lam * sigma**2 / lam_s).sqrt()[k]
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return self._unrotate(mean + std * z, k)

    def posterior(self, A, y, sigma_y) -> "GMM":
        """p(x0 | y) for y = A x0 + sigma_y noise, A (dy, d), y (dy,): again a mixture.

        Per component the Gaussian (Kalman) update; the weights w'_k ∝ w_k N(y; A m_k,
        sigma_y^2 I + A C_k A^T) (docs/gmm_benchmark.md §1.6)."""
        dy, d = A.shape
        if self.U is None:
            CAt = self.lam[..., None] * A.T  # C_k A^T, (K, d, dy)
        else:
            CAt = self.U @ (self.lam[..., None] * (self.U.mT @ A.T))
        S = A @ CAt + sigma_y**2 * torch.eye(dy, dtype=A.dtype)  # Cov[y | k], (K, dy, dy)
        resid = y - self.means @ A.T  # (K, dy)
        gain = torch.linalg.solve(S, CAt.mT).mT  # C_k A^T S_k^-1, (K, d, dy)
        means = self.means + (gain @ resid[..., None])[..., 0]
        log_w = self.weights.log() + torch.distributions.MultivariateNormal(
            torch.zeros(dy, dtype=A.dtype), S).log_prob(resid)
        weights = (log_w - log_w.logsumexp(0)).exp()
        if self.U is None and self.lam.shape[1] == 1:
            # isotropic components c_k I: (I/c_k + A^T A / sigma_y^2)^-1 is diagonal in the
            # right singular basis V of A, eigenvalues c sigma_y^2 / (sigma_y^2 + c s_i^2)
            _, s, Vh = torch.linalg.svd(A)
            s2 = torch.zeros(d, dtype=A.dtype)
            s2[: len(s)] = s**2
            c = self.lam[:, :1]
            return GMM(weights, means, c * sigma_y**2 / (sigma_y**2 + c * s2), Vh.mT[None])
        return GMM.from_cov(weights, means, self.cov - gain @ CAt.mT)


def row_maps(M):
    """For M (P, k, d): x -> x M_p^T on the p-th of P equal row blocks of x, (N, d) -> (N, k),
    and its adjoint v -> v M_p, (N, k) -> (N, d); each is the other's gradient. Both of the
    benchmark's projections are such maps: onto the means' plane (gmm_benchmark.LowRankGMM,
    k = 2) and onto the rows of A (linear_operator, k = dy). The adjoint is written as k scaled
    rows of M added, one pass over (N, d) each: the matrix products with inner size k that
    addmm and autograd would run took 1.5-3x as long on the CPU (MKL, 2000 x 800 particles),
    and einsum picked a 10x slower layout for k = 1 (measured: denoiser + gradient 13% faster,
    ReSample at dy = 1 1.8x)."""
    P, k, d = M.shape
    rows = M[:, None]  # (P, 1, k, d)

    def times_mt(x):  # one batched product; M.mT, a transposed view, is the fast layout
        return torch.bmm(x.reshape(P, -1, d), M.mT).reshape(len(x), k)

    def times_m(v):  # v M = sum_j v_j m_j
        v = v.reshape(P, -1, k)
        out = v[..., :1] * rows[..., 0, :]
        for j in range(1, k):
            out.addcmul_(v[..., j:j + 1], rows[..., j, :])
        return out.reshape(-1, d)

    class Apply(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return times_mt(x)

        @staticmethod
        def backward(ctx, g):
            return Adjoint.apply(g)

    class Adjoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return times_m(v)

        @staticmethod
        def backward(ctx, g):
            return Apply.apply(g)

    return Apply.apply, Adjoint.apply


# ---------------------------------------------------------------------------------------------
# (2) Running a sampler on a mixture; the implied score of a guided step
# ---------------------------------------------------------------------------------------------


def linear_operator(A_mats):
    """P problems side by side as one linear operator: rows p n .. (p + 1) n - 1 of the batch
    see A_mats[p], (P, dy, d) (P = 1: one problem). Returns A and the parts PSLD takes beyond it
    (dmap.model_parts): H = A, its true adjoint, decode = encode = identity (pixel space).
    Every sample stays independent (contract 2). row_maps makes both, each the other's
    gradient."""
    A, adjoint = row_maps(A_mats)

    def identity(v):
        return v

    return A, dict(H=A, adjoint=adjoint, decode=identity, encode=identity)


def run(name, prior, A_mat, y, sigmas, x, seed, **hyper):
    """dmap.SAMPLERS[name] with the exact denoiser of `prior` and A x0 = A_mat x0, from x, or
    from x = sigmas[0] * randn(x, d) when x is a number of samples."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(x, int):
        x = float(sigmas[0]) * torch.randn(x, prior.means.shape[1], generator=g, dtype=F64)
    A, parts = linear_operator(A_mat[None])
    return dmap.SAMPLERS[name](prior.denoiser, x, y[None], A, sigmas, generator=g,
                               **dmap.model_parts(name, **parts), **hyper)


def implied_score(name, prior, A_mat, y, x, sigma, sigma_next, seed, repeats=16, **hyper):
    """dmap.implied_score (the score one step of sampler `name` implies at x, Prop. 1) with the
    exact denoiser of `prior` and A x0 = A_mat x0; -> (score (N, d), its Monte Carlo variance)."""
    A, parts = linear_operator(A_mat[None])
    return dmap.implied_score(name, prior.denoiser, x, y[None], A, sigma, sigma_next,
                              repeats=repeats, seed=seed, parts=parts, **hyper)


# ---------------------------------------------------------------------------------------------
# (3) Fig. 8 (Appendix A.4): two modes, the first coordinate observed
# ---------------------------------------------------------------------------------------------

# (label, sampler, hyper-parameters); the paper's DPS has zeta = 0.05 (Appendix A.4)
FIG8_RUNS = [
    ("unguided (ddpm)", "ddpm", {}),
    ("DPS zeta=0.01", "dps", dict(zeta=0.01)),
    ("DPS zeta=0.05", "dps", dict(zeta=0.05)),
    ("DPS zeta=0.2", "dps", dict(zeta=0.2)),
    ("DPS zeta=1", "dps", dict(zeta=1.0)),
    ("DSG rate=0.08", "dsg", dict(zeta=0.08)),
    ("DSG rate=0.3", "dsg", dict(zeta=0.3)),
    ("DMAP zeta=0.05", "dmap", dict(zeta=0.05)),
    ("DMAP zeta=0.5", "dmap", dict(zeta=0.5)),
    ("FreeDOM zeta=0.05", "freedom", dict(zeta=0.05)),
    ("ReSample zeta=0.05", "resample", dict(zeta=0.05)),
    ("PSLD zeta=0.05", "psld", dict(zeta=0.05)),
]
NOISE_FREE = 1e-3  # sigma_y standing in for the paper's noise-free y


def fig8_problem():
    """Appendix A.4: centres (-1, -1) and (1, 1), std 0.3, equal weights; A keeps the first
    coordinate and zeroes the second; y = (0.5, 0)."""
    prior = GMM.from_cov(torch.tensor([0.5, 0.5], dtype=F64),
                         torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=F64),
                         torch.tensor([0.09, 0.09], dtype=F64))
    A_mat = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    return prior, A_mat, torch.tensor([0.5, 0.0], dtype=F64)


def fig8_sigmas(steps=100):
    """100 Karras steps, sigma_max 4, rho 7 (Appendix A.4); sigma_min 0.002 is EDM's default
    (the paper gives none, docs/official_code.md §8)."""
    return dmap.karras_sigmas(steps, 0.002, 4.0, 7.0)


def sample_stats(x) -> dict:
    """Fraction in the lower mode (x2 < 0, the (-1, -1) component), mean of x1, spreads."""
    return dict(lower=(x[:, 1] < 0).double().mean().item(), mean_x1=x[:, 0].mean().item(),
                std_x1=x[:, 0].std().item(), std_x2=x[:, 1].std().item())


def exact_stats(post: GMM) -> dict:
    """sample_stats in closed form: P(x2 < 0) = sum_k w_k Phi(-m_k2 / sqrt(C_k22)) and the
    mixture moments E[x] = sum w_k m_k, E[x x^T] = sum w_k (C_k + m_k m_k^T)."""
    cov = post.cov
    lower = (post.weights * torch.special.ndtr(-post.means[:, 1] / cov[:, 1, 1].sqrt())).sum()
    mean = post.weights @ post.means
    var = post.weights @ (cov.diagonal(dim1=1, dim2=2) + post.means**2) - mean**2
    return dict(lower=lower.item(), mean_x1=mean[0].item(), std_x1=var[0].sqrt().item(),
                std_x2=var[1].sqrt().item())


def fig8_samples(n=2000, sigma_y=1.0, seed=0, steps=100, callback=None) -> dict:
    """Samples of the exact posterior (at sigma_y and noise-free) and of every FIG8_RUNS entry;
    callback(label) after each run (a progress bar)."""
    prior, A_mat, y = fig8_problem()
    g = torch.Generator().manual_seed(seed)
    samples = {f"exact, sigma_y={s:g}": prior.posterior(A_mat, y, s).sample(n, g)
               for s in (sigma_y, NOISE_FREE)}
    for label, name, hyper in FIG8_RUNS:
        samples[label] = run(name, prior, A_mat, y, fig8_sigmas(steps), n, seed, **hyper)
        if callback is not None:
            callback(label)
    return samples


# ---------------------------------------------------------------------------------------------
# (4) The three observations of Sec. 3, against the exact conditional score
# ---------------------------------------------------------------------------------------------

OBS_RUNS = [r for r in FIG8_RUNS if r[1] in ("dps", "dsg", "dmap")]
REPEATS = dict(dps=1, dsg=64, dmap=64)  # noise draws per x for implied_score (dps: exact)


def observation_scores(sigma_y=1.0, n=250, n_mean=10000, seed=0, steps=100,
                       callback=None) -> dict:
    """Observation I (Eq. 9-10): the error of each method's implied score (implied_score) and of
    the unconditional score against the exact conditional score grad log p_sigma(x | y) (the
    noisy posterior is a mixture too), along the exact conditional trajectory x ~ p_sigma(x | y)
    (the analogue of the paper's StableSR reference trajectory); reported in epsilon units,
    sigma * RMS ||s - s_true||. Observation II (Eq. 11-12): the mean of each score at the first
    step over n_mean exact samples of p_sigma_max(x | y), where every valid conditional score
    has mean zero. Observation III (Eq. 13) uses the Fig. 8 samples. callback(i) after step i
    of Observation I and, with i = steps, after Observation II (a progress bar)."""
    prior, A_mat, y = fig8_problem()
    post = prior.posterior(A_mat, y, sigma_y)
    s = fig8_sigmas(steps).tolist()
    g = torch.Generator().manual_seed(seed)
    error = {label: [] for label in ["unconditional"] + [r[0] for r in OBS_RUNS]}
    for i in range(steps):
        x = post.noisy(s[i]).sample(n, g)
        s_true = post.score(x, s[i])
        mse = (prior.score(x, s[i]) - s_true).pow(2).sum(1).mean()
        error["unconditional"].append(s[i] * mse.sqrt().item())
        for label, name, hyper in OBS_RUNS:
            score, mc_var = implied_score(name, prior, A_mat, y, x, s[i], s[i + 1], seed + i,
                                          repeats=REPEATS[name], **hyper)
            mse = ((score - s_true).pow(2).sum(1) - mc_var).mean()  # E|s - s_true|^2, debiased
            error[label].append(s[i] * mse.clamp_min(0).sqrt().item())
        if callback is not None:
            callback(i)
    x = post.noisy(s[0]).sample(n_mean, g)
    scores = {"exact conditional": post.score(x, s[0]), "unconditional": prior.score(x, s[0])}
    for label, name, hyper in OBS_RUNS:
        scores[label] = implied_score(name, prior, A_mat, y, x, s[0], s[1], seed,
                                      repeats=REPEATS[name], **hyper)[0]
    mean = {label: dict(mean=v.mean(0).tolist(), norm=v.mean(0).norm().item(),
                        se=(v.std(0) / math.sqrt(n_mean)).tolist(),
                        rms=v.pow(2).sum(1).mean().sqrt().item())
            for label, v in scores.items()}
    if callback is not None:
        callback(steps)
    return dict(sigma_y=sigma_y, sigmas=s[:-1], error=error, mean=mean)


# ---------------------------------------------------------------------------------------------
# (5) The figures: what each one shows (plot.py draws them); the tables
# ---------------------------------------------------------------------------------------------

LIM, PANEL = (-2.5, 2.5), 240  # Fig. 8: the limits of both axes; a panel's data area in pixels


def density_grid(gmm: GMM, size=PANEL) -> np.ndarray:
    """gmm's density at plot.cell_centres over LIM x LIM, (size, size), blurred by one cell (the
    noisy marginal p_sigma, sigma = cell width), so that a posterior thinner than a pixel (x1
    std 0.001 at sigma_y = 0.001) still shows."""
    cell = (LIM[1] - LIM[0]) / size
    x = torch.from_numpy(plot.cell_centres(LIM, LIM, (size, size)).reshape(-1, 2))
    return gmm.log_prob(x, cell).exp().view(size, size).numpy()


def draw_fig8(samples, sigma_y):
    """One panel per entry of `samples`, all its points over the same two exact posteriors: the
    noise-free one (NOISE_FREE, the samplers' y) filled, the sigma_y one outlined, so that the
    key holds for every panel. The key fills the first free cell."""
    prior, A_mat, y = fig8_problem()
    filled, outlined = (density_grid(prior.posterior(A_mat, y, s)) for s in (NOISE_FREE, sigma_y))
    panels = []
    for j, (label, x) in enumerate(samples.items()):
        panels.append(plot.scatter_plot(
            x[:, 0].numpy(), x[:, 1].numpy(), xlim=LIM, ylim=LIM, density=filled,
            outline=outlined, title=label, xlabel="x1", ylabel="x2" if j % 4 == 0 else "",
            size=PANEL))
    n = len(next(iter(samples.values())))
    panels.append(plot.legend([
        (f"exact, sigma_y = {NOISE_FREE:g}: 50/90/99% regions", plot.SHADES[2], "fill"),
        (f"exact, sigma_y = {sigma_y:g}: the same, outlined", plot.COLORS[3], "outline"),
        (f"samples, all {n} of each method", plot.COLORS[1], "dot")]))
    title = (f"Fig. 8 setting (A keeps x1, y = (0.5, 0)). Filled: the exact posterior of the "
             f"noise-free y (sigma_y = {NOISE_FREE:g}), the samplers' target, 50/90/99% regions; "
             f"outlined: sigma_y = {sigma_y:g}\n(the first panel's samples). Dots: all {n} "
             "samples of each method, darker where they pile up; triangles: samples beyond the "
             "axes.")
    return plot.image_grid([panels[i:i + 4] for i in range(0, len(panels), 4)], title=title)


def draw_observations(obs, stats) -> dict:
    """{file name: image} of the three observations: the implied-score error along the steps
    (the last step, to sigma = 0, as dots); the norm of the mean score at the first step; each
    method's per-coordinate spread against the exact one."""
    s, last, sy = obs["sigmas"], len(obs["sigmas"]) - 1, obs["sigma_y"]
    stretch = s[last] ** 2 / (s[last - 1] ** 2 - s[last] ** 2)  # 3.2 for 100 Karras steps
    errors = obs["error"].items()
    one = plot.line_plot(
        {label: (s[:last], e[:last]) for label, e in errors},
        points={label: ([s[last]], [e[last]]) for label, e in errors},
        points_label=f"last step, sigma {s[last]:.2g} -> 0", logx=True, logy=True,
        title=f"Observation I: implied score vs exact conditional score (sigma_y = {sy:g})\n"
        f"Last step (dots), sigma {s[last]:.2g} -> 0: DSG and DMAP have no noise sphere there "
        "and step\nunguided (their dots lie on the unconditional one); DPS's fixed step zeta g "
        f"spreads\nover sigma^2 - 0, {stretch:.1f}x the previous step's sigma^2 - sigma_next^2, "
        "so its error drops",
        xlabel="sigma (sampling runs right to left)", ylabel="sigma * RMS error")
    se = float(np.linalg.norm(obs["mean"]["exact conditional"]["se"]))
    two = plot.bar_plot(
        {label: [m["norm"]] for label, m in obs["mean"].items()}, logx=True,
        series=["norm of the mean score"],
        reference=[(se, "standard error, exact conditional", plot.COLORS[1])],
        title=f"Observation II: mean score over exact p(x_T | y) samples, sigma = {s[0]:g}\n"
        "(every valid conditional score has mean zero)", xlabel="norm of the mean")
    prior, A_mat, y = fig8_problem()
    ref = exact_stats(prior.posterior(A_mat, y, sy))
    three = plot.bar_plot(
        {label: [st["std_x1"], st["std_x2"]] for label, st in stats.items()}, logx=True,
        series=["std x1 (observed)", "std x2"],
        reference=[(ref["std_x1"], f"exact std x1, sigma_y = {sy:g}", plot.COLORS[0]),
                   (ref["std_x2"], f"exact std x2, sigma_y = {sy:g}", plot.COLORS[1])],
        title="Observation III: the spread of each method's samples (the exact rows: exact "
        "samples)", xlabel="standard deviation (log scale)")
    return {"observation_1.png": one, "observation_2.png": two, "observation_3.png": three}


def fig8_tables(samples, sigma_y) -> str:
    """Markdown: exact mode weight and spreads against sigma_y; each method's samples."""
    prior, A_mat, y = fig8_problem()
    head = "| {} | P(x2 < 0) | mean x1 | std x1 | std x2 |\n|---|---|---|---|---|\n"
    row = "| {} | {lower:.4f} | {mean_x1:.3f} | {std_x1:.3f} | {std_x2:.3f} |\n"
    out = "Exact posterior of the Fig. 8 problem against the likelihood's sigma_y:\n\n"
    out += head.format("sigma_y")
    for s in (NOISE_FREE, 0.1, 0.3, 0.5, 1.0, 2.0):
        out += row.format(f"{s:g}", **exact_stats(prior.posterior(A_mat, y, s)))
    out += f"\nSamples ({len(next(iter(samples.values())))} each, 100 Karras steps):\n\n"
    out += head.format("method")
    for label, x in samples.items():
        out += row.format(label, **sample_stats(x))
    return out


def observation_tables(obs, samples) -> str:
    s, out = np.array(obs["sigmas"]), f"Observations against sigma_y = {obs['sigma_y']:g}.\n\n"
    picks = [int(np.argmin(np.abs(s - v))) for v in (4.0, 1.0, 0.1, 0.01)]
    out += ("Observation I: epsilon-scaled error sigma * RMS ||s - s_true(x | y)|| along the "
            "exact conditional trajectory\n\n| score | mean over steps | "
            + " | ".join(f"sigma={s[i]:.3g}" for i in picks) + " |\n"
            + "|---" * (2 + len(picks)) + "|\n")
    for label, e in obs["error"].items():
        out += f"| {label} | {np.mean(e):.4f} | " + " | ".join(f"{e[i]:.4f}" for i in picks)
        out += " |\n"
    out += ("\nObservation II: mean of the score at the first step (sigma = "
            f"{s[0]:g}) over exact samples of p(x_T | y); standard errors in brackets\n\n"
            "| score | mean (x1, x2) | norm of mean | RMS of score |\n|---|---|---|---|\n")
    for label, m in obs["mean"].items():
        out += (f"| {label} | ({m['mean'][0]:+.2e} [{m['se'][0]:.1e}], {m['mean'][1]:+.2e} "
                f"[{m['se'][1]:.1e}]) | {m['norm']:.2e} | {m['rms']:.3f} |\n")
    out += "\nObservation III: per-coordinate std of the samples / exact std\n\n"
    prior, A_mat, y = fig8_problem()
    ref = {sy: exact_stats(prior.posterior(A_mat, y, sy)) for sy in (obs["sigma_y"], NOISE_FREE)}
    out += "| method | std x1 | std x2 | " + " | ".join(
        f"ratio x1, x2 vs sigma_y={sy:g}" for sy in ref) + " |\n|---|---|---|---|---|\n"
    for label, x in samples.items():
        st = sample_stats(x)
        out += f"| {label} | {st['std_x1']:.3f} | {st['std_x2']:.3f} | " + " | ".join(
            f"{st['std_x1'] / r['std_x1']:.2f}, {st['std_x2'] / r['std_x2']:.2f}"
            for r in ref.values()) + " |\n"
    return out


# ---------------------------------------------------------------------------------------------
# (6) The parts as functions (a notebook calls these), and what both commands share
# ---------------------------------------------------------------------------------------------


def tqdm_bar(desc: str, total: int, unit: str):
    """The parts' default `progress`: a tqdm bar on stderr (anything with update() and close()
    will do)."""
    return tqdm(total=total, desc=desc, unit=unit)


def fig8(out=None, *, samples=2000, sigma_y=1.0, seed=0, steps=100, progress=tqdm_bar) -> dict:
    """Fig. 8 (Appendix A.4): `samples` samples of each FIG8_RUNS method and of the exact
    posterior (at sigma_y and NOISE_FREE), `steps` Karras steps. Returns dict(samples={label:
    (n, 2)}, stats={label: sample_stats}, exact={label: exact_stats, the closed form}, table=
    markdown, files={"fig8.png", "summary.md", "summary.json": figure or text}); the files are
    written into the folder `out` when it is given. progress(desc, total, unit) -> a bar."""
    bar = progress("Fig. 8: samplers", len(FIG8_RUNS), "run")
    x = fig8_samples(samples, sigma_y, seed, steps, lambda _: bar.update())
    bar.close()
    prior, A_mat, y = fig8_problem()
    stats = {label: sample_stats(v) for label, v in x.items()}
    exact = {f"exact, sigma_y={s:g}": exact_stats(prior.posterior(A_mat, y, s))
             for s in (sigma_y, NOISE_FREE)}
    table = fig8_tables(x, sigma_y)
    files = {"fig8.png": draw_fig8(x, sigma_y), "summary.md": table,
             "summary.json": json.dumps({"fig8": stats, "fig8_exact": exact})}
    if out is not None:
        save(out, files)
    return dict(samples=x, stats=stats, exact=exact, table=table, files=files)


def observations(out=None, *, fig8_result=None, sigma_y=1.0, n=250, n_mean=10000, seed=0,
                 steps=100, progress=tqdm_bar) -> dict:
    """The three observations of Sec. 3 (observation_scores; Observation III takes the samples
    of `fig8_result`, what fig8() returned, run here with its defaults when None). Returns
    dict(scores=observation_scores' dict, table=markdown, files={"observation_1.png",
    "observation_2.png", "observation_3.png", and "summary.md", "summary.json" of Fig. 8 and
    the observations together}); the files are written into `out` when it is given."""
    if fig8_result is None:
        fig8_result = fig8(sigma_y=sigma_y, seed=seed, steps=steps, progress=progress)
    bar = progress("Observation I steps, then II", steps + 1, "step")
    obs = observation_scores(sigma_y, n, n_mean, seed, steps, lambda _: bar.update())
    bar.close()
    table = observation_tables(obs, fig8_result["samples"])
    files = draw_observations(obs, fig8_result["stats"])
    files["summary.md"] = fig8_result["table"] + "\n" + table
    files["summary.json"] = json.dumps({"fig8": fig8_result["stats"],
                                        "fig8_exact": fig8_result["exact"], "observations": obs})
    if out is not None:
        save(out, files)
    return dict(scores=obs, table=table, files=files)


def save(out: str, files: dict, written=None) -> None:
    """Write {file name: figure or text} into the folder `out` (made if missing), each file
    atomically (cli.write_atomic): a crash never leaves half a file. Appends each name to the
    list `written` once its file is complete."""
    os.makedirs(out, exist_ok=True)
    for name, value in files.items():
        path = os.path.join(out, name)
        if isinstance(value, Image.Image):
            cli.write_atomic(path, value.save)
        else:
            cli.write_text(path, value)
        if written is not None:
            written.append(name)


def write_parts(out: str, parts, threads=None) -> str:
    """The body of this file's command and of gmm_benchmark.py's, for cli.run: on `threads`
    torch threads (None: as they are), parts(progress) -> {file name: figure or text}, with a
    tqdm bar per stage, then every file written into `out` (nothing before: Ctrl-C leaves no
    file of this run). Returns the closing line. Ctrl-C: a KeyboardInterrupt that names the
    stage and what was written; an `out` that cannot be written: ValueError."""
    if threads:
        torch.set_num_threads(threads)
    bars, written, t0 = [], [], time.time()

    def progress(desc, total, unit):
        bars.append(tqdm_bar(desc, total, unit))
        return bars[-1]

    try:
        os.makedirs(out, exist_ok=True)
        save(out, parts(progress), written)
    except KeyboardInterrupt:
        for bar in bars:
            bar.close()
        where = (f"{bars[-1].desc}, {bars[-1].n} of {bars[-1].total} {bars[-1].unit}s done"
                 if bars and bars[-1].n < bars[-1].total else "writing the outputs")
        done = f"{len(written)} files written, each complete" if written else "nothing written"
        raise KeyboardInterrupt(f"in {where}; {done}") from None
    except OSError as e:  # creating or writing the output folder
        raise ValueError(f"cannot write to --out {out} ({e.strerror}); choose another "
                         "--out") from None
    return f"wrote {out} in {time.time() - t0:.0f} s"


def command_line(doc: str, parts: list, part_help: str) -> cli.ArgumentParser:
    """The flags both commands share (this file's and gmm_benchmark.py's): the part to run
    (the first of `parts` by default), --out, --seed, --threads, --quick."""
    p = cli.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="?", default=parts[0], choices=parts,
                   help=f"{part_help} (default: %(default)s)")
    p.add_argument("--out", default="results/toy_gmm",
                   help="folder for figures and tables (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else the cores idle at "
                   "start; README.md, Threads)")
    p.add_argument("--quick", action="store_true",
                   help="tiny default sizes and few steps, for tests (explicit flags still "
                   "win); numbers are not meaningful")
    return p


def check_flags(p: argparse.ArgumentParser, out: str, **least) -> None:
    """p.error (the usage, one `error:` line, exit 2) for a flag below its least value, least =
    {name: (value, least value)} (value None: not given), or for an --out that is a file."""
    for name, (value, low) in least.items():
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if os.path.exists(out) and not os.path.isdir(out):
        p.error(f"--out {out} is a file, not a folder; choose another --out")


# ---------------------------------------------------------------------------------------------
# (7) The command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = command_line(__doc__, ["all", "fig8", "observations"],
                     "all (= observations): Fig. 8 and the three observations, which take its "
                     "samples; fig8: Fig. 8 alone")
    p.add_argument("--sigma-y", type=float, default=1.0,
                   help="likelihood noise that defines the exact posterior of Fig. 8 and the "
                   "observations, > 0 (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per Fig. 8 method (default: 2000; 200 with --quick)")
    args = p.parse_args(argv)
    check_flags(p, args.out, samples=(args.samples, 2), threads=(args.threads, 1))
    if not args.sigma_y > 0:
        p.error(f"--sigma-y must be > 0, got {args.sigma_y:g} (the noise-free posterior is "
                f"--sigma-y {NOISE_FREE:g})")
    if args.samples is None:
        args.samples = 200 if args.quick else 2000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    steps = 20 if args.quick else 100

    def parts(progress):
        f = fig8(samples=args.samples, sigma_y=args.sigma_y, seed=args.seed, steps=steps,
                 progress=progress)
        print(f["table"])
        if args.part == "fig8":
            return f["files"]
        obs = observations(fig8_result=f, sigma_y=args.sigma_y, n=100 if args.quick else 250,
                           n_mean=500 if args.quick else 10000, seed=args.seed, steps=steps,
                           progress=progress)
        print(obs["table"])
        return {**f["files"], **obs["files"]}

    return cli.run(lambda: write_parts(args.out, parts, args.threads),
                   interrupted="nothing written")


if __name__ == "__main__":
    sys.exit(main())
