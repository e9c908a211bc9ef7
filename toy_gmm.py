"""Exact Gaussian-mixture ground truth for every posterior sampler of dmap.SAMPLERS.

With a Gaussian-mixture prior everything the paper (Xu et al., ICLR 2025, arXiv 2501.18913) can
only approximate is exact: the noisy marginals, the denoiser, the score, the conditional score,
and, for y = A x0 + sigma_y noise, the posterior itself (again a mixture). This file runs the
samplers of dmap.py unchanged on such priors:

    python toy_gmm.py               # Fig. 8, the three observations, a benchmark slice
                                    # (20-40 s on 2 idle cores)
    python toy_gmm.py benchmark     # the full MCGdiff GMM benchmark, 9 cells x 2 step settings
                                    # (12-20 min on 2 cores: one cell per core)
    python toy_gmm.py benchmark --dims 8 80     # its d = 8, 80 cells only (~3 min)
    python toy_gmm.py cse           # an inexact CSE: Prop. 4 per step, Fig. 7 (20-30 s)

Reading order: (1) the mixture and its exact formulas; (2) running a sampler on it, the sliced
Wasserstein metric; (3) Fig. 8 (Appendix A.4); (4) the three observations of Sec. 3, exact;
(5) the MCGdiff benchmark (Cardoso et al., ICLR 2024; docs/gmm_benchmark.md); (5b) an inexact
conditional score estimator (Sec. 4.2: Prop. 4 and Fig. 7 in the toy); (6) the figures
(plot.py draws them); (7) the command line. Everything runs in float64 on the CPU, except the
benchmark's samplers (float32, 3x faster at d = 800; the metric does not move).
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import ctypes
import json
import math
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dmap
import metrics
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
    benchmark's projections are such maps: onto the means' plane (LowRankGMM, k = 2) and onto
    the rows of A (linear_operator, k = dy). The adjoint is written as k scaled rows of M
    added, one pass over (N, d) each: the matrix products with inner size k that addmm and
    autograd would run took 1.5-3x as long on the CPU (MKL, 2000 x 800 particles), and einsum
    picked a 10x slower layout for k = 1 (measured: denoiser + gradient 13% faster, ReSample
    at dy = 1 1.8x)."""
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


# The same formulas when the components differ only inside a q-dimensional subspace (the
# MCGdiff prior: means on a 2-D grid tiled to d, one covariance I; and its posteriors)


class LowRankGMM:
    """A GMM whose components differ only in span(Q): x = Q xq + x_perp, xq = Q^T x.

    Q (d, q) has orthonormal columns; xq follows `inner`, a GMM in q dimensions (any
    covariances); x_perp = (I - Q Q^T) x is N(0, c (I - Q Q^T)), the same for every component
    and independent of xq. So p(x) = p_inner(Q^T x) N(x_perp; 0, c I_{d-q}): each formula is
    the inner one in q dimensions plus an isotropic term, O(N d q) per call (forward and
    autograd) where GMM's one-basis path is O(N d K). Every mixture of components with one
    shared covariance c I and means in span(Q) is one (from_gmm), and so is its posterior
    (posterior: Q grows by the rows of A). GMM stays the reference (tests/test_toy_gmm.py).
    """

    def __init__(self, inner: GMM, Q, c: float):
        # Q held as a view of a contiguous Q^T (q, d): x @ Q is then 5x faster on the CPU
        self.inner, self.Q, self.c = inner, Q.mT.contiguous().mT, c
        self.project, self.lift = row_maps(self.Q.mT[None])  # x -> x Q, v -> v Q^T
        self.weights = inner.weights

    @classmethod
    def from_gmm(cls, gmm: GMM) -> "LowRankGMM":
        """A GMM with one isotropic covariance c I for all components, Q from the SVD of its
        means (K, d); the rank cut is numpy's matrix_rank default, s > s_max max(K, d) eps."""
        lam = gmm.lam
        if gmm.U is not None or lam.shape[1] != 1 or not bool((lam == lam[0]).all()):
            raise ValueError("LowRankGMM.from_gmm needs one isotropic covariance c I shared by "
                             "all components (GMM.from_cov with equal scalars); use GMM itself "
                             "otherwise")
        _, s, Vh = torch.linalg.svd(gmm.means, full_matrices=False)
        q = int((s > s.max() * max(gmm.means.shape) * torch.finfo(s.dtype).eps).sum())
        Q = Vh[:q].mT  # (d, q)
        return cls(GMM(gmm.weights, gmm.means @ Q, lam), Q, lam[0, 0].item())

    @property
    def means(self) -> torch.Tensor:
        """m_k = Q mq_k, (K, d)."""
        return self.inner.means @ self.Q.mT

    def noisy(self, sigma) -> "LowRankGMM":
        """x0 + sigma noise: the inner mixture's noisy marginal, c + sigma^2 outside span(Q)."""
        return LowRankGMM(self.inner.noisy(sigma), self.Q, self.c + sigma**2)

    def scaled(self, alpha, sigma) -> "LowRankGMM":
        """alpha x0 + sigma noise (GMM.scaled): the same in span(Q), alpha^2 c + sigma^2 out."""
        return LowRankGMM(self.inner.scaled(alpha, sigma), self.Q, self.c * alpha**2 + sigma**2)

    def to(self, dtype) -> "LowRankGMM":
        return LowRankGMM(self.inner.to(dtype), self.Q.to(dtype), self.c)

    def reweighted(self, weights) -> "LowRankGMM":
        return LowRankGMM(self.inner.reweighted(weights), self.Q, self.c)

    def log_prob(self, x, sigma=0.0) -> torch.Tensor:
        """log p_inner(Q^T x) + log N(x_perp; 0, (c + sigma^2) I_{d-q}), (N,)."""
        (d, q), var, xq = self.Q.shape, self.c + sigma**2, x @ self.Q
        perp = (x - xq @ self.Q.mT).pow(2).sum(-1)  # |x_perp|^2, (N,)
        return (self.inner.log_prob(xq, sigma)
                - 0.5 * (perp / var + (d - q) * math.log(2 * math.pi * var)))

    def responsibilities(self, x, sigma=0.0) -> torch.Tensor:
        """p(k | x) = p(k | Q^T x): x_perp has the same law under every component, (N, K)."""
        return self.inner.responsibilities(x @ self.Q, sigma)

    def denoiser(self, x, sigma) -> torch.Tensor:
        """x0_hat = Q x0_hat_inner(xq) + a x_perp, a = c / (c + sigma^2) (the Gaussian
        x_perp's Tweedie mean), written a x + (x0_hat_inner - a xq) Q^T: no (N, d) tensor
        per component, forward or backward; contract 1 of DESIGN.md."""
        xq, a = self.project(x), self.c / (self.c + sigma**2)  # x Q, as x @ Q (row_maps: faster)
        return torch.add(self.lift(self.inner.denoiser(xq, sigma) - a * xq), x, alpha=a)

    def score(self, x, sigma=0.0) -> torch.Tensor:
        """Q score_inner(xq) - x_perp / (c + sigma^2), written as the denoiser is."""
        xq, b = self.project(x), 1 / (self.c + sigma**2)
        return torch.add(self.lift(self.inner.score(xq, sigma) + b * xq), x, alpha=-b)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """n exact samples: Q xq + sqrt(c) (I - Q Q^T) z, xq ~ inner, z ~ N(0, I_d); (n, d)."""
        xq = self.inner.sample(n, generator)
        z = math.sqrt(self.c) * torch.randn(n, self.Q.shape[0], generator=generator,
                                            dtype=self.Q.dtype)
        return z + (xq - z @ self.Q) @ self.Q.mT

    def sample_x0(self, x, sigma, generator=None) -> torch.Tensor:
        """Exact samples of p(x0 | x0 + sigma noise = x): xq0 from the inner mixture, and
        x0_perp ~ N(a x_perp, a sigma^2), a = c / (c + sigma^2) (GMM.sample_x0 with K = 1)."""
        xq, a = x @ self.Q, self.c / (self.c + sigma**2)
        xq0 = self.inner.sample_x0(xq, sigma, generator)
        v = a * x + math.sqrt(a * sigma**2) * torch.randn(x.shape, generator=generator,
                                                           dtype=x.dtype)
        return v + (xq0 - v @ self.Q) @ self.Q.mT

    def posterior(self, A, y, sigma_y) -> "LowRankGMM":
        """p(x0 | y) for y = A x0 + sigma_y noise, A (dy, d): again a LowRankGMM.

        Q2, an orthonormal basis of span(Q, rows of A), has A = A Q2 Q2^T, so y sees x0 only
        through x2 = Q2^T x0, and x0 - Q2 x2 keeps its law N(0, c (I - Q2 Q2^T)), independent
        of x2 and k. With R = Q2^T Q, x2 | k ~ N(R mq_k, R C_k R^T + c (I - R R^T)), a mixture
        in q2 <= q + dy dimensions: its posterior under A Q2 is GMM.posterior."""
        B, s, _ = torch.linalg.svd(torch.cat([self.Q, A.T], 1), full_matrices=False)
        # the rank of [Q, A^T] (d, q + dy), numpy's matrix_rank cut as in from_gmm
        q2 = int((s > s.max() * max(B.shape) * torch.finfo(s.dtype).eps).sum())
        Q2 = B[:, :q2]  # (d, q2)
        R = Q2.mT @ self.Q  # the old basis in the new coordinates, (q2, q)
        eye = torch.eye(q2, dtype=R.dtype)
        lifted = GMM.from_cov(self.weights, self.inner.means @ R.mT,
                              R @ self.inner.cov @ R.mT + self.c * (eye - R @ R.mT))
        return LowRankGMM(lifted.posterior(A @ Q2, y, sigma_y), Q2, self.c)


# ---------------------------------------------------------------------------------------------
# (2) Running a sampler on a mixture; the implied score of a guided step; the metric
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


def fig8(n, sigma_y, seed, steps=100, callback=None):
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


def observations(sigma_y, n, n_mean, seed, steps=100, callback=None) -> dict:
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
# (5) The MCGdiff Gaussian-mixture benchmark (Cardoso et al., ICLR 2024; docs/gmm_benchmark.md)
# ---------------------------------------------------------------------------------------------

SETTINGS = [(20, 0.6), (100, 0.85)]  # (steps, eta), docs/gmm_benchmark.md §1.4
DIMS, DYS = [800, 80, 8], [1, 2, 4]  # loop orders of the original; they enter the seeds
# dps_jax's zeta_coeff on grad ||A x0_hat - y||^2 / err (docs/gmm_benchmark.md §1.7)
ZETA_PROTOCOL = 0.1


def protocol_abar() -> torch.Tensor:
    """abar_t, t = 0..999, of the benchmark: betas = linspace(0.02, 1e-4, 999), DECREASING (the
    usual DDPM betas increase), with abar_0 = 1 prepended (docs/gmm_benchmark.md §1.3)."""
    betas = torch.linspace(0.02, 1e-4, 999, dtype=F64)
    return torch.cumprod(torch.cat([torch.ones(1, dtype=F64), 1 - betas]), 0)


def protocol_timesteps(n_steps, abar) -> list:
    """get_optimal_timesteps_from_singular_values (docs/gmm_benchmark.md §1.4): keep t where
    sqrt(abar) has dropped by a fixed stride since the last kept t, up to the first t with
    sqrt(abar) < 1e-2, then ceil(linspace) to t = 999. The "optimal" entry of the original
    always lands beyond that point and only enters through its count (1), which shortens the
    stride."""
    sq = abar.sqrt()
    end = int((sq < 1e-2).nonzero()[0])
    stride = (sq[0] - sq[end]) / (n_steps - 1 - 1)
    ts, last = [0], sq[0]
    for t in range(1, end):
        if last - sq[t] >= stride:
            ts.append(t)
            last = sq[t]
    tail = torch.linspace(ts[-1], len(abar) - 1, n_steps - len(ts) + 1, dtype=F64)
    return ts + tail.ceil().long().tolist()[1:]


def protocol_schedule(n_steps):
    """The benchmark's timesteps in our sigma space: abar of the n_steps visited t in sampling
    order (999 first, ending at abar_0 = 1: n_steps - 1 transitions, as in dps_jax), sigma_t =
    sqrt((1 - abar_t)/abar_t) (156.6 down to 0), and dps_jax's guidance as our per-step zeta.

    x_ve = x_vp / sqrt(abar_t). The VP start N(0, I) at t = 999 is N(0, (sigma^2 + 1) I) here;
    we start from sigmas[0] randn (contract 2), relative std error 2e-5. Guidance: the protocol
    subtracts (zeta'/err) grad_{x_vp} err^2 = 2 zeta' grad_{x_vp} err from x_vp at t' = t_prev;
    grad_{x_vp} = grad_{x_ve} / sqrt(abar_t) and the result is divided by sqrt(abar_t'), so
    zeta_i = 2 zeta' / sqrt(abar_t abar_t'). Its unguided part, the DDPM posterior mean, is in
    sigma space exactly our eta = 1 ancestral mean (coefficients sigma'^2/sigma^2 on x and
    1 - sigma'^2/sigma^2 on x0_hat), plus eta times the eta = 1 ancestral noise. Our eta < 1
    step draws the same noise but is DDIM(eta): its mean keeps more of x (sigma_down =
    sqrt(sigma'^2 - sigma_up^2) instead of sigma'^2/sigma). So the guidance translates exactly
    at every eta, the whole step only at eta = 1 (tests/test_toy_gmm.py)."""
    abar = protocol_abar()
    a = abar[protocol_timesteps(n_steps, abar)].flip(0)
    return a, ((1 - a) / a).sqrt(), 2 * ZETA_PROTOCOL / (a[:-1] * a[1:]).sqrt()


@torch.no_grad()
def dps_protocol(prior: GMM | LowRankGMM, x, y, A, abars, *, zeta=ZETA_PROTOCOL, eta=1.0,
                 generator=None, callback=None):
    """DPS exactly as MCGdiff's gmm.py runs it (dps_jax, docs/gmm_benchmark.md §1.7), in VP
    coordinates x_vp = sqrt(abar) x0 + sqrt(1 - abar) noise; abars in sampling order. A
    reference for the translation into our dps (protocol_schedule) and a column of the
    benchmark. callback(dict(i=step)) after each step, as the samplers'. Where err = 0 exactly
    (float32 meets it at dy = 1) the particle takes no guidance step; the original's
    grad * (zeta / err) is 0 * inf = nan there."""
    a = abars.tolist()
    for t in range(len(a) - 1):
        at, ap = a[t], a[t + 1]
        q = prior.scaled(at**0.5, (1 - at) ** 0.5)  # q_t, the law of x_vp
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = torch.add(xg, q.score(xg), alpha=1 - at) / at**0.5  # Tweedie in VP
            err = (A(x0_hat) - y).norm(dim=1)
            (grad,) = torch.autograd.grad(err.pow(2).sum(), xg)
        c_x = (at / ap) ** 0.5 * (1 - ap) / (1 - at)  # coeff_sample
        c_0 = ap**0.5 * (1 - at / ap) / (1 - at)  # coeff_pred_x0
        noise = eta * ((1 - ap) / (1 - at) * (1 - at / ap)) ** 0.5
        step = torch.where(err > 0, zeta / err, 0.0)[:, None]  # zeta / err, 0 at err = 0
        # c_x x + c_0 x0_hat + noise eps - step grad (torch.add(a, b, alpha=c): a + c b, one pass)
        x = torch.add(c_x * x, x0_hat.detach(), alpha=c_0)
        x = torch.addcmul(x.add(dmap.noise_like(x, generator), alpha=noise), grad, step, value=-1)
        if callback is not None:
            callback(dict(i=t))
    return x


def protocol_problem(d, dy, weights, generator):
    """generate_measurement_equations (docs/gmm_benchmark.md §1.2, §1.5): 25 unit-covariance
    components on a 5 x 5 grid of spacing 8 tiled to d, A = U diag(s) V^T with s ~ sorted
    U(0, 1), sigma_y = U(0, 1) max(s), y = A x* + sigma_y noise for one prior draw x*."""
    grid = torch.tensor([[-8.0 * i, -8.0 * j] for i in range(-2, 3) for j in range(-2, 3)],
                        dtype=F64)
    prior = GMM.from_cov(weights, grid.repeat(1, d // 2), torch.ones(25, dtype=F64))
    U, _, Vh = torch.linalg.svd(torch.randn(dy, d, generator=generator, dtype=F64),
                                full_matrices=False)
    s = torch.rand(dy, generator=generator, dtype=F64).sort(descending=True).values
    A_mat = U @ torch.diag(s) @ Vh
    x_star = prior.sample(1, generator)[0]
    sigma_y = torch.rand(1, generator=generator, dtype=F64).item() * s.max().item()
    y = A_mat @ x_star + sigma_y * torch.randn(dy, generator=generator, dtype=F64)
    return prior, A_mat, y, sigma_y


def bench_hyper(zeta, eta) -> dict:
    """Per sampler of dmap.SAMPLERS: its hyper-parameters here. The DPS-type methods take the
    protocol's DPS step (per-step zeta); DSG its default rate; all the protocol's eta."""
    return {"ddpm": dict(eta=eta), "dps": dict(zeta=zeta, eta=eta),
            "dsg": dict(zeta=0.08, eta=eta), "dmap": dict(zeta=zeta, eta=eta),
            "freedom": dict(zeta=zeta, eta=eta), "resample": dict(zeta=zeta, eta=eta),
            "psld": dict(zeta=zeta, eta=eta)}


def concentration(prior: GMM, post: GMM, sigmas, n, generator) -> dict:
    """How tightly ||x_{t-1} - mu|| sits at sqrt(d) sigma_up (the premise of DSG and DMAP), per
    step, from exact x_t ~ p(x_t | y): for the unguided ancestral step (chi_d / sqrt(d)) and for
    the exact conditional transition p(x_{t-1} | x_t, y), which is the noisy posterior at
    sigma_{t-1} observed through x_t = x_{t-1} + sqrt(sigma_t^2 - sigma_{t-1}^2) noise. mu is
    the unconditional ancestral mean (eta = 1); the last step (sigma_up = 0) is left out."""
    s, d = sigmas.tolist(), prior.means.shape[1]
    out = dict(unguided=[], exact=[])
    for i in range(len(s) - 2):
        x = post.noisy(s[i]).sample(n, generator)
        x0_hat = prior.denoiser(x, s[i])
        x_next, mu, sigma_up = dmap.ancestral_step(x, x0_hat, s[i], s[i + 1], 1.0, generator)
        exact = post.noisy(s[i + 1]).sample_x0(x, (s[i] ** 2 - s[i + 1] ** 2) ** 0.5, generator)
        for key, v in (("unguided", x_next), ("exact", exact)):
            out[key].append(((v - mu).norm(dim=1) / (math.sqrt(d) * sigma_up)).tolist())
    return out


def bench_cell(steps, eta, ind_steps, d, ind_dim, dy, ind_dy, weights, problems, n, seed,
               methods, conc_n, chunk, dtype, stop):
    """One cell (steps, d, dy) of benchmark(): its rows, in a fixed order, and its concentration
    dict when conc_n > 0. The cell draws from its own generators only, so its numbers do not
    depend on which thread runs it or when. `stop` (a threading.Event) ends it at the next
    sampler step."""
    abars, sigmas, zeta = protocol_schedule(steps)
    hyper = bench_hyper(zeta, eta)

    def check(_):  # sampler callback: the main thread was interrupted
        if stop.is_set():
            raise KeyboardInterrupt

    P = max(1, chunk // (n * d))  # problems per batch
    seeds = [10**6 * seed + 2**ind_dim * 3**ind_dy * 5**ind_steps + i for i in range(problems)]
    cell = [protocol_problem(d, dy, weights, torch.Generator().manual_seed(s)) for s in seeds]
    prior = LowRankGMM.from_gmm(cell[0][0])  # q = 2: the grid's plane
    fast = prior.to(dtype)
    posts = [prior.posterior(A_mat, y, sigma_y) for _, A_mat, y, sigma_y in cell]
    g = torch.Generator().manual_seed(seeds[0])
    refs = [post.sample(n, g) for post in posts]
    sw_to = [metrics.sliced_wasserstein_to(ref, generator=torch.Generator().manual_seed(i))
             for i, ref in enumerate(refs)]  # each problem's directions: seeded by its index
    ref_std = [ref.std(0) for ref in refs]
    for name in ["exact posterior (floor)", "dps_protocol"] + methods:
        for lo in range(0, problems, P):
            group = range(lo, min(lo + P, problems))
            A_mats = torch.stack([cell[i][1] for i in group])
            y = torch.cat([cell[i][2].expand(n, dy) for i in group])
            A, parts = linear_operator(A_mats.to(dtype))
            t0 = time.time()
            if name == "exact posterior (floor)":
                x = torch.cat([posts[i].sample(n, g) for i in group])
            elif name == "dps_protocol":  # from the VP prior N(0, I) at t = 999
                x = torch.randn(len(y), d, generator=g, dtype=F64).to(dtype)
                x = dps_protocol(fast, x, y.to(dtype), A, abars, eta=eta, generator=g,
                                 callback=check)
            else:
                x = float(sigmas[0]) * torch.randn(len(y), d, generator=g, dtype=F64)
                x = dmap.SAMPLERS[name](fast.denoiser, x.to(dtype), y.to(dtype), A, sigmas,
                                        generator=g, callback=check, **hyper[name],
                                        **dmap.model_parts(name, **parts))
            x = x.double()
            seconds = (time.time() - t0) / len(group)
            for j, i in enumerate(group):
                xi = x[j * n:(j + 1) * n]
                yield dict(steps=steps, eta=eta, d=d, dy=dy, problem=i, sigma_y=cell[i][3],
                           method=name, sw=sw_to[i](xi), seconds=seconds,
                           std_ratio=(xi.std(0) / ref_std[i]).mean().item())
    if conc_n:
        yield dict(steps=steps, eta=eta, d=d, dy=dy, problem=0, method="concentration",
                   **concentration(prior, posts[0], sigmas, conc_n, g))


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed blocks for reuse instead of handing them back to the
    system: it otherwise maps every fresh (N, d) tensor (13 MB at 2000 x 800 x 2 problems) anew
    and pays ~3000 page faults for it, 15% of a guided sampler's time here (measured: 1.5M
    page faults per DMAP run, 0.1M with this). The process's memory then stays at its peak,
    which it reaches anyway. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 2**30)  # blocks under 1 GiB come from the heap ...
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ... which is never trimmed


def benchmark(dims, dys, settings, problems, n, seed, methods, conc_n=0, chunk=4 * 10**6,
              dtype=torch.float32, workers=1):
    """The MCGdiff protocol: per (steps, d, dy) `problems` problems with the original seeds
    2^ind_dim 3^ind_dy 5^ind_steps + i (offset by 10^6 seed); SW (100 slices) of n samples of
    each method against n exact posterior samples; the floor is a second exact set. Weights
    randn^2 normalised, one draw per (steps, d) (docs/gmm_benchmark.md §1.2), so the prior is
    shared by the problems of a cell and each sampler runs on several problems at once (about
    `chunk` numbers per batch). The problems, exact posteriors and metric are float64; the
    samplers run in `dtype` (float32: 3x faster at d = 800, SW unchanged at the table's
    precision). Yields one dict per (problem, method), and per (steps, d) one "concentration"
    dict (first problem of its first dy) when conc_n > 0.

    The cells run on `workers` threads, one torch thread each, largest first: the samplers'
    noise (one Gaussian per coordinate per step, a third of the time at d = 800) comes from
    torch's sequential CPU generator, which a cell cannot spread over cores but cells can.
    Rows arrive in the order cells finish; sort_rows puts them in the order of the loops."""
    cells = []
    for ind_steps, (steps, eta) in enumerate(settings):
        for ind_dim, d in enumerate(DIMS):
            if d not in dims:
                continue
            g = torch.Generator().manual_seed(10**6 * seed + 7 * ind_steps + ind_dim)
            weights = torch.randn(25, generator=g, dtype=F64) ** 2
            cells += [(steps, eta, ind_steps, d, ind_dim, dy, ind_dy, weights / weights.sum(),
                       conc_n if dy == dys[0] else 0)
                      for ind_dy, dy in enumerate(DYS) if dy in dys]
    rows, stop, threads = queue.Queue(), threading.Event(), torch.get_num_threads()

    def work(cell):
        try:
            for row in bench_cell(*cell[:8], problems, n, seed, methods, cell[8], chunk, dtype,
                                  stop):
                rows.put(row)
        finally:
            rows.put(None)  # this cell is done (or failed: its future holds why)

    keep_freed_memory()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(work, c) for c in sorted(cells, key=lambda c: -c[0] * c[3])]
        for _ in cells:
            while (row := rows.get()) is not None:
                yield row
        for f in futures:
            f.result()  # re-raises a worker's error
    finally:
        stop.set()
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


def sort_rows(rows) -> list:
    """benchmark() rows in the order of its loops (steps setting, d, dy), the order within a
    cell kept."""
    return sorted(rows, key=lambda r: (r["steps"], DIMS.index(r["d"]), DYS.index(r["dy"])))


# ---------------------------------------------------------------------------------------------
# (5b) A conditional score estimator that is not exact (Sec. 4.2, Prop. 4, Fig. 7): the CSE's
# role in the toy is played by the exact denoiser of a wrong posterior
# ---------------------------------------------------------------------------------------------


def misspecified(prior, A_mat, y, sigma_y) -> dict:
    """CSEs q(x0 | y) that are wrong on purpose, each the exact posterior of a wrong problem:
    y's noise taken 3x too large (too little conditioning); the posterior's components with the
    prior's weights (which mode y picks, ignored); the posterior of a y moved by 3 predictive
    standard deviations (confidently wrong: there the premise of Prop. 4 should fail)."""
    shift = 3 * (sigma_y**2 + (A_mat**2).sum(1) * prior_variance(prior)) ** 0.5
    return {"sigma_y x3": prior.posterior(A_mat, y, 3 * sigma_y),
            "prior weights": prior.posterior(A_mat, y, sigma_y).reweighted(prior.weights),
            "y moved 3 sd": prior.posterior(A_mat, y + shift, sigma_y)}


def prior_variance(prior) -> float:
    """c of isotropic components c I (the MCGdiff and Fig. 8 priors); the largest if they
    differ."""
    if isinstance(prior, LowRankGMM):
        return prior.c
    assert prior.U is None and prior.lam.shape[1] == 1, "isotropic components only"
    return prior.lam.max().item()


def log_evidence(prior, A_mat, y, sigma_y) -> float:
    """log p(y) = log sum_k w_k N(y; A m_k, c A A^T + sigma_y^2 I) for components c I."""
    dy = len(y)
    S = prior_variance(prior) * A_mat @ A_mat.T + sigma_y**2 * torch.eye(dy, dtype=A_mat.dtype)
    normal = torch.distributions.MultivariateNormal(torch.zeros(dy, dtype=A_mat.dtype), S)
    return (prior.weights.log() + normal.log_prob(y - prior.means @ A_mat.T)).logsumexp(0).item()


def prop4(prior, post, q, A_mat, y, sigma_y, sigmas, n, generator) -> dict:
    """Our reading of Prop. 4 (the paper's text was not at hand; the README says so): if the
    CSE's transition is closer to the exact one than the unconditional transition is (cross-
    entropy), a step from it fits y better (expected log-likelihood).

    Per step, from exact x_t ~ p(x_t | y): the cross-entropies H(p, r) = E_{p(x_{t-1} | x_t,
    y)}[-log r(x_{t-1} | x_t)] of the exact conditional transition against the ancestral
    Gaussian r = N(mu, sigma_up^2 I) of the unconditional denoiser ("uncond") and of the CSE
    q ("cse"), per dimension; and the expected log-likelihoods E_r[log p(y | x_{t-1})] of a
    step from each, with log p(y | x) = log p(x | y) - log p(x) + log p(y) (Bayes, exact)."""
    s, d = sigmas.tolist(), prior.means.shape[1]
    evidence = log_evidence(prior, A_mat, y, sigma_y)
    out = {k: [] for k in ("sigma", "H_uncond", "H_cse", "L_uncond", "L_cse", "L_exact")}
    for i in range(len(s) - 2):  # the last step (sigma_up = 0) has no density
        x = post.noisy(s[i]).sample(n, generator)
        exact = post.noisy(s[i + 1]).sample_x0(x, (s[i] ** 2 - s[i + 1] ** 2) ** 0.5, generator)
        out["sigma"].append(s[i])
        state = generator.get_state()
        for key, model in (("uncond", prior), ("cse", q)):
            generator.set_state(state)  # the same noise for both steps: paired differences
            x_next, mu, sigma_up = dmap.ancestral_step(x, model.denoiser(x, s[i]), s[i],
                                                       s[i + 1], 1.0, generator)
            nll = ((exact - mu) ** 2).sum(1) / (2 * sigma_up**2) \
                + d / 2 * math.log(2 * math.pi * sigma_up**2)
            out["H_" + key].append(nll.mean().item() / d)
            out["L_" + key].append(evidence + (post.log_prob(x_next, s[i + 1])
                                               - prior.log_prob(x_next, s[i + 1])).mean().item())
        out["L_exact"].append(evidence + (post.log_prob(exact, s[i + 1])
                                          - prior.log_prob(exact, s[i + 1])).mean().item())
    return out


def cse_problems(d, dy, seed):
    """(g, draw): draw() is the next MCGdiff problem of the CSE study (weights drawn as the
    benchmark draws them), from g, which the caller goes on drawing samples from."""
    g = torch.Generator().manual_seed(10**6 * seed + 99)
    weights = torch.randn(25, generator=g, dtype=F64) ** 2
    return g, lambda: protocol_problem(d, dy, weights / weights.sum(), g)


def cse_benchmark(d, dy, problems, n, seed, steps=20, eta=0.6, callback=None) -> list:
    """Fig. 7 in the toy, on MCGdiff benchmark problems (weights drawn as the benchmark's):
    SW to the exact posterior of the CSE alone (DDPM with q's denoiser), DPS and DMAP from the
    prior's denoiser and from q's (the CSE as their starting point, as DPS+CSE on SD 2.0)."""
    _, sigmas, zeta = protocol_schedule(steps)
    hyper = bench_hyper(zeta, eta)
    g, draw = cse_problems(d, dy, seed)
    rows = []
    for i in range(problems):
        problem = draw()
        prior = LowRankGMM.from_gmm(problem[0])
        post = prior.posterior(*problem[1:])
        ref = post.sample(n, g)
        A, parts = linear_operator(problem[1][None])
        runs = [("dps", "dps", prior), ("dmap", "dmap", prior)]
        for label, q in misspecified(prior, *problem[1:]).items():
            runs += [(f"CSE alone, {label}", "ddpm", q), (f"DPS+CSE, {label}", "dps", q),
                     (f"DMAP+CSE, {label}", "dmap", q)]
        for label, name, model in runs:
            x = float(sigmas[0]) * torch.randn(n, d, generator=g, dtype=F64)
            x = dmap.SAMPLERS[name](model.denoiser, x, problem[2].expand(n, dy), A, sigmas,
                                    generator=g, **hyper[name])
            rows.append(dict(problem=i, method=label, sw=metrics.sliced_wasserstein(
                x, ref, generator=torch.Generator().manual_seed(i))))
            if callback is not None:
                callback(label)
    return rows


def cse_study(problems, n, seed, steps=20, eta=0.6, callback=None) -> dict:
    """Prop. 4 per step on the first d = 8, dy = 1 benchmark problem and Fig. 7's comparison
    on `problems` of them, for each misspecification of `misspecified`."""
    _, sigmas, _ = protocol_schedule(steps)
    problem = cse_problems(8, 1, seed)[1]()  # the first problem of cse_benchmark
    prior = LowRankGMM.from_gmm(problem[0])
    post = prior.posterior(*problem[1:])
    prop = {label: prop4(prior, post, q, *problem[1:], sigmas, n, torch.Generator().manual_seed(
        seed)) for label, q in misspecified(prior, *problem[1:]).items()}
    return dict(prop4=prop, sw=cse_benchmark(8, 1, problems, n, seed, steps, eta, callback))


def cse_tables(study) -> str:
    """Markdown: Prop. 4's premise and conclusion per step, and Fig. 7's SW table."""
    lines = ["Prop. 4 per step (first d = 8, dy = 1 problem, x_t ~ exact p(x_t | y)): premise "
             "H(p, q) < H(p, p_uncond), conclusion E_q log p(y | x) > E_uncond log p(y | x)\n",
             "| CSE | steps | premise holds | conclusion holds | both | premise without "
             "conclusion | mean H uncond / cse (per dim) | mean E log p(y | x) uncond / cse "
             "/ exact |", "|---|---|---|---|---|---|---|---|"]
    for label, o in study["prop4"].items():
        premise = np.array(o["H_cse"]) < np.array(o["H_uncond"])
        conclusion = np.array(o["L_cse"]) > np.array(o["L_uncond"])
        lines.append(f"| {label} | {len(premise)} | {premise.sum()} | {conclusion.sum()} | "
                     f"{(premise & conclusion).sum()} | {(premise & ~conclusion).sum()} | "
                     f"{np.mean(o['H_uncond']):.3f} / {np.mean(o['H_cse']):.3f} | "
                     f"{np.mean(o['L_uncond']):.3f} / {np.mean(o['L_cse']):.3f} / "
                     f"{np.mean(o['L_exact']):.3f} |")
    sw = {}
    for r in study["sw"]:
        sw.setdefault(r["method"], []).append(r["sw"])
    lines += ["", "Fig. 7 in the toy: sliced Wasserstein to the exact posterior, mean ± 95% "
              f"interval over {len(sw['dps'])} problems (d = 8, dy = 1, 20 steps)\n",
              "| method | SW |", "|---|---|"]
    for label, v in sw.items():
        ci = 1.96 * np.std(v) / len(v) ** 0.5
        lines.append(f"| {label} | {np.mean(v):.2f} ± {ci:.2f} |")
    return "\n".join(lines) + "\n"


def draw_cse(study) -> dict:
    """The per-step gaps of Prop. 4, CSE minus unconditional, against sigma."""
    prop = study["prop4"]
    sig = next(iter(prop.values()))["sigma"]
    gap = {k: plot.line_plot({label: (sig, np.subtract(o[f"{k}_cse"], o[f"{k}_uncond"]))
                              for label, o in prop.items()}, logx=True,
                             title=title, xlabel="sigma (sampling runs right to left)",
                             ylabel=ylabel)
           for k, title, ylabel in (
               ("H", "Prop. 4 premise: H(p, q) - H(p, p_uncond) per step\n(below 0: the CSE "
                "is closer to the exact transition)", "cross-entropy gap per dimension"),
               ("L", "Prop. 4 conclusion: E_q log p(y | x) - E_uncond log p(y | x)\n(above 0: "
                "a step from the CSE fits y better)", "expected log-likelihood gap"))}
    return {"cse_cross_entropy.png": gap["H"], "cse_log_likelihood.png": gap["L"]}


# ---------------------------------------------------------------------------------------------
# (6) The figures: what each one shows (plot.py draws them)
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


# ---------------------------------------------------------------------------------------------
# (7) The command line
# ---------------------------------------------------------------------------------------------


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


def benchmark_tables(rows) -> str:
    """Markdown: SW mean ± 1.96 std / sqrt(n) over problems (aggregate_gmm_table.py,
    docs/gmm_benchmark.md §1.6) per (steps, method) x (d, dy); seconds per problem; the
    concentration of ||x_{t-1} - mu|| / (sqrt(d) sigma_up)."""
    results = [r for r in rows if r["method"] != "concentration"]
    out = ""
    for steps, eta in sorted({(r["steps"], r["eta"]) for r in results}):
        cells = sorted({(r["d"], r["dy"]) for r in results if r["steps"] == steps})
        methods = list(dict.fromkeys(r["method"] for r in results))
        out += (f"\n{steps} steps (eta = {eta}): sliced Wasserstein, mean ± 95% interval over "
                "problems (n = problems per cell)\n\n| method | "
                + " | ".join(f"d={d} dy={dy}" for d, dy in cells)
                + " | s/problem |\n" + "|---" * (len(cells) + 2) + "|\n")
        for m in methods:
            sel = [r for r in results if r["steps"] == steps and r["method"] == m]
            out += f"| {m} |"
            for d, dy in cells:
                sw = np.array([r["sw"] for r in sel if (r["d"], r["dy"]) == (d, dy)])
                ci = 1.96 * sw.std() / math.sqrt(len(sw)) if len(sw) > 1 else float("nan")
                out += f" {sw.mean():.2f} ± {ci:.2f} (n={len(sw)}) |"
            out += f" {np.mean([r['seconds'] for r in sel]):.2f} |\n"
    conc = [r for r in rows if r["method"] == "concentration"]
    if conc:
        out += ("\nConcentration of ||x_{t-1} - mu|| / (sqrt(d) sigma_up) over the steps "
                "(first problem of the cell, x_t ~ exact p(x_t | y)): mean; average "
                "within-step std; the worst step's |mean - 1|\n\n| steps | d | unguided | "
                "exact conditional transition |\n|---|---|---|---|\n")
        for r in conc:
            st = []
            for key in ("unguided", "exact"):
                v = np.array(r[key])
                st.append(f"{v.mean():.3f}; {v.std(1).mean():.3f}; "
                          f"{np.abs(v.mean(1) - 1).max():.3f}")
            out += f"| {r['steps']} | {r['d']} | {st[0]} | {st[1]} |\n"
    return out


def write(path: str, value):
    """A figure or a text, atomically (cli.write_atomic): a crash never leaves half a file."""
    if isinstance(value, Image.Image):
        cli.write_atomic(path, value.save)
    else:
        cli.write_text(path, value)


class Parser(argparse.ArgumentParser):
    """argparse that raises ValueError on bad input, so that main prints one `error:` line."""

    def error(self, message):
        raise ValueError(message)


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all",
                        choices=["all", "fig8", "observations", "benchmark", "cse"],
                        help="all: Fig. 8, the observations and a benchmark slice; benchmark: "
                        "the full MCGdiff benchmark; cse: an inexact CSE, Prop. 4 and Fig. 7, "
                        "20-40 s (default: %(default)s)")
    parser.add_argument("--out", default="results/toy_gmm",
                        help="folder for figures and tables (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--sigma-y", type=float, default=1.0,
                        help="likelihood noise that defines the exact posterior of Fig. 8 and "
                        "the observations, > 0 (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per Fig. 8 method (default: 2000; 200 with --quick)")
    parser.add_argument("--problems", type=int, default=None,
                        help="benchmark problems per cell (default: 20; 2 in the slice of "
                        "'all'); problems of the cse part (default: 10; 2 with --quick)")
    parser.add_argument("--dims", type=int, nargs="+", choices=DIMS, default=None,
                        help=f"benchmark dimensions d (default: {' '.join(map(str, DIMS))}; 8 "
                        "in the slice of 'all')")
    parser.add_argument("--dys", type=int, nargs="+", choices=DYS, default=DYS,
                        help="benchmark measurement sizes dy (default: "
                        f"{' '.join(map(str, DYS))})")
    parser.add_argument("--bench-samples", type=int, default=None,
                        help="samples per method and reference in the benchmark and the cse "
                        "part (default: 2000, the protocol's; 100 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $OMP_NUM_THREADS, else the cores "
                        "idle at start; README.md, Threads)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny default sizes and 20 steps, for tests (explicit flags still "
                        "win); numbers are not meaningful")
    args = parser.parse_args(argv)
    for name, quick, full in (("samples", 200, 2000), ("bench_samples", 100, 2000)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name, least in (("samples", 2), ("problems", 1), ("bench_samples", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not args.sigma_y > 0:
        raise ValueError(f"--sigma-y must be > 0, got {args.sigma_y:g} (the noise-free "
                         f"posterior is --sigma-y {NOISE_FREE:g})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder; choose another --out")
    return args


def compute(args, progress) -> dict:
    """Every part that args.part names; returns {file name: figure or text}, written by main.
    progress(desc, total, unit) -> a tqdm bar."""
    steps, outputs, text, summary = 20 if args.quick else 100, {}, "", {}
    if args.part in ("all", "fig8", "observations"):
        bar = progress("Fig. 8: samplers", len(FIG8_RUNS), "run")
        samples = fig8(args.samples, args.sigma_y, args.seed, steps, lambda _: bar.update())
        bar.close()
        outputs["fig8.png"] = draw_fig8(samples, args.sigma_y)
        text = fig8_tables(samples, args.sigma_y)
        prior, A_mat, y = fig8_problem()
        summary["fig8"] = {label: sample_stats(x) for label, x in samples.items()}
        summary["fig8_exact"] = {f"exact, sigma_y={s:g}": exact_stats(prior.posterior(
            A_mat, y, s)) for s in (args.sigma_y, NOISE_FREE)}  # closed form
        print(text)
    if args.part in ("all", "observations"):
        bar = progress("Observation I steps, then II", steps + 1, "step")
        obs = observations(args.sigma_y, 100 if args.quick else 250, 500 if args.quick else 10000,
                           args.seed, steps, lambda _: bar.update())
        bar.close()
        summary["observations"] = obs
        outputs.update(draw_observations(obs, summary["fig8"]))
        tables = observation_tables(obs, samples)
        text += "\n" + tables
        print(tables)
    if args.part in ("all", "benchmark"):
        full = args.part == "benchmark"
        dims = args.dims or (DIMS if full else [8])
        problems = args.problems or (20 if full else 2)
        settings = [(5, 1.0)] if args.quick else SETTINGS
        rows, methods = [], list(dmap.SAMPLERS)
        runs = len(dims) * len(args.dys) * len(settings) * problems * (len(methods) + 2)
        bar = progress("benchmark (problem, method) runs", runs, "run")
        for r in benchmark(dims, args.dys, settings, problems, args.bench_samples, args.seed,
                           methods, conc_n=50 if args.quick else 500,
                           workers=torch.get_num_threads()):
            rows.append(r)
            bar.update(r["method"] != "concentration")
        bar.close()
        rows = sort_rows(rows)
        table = benchmark_tables(rows)
        name = "benchmark" if full else "benchmark_slice"
        outputs[name + ".md"] = f"# MCGdiff GMM benchmark ({'full' if full else 'slice'})\n{table}"
        outputs[name + ".json"] = json.dumps(rows)
        print(table)
    if args.part == "cse":
        problems = args.problems or (2 if args.quick else 10)
        bar = progress("CSE: SW runs", problems * 11, "run")
        study = cse_study(problems, args.bench_samples, args.seed, callback=lambda _: bar.update())
        bar.close()
        outputs.update(draw_cse(study))
        outputs["cse.md"], outputs["cse.json"] = cse_tables(study), json.dumps(study)
        print(outputs["cse.md"])
    elif args.part != "benchmark":
        outputs["summary.md"], outputs["summary.json"] = text, json.dumps(summary)
    return outputs


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bars, written, t0 = [], [], time.time()

    def progress(desc, total, unit):
        bars.append(tqdm(total=total, desc=desc, unit=unit))
        return bars[-1]

    def body():
        try:
            os.makedirs(args.out, exist_ok=True)
            outputs = compute(args, progress)
            for name, value in outputs.items():
                write(os.path.join(args.out, name), value)
                written.append(name)
        except KeyboardInterrupt:
            for bar in bars:
                bar.close()
            where = (f"{bars[-1].desc}, {bars[-1].n} of {bars[-1].total} {bars[-1].unit}s done"
                     if bars and bars[-1].n < bars[-1].total else "writing the outputs")
            done = f"{len(written)} files written, each complete" if written else \
                "nothing written"
            raise KeyboardInterrupt(f"in {where}; {done}") from None
        except OSError as e:  # creating or writing the output folder
            raise ValueError(f"cannot write to --out {args.out} ({e.strerror}); choose another "
                             "--out") from None
        return f"wrote {args.out} in {time.time() - t0:.0f} s"

    return cli.run(body, interrupted="nothing written")


if __name__ == "__main__":
    sys.exit(main())
