"""The MCGdiff Gaussian-mixture benchmark (Cardoso et al., ICLR 2024; docs/gmm_benchmark.md) on
the exact mixtures of toy_gmm.py, and an inexact conditional score estimator on its problems
(Sec. 4.2: Prop. 4 and Fig. 7 in the toy):

    python gmm_benchmark.py         # a slice: its d = 8 cells, 2 problems each (~20 s)
    python gmm_benchmark.py full    # the full benchmark, 9 cells x 2 step settings
                                    # (12-20 min on 2 cores: one cell per core)
    python gmm_benchmark.py full --dims 8 80    # its d = 8, 80 cells only (~3 min)
    python gmm_benchmark.py cse     # an inexact CSE: Prop. 4 per step, Fig. 7 (20-30 s)

In a notebook each part is a function: benchmark(), cse().

Reading order: (1) the benchmark's prior and posteriors as low-rank mixtures (the same exact
formulas as toy_gmm.GMM, cheaper); (2) the protocol: schedule, its own DPS, problems; (3) the
benchmark, run on a pool of threads, and its tables; (4) an inexact CSE (Sec. 4.2); (5) the
command line. The problems, exact posteriors and metric are float64 on the CPU; the
benchmark's samplers run in float32 (3x faster at d = 800; the metric does not move).
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import ctypes
import json
import math
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import dmap
import metrics
import plot
import toy_gmm
from toy_gmm import F64, GMM, linear_operator, row_maps

# ---------------------------------------------------------------------------------------------
# (1) The same formulas when the components differ only inside a q-dimensional subspace (the
# MCGdiff prior: means on a 2-D grid tiled to d, one covariance I; and its posteriors)
# ---------------------------------------------------------------------------------------------


class LowRankGMM:
    """A GMM whose components differ only in span(Q): x = Q xq + x_perp, xq = Q^T x.

    Q (d, q) has orthonormal columns; xq follows `inner`, a GMM in q dimensions (any
    covariances); x_perp = (I - Q Q^T) x is N(0, c (I - Q Q^T)), the same for every component
    and independent of xq. So p(x) = p_inner(Q^T x) N(x_perp; 0, c I_{d-q}): each formula is
    the inner one in q dimensions plus an isotropic term, O(N d q) per call (forward and
    autograd) where GMM's one-basis path is O(N d K). Every mixture of components with one
    shared covariance c I and means in span(Q) is one (from_gmm), and so is its posterior
    (posterior: Q grows by the rows of A). GMM stays the reference (tests/test_gmm_benchmark.py).
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
# (2) The protocol: its schedule, its DPS, its problems (docs/gmm_benchmark.md)
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
    at every eta, the whole step only at eta = 1 (tests/test_gmm_benchmark.py)."""
    abar = protocol_abar()
    a = abar[protocol_timesteps(n_steps, abar)].flip(0)
    return a, dmap.sigma_of_abar(a), 2 * ZETA_PROTOCOL / (a[:-1] * a[1:]).sqrt()


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


# ---------------------------------------------------------------------------------------------
# (3) The benchmark: one cell per thread; its tables
# ---------------------------------------------------------------------------------------------


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
    """One cell (steps, d, dy) of benchmark_rows(): its rows, in a fixed order, and its
    concentration dict when conc_n > 0. The cell draws from its own generators only, so its
    numbers do not depend on which thread runs it or when. `stop` (a threading.Event) ends it
    at the next sampler step."""
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


def benchmark_rows(dims, dys, settings, problems, n, seed, methods, conc_n=0,
                   chunk=4 * 10**6, dtype=torch.float32, workers=1):
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
    """benchmark_rows() rows in the order of its loops (steps setting, d, dy), the order within a
    cell kept."""
    return sorted(rows, key=lambda r: (r["steps"], DIMS.index(r["d"]), DYS.index(r["dy"])))


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


def benchmark(out=None, *, dims=DIMS, dys=DYS, problems=20, samples=2000, seed=0,
              settings=SETTINGS, conc_n=500, methods=None, workers=None, full=True,
              progress=toy_gmm.tqdm_bar) -> dict:
    """The MCGdiff benchmark (benchmark_rows) over the cells d x dy x (steps, eta) of `dims`,
    `dys` and `settings`: `problems` problems per cell, `samples` samples per method and
    reference, the concentration with conc_n samples per step, every sampler of dmap.SAMPLERS
    (or `methods`), on `workers` threads (None: torch's number of threads). Returns
    dict(rows=its rows in loop order, table=markdown, files={"benchmark.md", "benchmark.json"});
    full=False names the files benchmark_slice.* (the slice of `python gmm_benchmark.py`:
    dims=[8], problems=2). The files are written into `out` when it is given.
    progress(desc, total, unit) -> a bar."""
    methods = list(dmap.SAMPLERS) if methods is None else methods
    runs = len(dims) * len(dys) * len(settings) * problems * (len(methods) + 2)
    bar, rows = progress("benchmark (problem, method) runs", runs, "run"), []
    for r in benchmark_rows(dims, dys, settings, problems, samples, seed, methods, conc_n=conc_n,
                            workers=workers or torch.get_num_threads()):
        rows.append(r)
        bar.update(r["method"] != "concentration")
    bar.close()
    rows = sort_rows(rows)
    table, name = benchmark_tables(rows), "benchmark" if full else "benchmark_slice"
    files = {name + ".md": f"# MCGdiff GMM benchmark ({'full' if full else 'slice'})\n{table}",
             name + ".json": json.dumps(rows)}
    if out is not None:
        toy_gmm.save(out, files)
    return dict(rows=rows, table=table, files=files)


# ---------------------------------------------------------------------------------------------
# (4) A conditional score estimator that is not exact (Sec. 4.2, Prop. 4, Fig. 7): the CSE's
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


def cse(out=None, *, problems=10, samples=2000, seed=0, steps=20, eta=0.6,
        progress=toy_gmm.tqdm_bar) -> dict:
    """The inexact CSE (cse_study): Prop. 4 per step and Fig. 7's comparison on `problems`
    d = 8, dy = 1 problems, `samples` samples per run and reference, `steps` protocol steps at
    `eta`. Returns dict(study=cse_study's dict, table=markdown, files={"cse_cross_entropy.png",
    "cse_log_likelihood.png", "cse.md", "cse.json"}); the files are written into `out` when it
    is given. progress(desc, total, unit) -> a bar."""
    bar = progress("CSE: SW runs", problems * 11, "run")
    study = cse_study(problems, samples, seed, steps, eta, callback=lambda _: bar.update())
    bar.close()
    files = draw_cse(study)
    files["cse.md"], files["cse.json"] = cse_tables(study), json.dumps(study)
    if out is not None:
        toy_gmm.save(out, files)
    return dict(study=study, table=files["cse.md"], files=files)


# ---------------------------------------------------------------------------------------------
# (5) The command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = toy_gmm.command_line(__doc__, ["slice", "full", "cse"],
                             "slice: the benchmark's d = 8 cells, 2 problems each; full: the "
                             "whole benchmark; cse: an inexact CSE, Prop. 4 and Fig. 7")
    p.add_argument("--problems", type=int, default=None,
                   help="problems per benchmark cell, or of the cse part (default: 2 for "
                   "slice, 20 for full, 10 for cse; 2 for cse with --quick)")
    p.add_argument("--dims", type=int, nargs="+", choices=DIMS, default=None,
                   help="benchmark dimensions d (default: 8 for slice, "
                   f"{' '.join(map(str, DIMS))} for full)")
    p.add_argument("--dys", type=int, nargs="+", choices=DYS, default=DYS,
                   help=f"benchmark measurement sizes dy (default: {' '.join(map(str, DYS))})")
    p.add_argument("--bench-samples", type=int, default=None,
                   help="samples per method and reference in the benchmark and the cse part "
                   "(default: 2000, the protocol's; 100 with --quick)")
    args = p.parse_args(argv)
    toy_gmm.check_flags(p, args.out, problems=(args.problems, 1),
                        bench_samples=(args.bench_samples, 1), threads=(args.threads, 1))
    if args.problems is None:
        args.problems = dict(slice=2, full=20, cse=2 if args.quick else 10)[args.part]
    if args.dims is None:
        args.dims = DIMS if args.part == "full" else [8]
    if args.bench_samples is None:
        args.bench_samples = 100 if args.quick else 2000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def parts(progress):
        if args.part == "cse":
            r = cse(problems=args.problems, samples=args.bench_samples, seed=args.seed,
                    progress=progress)
        else:
            r = benchmark(dims=args.dims, dys=args.dys, problems=args.problems,
                          samples=args.bench_samples, seed=args.seed,
                          settings=[(5, 1.0)] if args.quick else SETTINGS,
                          conc_n=50 if args.quick else 500, full=args.part == "full",
                          progress=progress)
        print(r["table"])
        return r["files"]

    return cli.run(lambda: toy_gmm.write_parts(args.out, parts, args.threads),
                   interrupted="nothing written")


if __name__ == "__main__":
    sys.exit(main())
