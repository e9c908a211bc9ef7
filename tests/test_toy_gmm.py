"""The exact Gaussian-mixture formulas of toy_gmm.py against autograd, closed forms and Monte
Carlo; the MCGdiff protocol's DPS step against our dps. (Every sampler fitting y on a Gaussian
prior: tests/test_samplers.py.)"""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import ImageColor

import dmap
import metrics
import plot
import toy_gmm
from toy_gmm import F64, GMM


def random_gmm(kind, K=3, d=3, seed=0):
    """A mixture with scalar, diagonal or full covariances."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(K, generator=g, dtype=F64) + 0.2
    means = 2 * torch.randn(K, d, generator=g, dtype=F64)
    if kind == "scalar":
        cov = torch.rand(K, generator=g, dtype=F64) + 0.2
    elif kind == "diag":
        cov = torch.rand(K, d, generator=g, dtype=F64) + 0.2
    else:
        B = torch.randn(K, d, d, generator=g, dtype=F64)
        cov = B @ B.mT / d + 0.2 * torch.eye(d, dtype=F64)
    return GMM.from_cov(weights / weights.sum(), means, cov)


def torch_mixture(gmm: GMM, sigma=0.0):
    """The same mixture as torch.distributions, the reference for log_prob."""
    cov = gmm.cov + sigma**2 * torch.eye(gmm.means.shape[1], dtype=F64)
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(gmm.weights),
        torch.distributions.MultivariateNormal(gmm.means, cov))


KINDS = ["scalar", "diag", "full"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_log_prob_and_score(kind, sigma):
    gmm = random_gmm(kind)
    x = 2 * torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert_close(gmm.log_prob(x, sigma), torch_mixture(gmm, sigma).log_prob(x), 1e-12,
                 what="log p_sigma")
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    assert_close(gmm.score(x, sigma), grad, 1e-10, what="score = autograd of log p")
    if sigma > 0:  # Tweedie: x0_hat = x + sigma^2 score
        assert_close(gmm.denoiser(x, sigma), x + sigma**2 * gmm.score(x, sigma), 1e-10,
                     what="Tweedie")


@pytest.mark.parametrize("kind", KINDS)
def test_denoiser_against_importance_sampling(kind):
    """E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(x; x0_i, sigma^2), x0_i ~ prior."""
    gmm, sigma = random_gmm(kind), 0.8
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample(400_000, g)
    x = gmm.sample(5, g) + sigma * torch.randn(5, 3, generator=g, dtype=F64)
    logw = -((x[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # (5, M)
    w = (logw - logw.logsumexp(1, keepdim=True)).exp()
    assert_close(gmm.denoiser(x, sigma), w @ x0, 0.02, rel=False, what="denoiser vs IS")
    # and exact samples of p(x0 | x) average to the denoiser
    draws = gmm.sample_x0(x.repeat_interleave(40_000, 0), sigma, g).view(5, 40_000, 3)
    assert_close(draws.mean(1), gmm.denoiser(x, sigma), 0.02, rel=False,
                 what="mean of sample_x0 vs denoiser")


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_closed_form_and_importance_sampling(kind):
    gmm, sigma_y = random_gmm(kind), 0.5
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 3, generator=g, dtype=F64)
    y = A @ gmm.sample(1, g)[0] + sigma_y * torch.randn(2, generator=g, dtype=F64)
    post = gmm.posterior(A, y, sigma_y)
    # the weights of docs/gmm_benchmark.md §1.6: w'_k ∝ w_k N(y; A m_k, sigma_y^2 I + A C_k A^T)
    S = A @ gmm.cov @ A.T + sigma_y**2 * torch.eye(2, dtype=F64)
    logw = gmm.weights.log() + torch.distributions.MultivariateNormal(
        gmm.means @ A.T, S).log_prob(y)
    assert_close(post.weights, (logw - logw.logsumexp(0)).exp(), 1e-12, what="weights")
    # importance sampling: x0_i ~ prior, weights N(y; A x0_i, sigma_y^2)
    x0 = gmm.sample(400_000, g)
    logw = -((x0 @ A.T - y) ** 2).sum(-1) / (2 * sigma_y**2)
    w = (logw - logw.logsumexp(0)).exp()
    assert_close(post.weights, w @ gmm.responsibilities(x0), 0.01, rel=False,
                 what="weights vs IS")
    assert_close(post.weights @ post.means, w @ x0, 0.02, rel=False, what="mean vs IS")
    # exact posterior samples: their moments against the mixture's
    xs = post.sample(400_000, g)
    mean = post.weights @ post.means
    second = torch.einsum("k,kde->de", post.weights,
                          post.cov + post.means[:, :, None] * post.means[:, None])
    assert_close(xs.mean(0), mean, 0.01, rel=False, what="sample mean")
    assert_close(xs.T @ xs / len(xs), second, 0.02, what="sample second moment")


def test_isotropic_posterior_equals_general():
    """The one-SVD path for isotropic components (shared basis) against the general Kalman form."""
    gmm = random_gmm("scalar", K=4, d=5)
    full = GMM.from_cov(gmm.weights, gmm.means,
                        gmm.lam[:, :, None] * torch.eye(5, dtype=F64))
    A = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1.0, -2.0], dtype=F64)
    iso, gen = gmm.posterior(A, y, 0.3), full.posterior(A, y, 0.3)
    assert iso.U.shape == (1, 5, 5) and gen.U.shape == (4, 5, 5)
    assert_close(iso.weights, gen.weights, 1e-12, what="weights")
    assert_close(iso.means, gen.means, 1e-12, what="means")
    assert_close(iso.cov, gen.cov, 1e-12, what="covariances")
    x = torch.randn(7, 5, dtype=F64)
    assert_close(iso.score(x, 0.4), gen.score(x, 0.4), 1e-10, what="noisy posterior score")


def low_rank_pair(kind, d=300):
    """A reference GMM with one isotropic covariance and means in a low-dimensional span, its
    LowRankGMM and a measurement (A, y, sigma_y): "random", 6 means in a random 3-D span of R^d,
    covariance 0.7 I; "protocol", the benchmark prior (d = 800, q = 2) and a dy = 4 problem."""
    g = torch.Generator().manual_seed(12)
    if kind == "random":
        basis = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=F64))[0]  # (d, 3)
        weights = torch.rand(6, generator=g, dtype=F64) + 0.2
        means = 3 * torch.randn(6, 3, generator=g, dtype=F64) @ basis.T
        ref = GMM.from_cov(weights / weights.sum(), means, torch.full((6,), 0.7, dtype=F64))
        A, sigma_y = torch.randn(2, d, generator=g, dtype=F64) / d**0.5, 0.3
        y = A @ ref.sample(1, g)[0] + sigma_y * torch.randn(2, generator=g, dtype=F64)
    else:
        weights = torch.randn(25, generator=g, dtype=F64) ** 2
        ref, A, y, sigma_y = toy_gmm.protocol_problem(800, 4, weights / weights.sum(), g)
    return ref, toy_gmm.LowRankGMM.from_gmm(ref), A, y, sigma_y


@pytest.mark.parametrize("kind", ["random", "protocol"])
def test_low_rank_equals_reference(kind):
    """LowRankGMM against GMM, the reference path, in float64: max error <= 1e-10 x the largest
    reference value (responsibilities, weights: absolute 1e-10) for log_prob,
    responsibilities, score, denoiser and the vector-Jacobian products of both (what the
    samplers' autograd takes), at sigma 0 to 150 (the benchmark starts at 156.6), for the
    prior, its posterior and the VP marginal q_t (scaled) of dps_protocol."""
    ref, low, A, y, sigma_y = low_rank_pair(kind)
    assert low.Q.shape[1] == (3 if kind == "random" else 2)
    assert_close(low.means, ref.means, 1e-12, what="means")
    post_ref, post_low = ref.posterior(A, y, sigma_y), low.posterior(A, y, sigma_y)
    assert post_low.Q.shape[1] == low.Q.shape[1] + len(A)
    assert_close(post_low.weights, post_ref.weights, 1e-10, rel=False, what="posterior weights")
    assert_close(post_low.means, post_ref.means, 1e-10, what="posterior means")
    pairs = [("prior", ref, low), ("posterior", post_ref, post_low),
             ("q_t", ref.scaled(0.3, 0.95), low.scaled(0.3, 0.95))]
    g = torch.Generator().manual_seed(13)
    for sigma in (0.0, 0.1, 1.0, 10.0, 150.0):
        for name, a, b in pairs:
            tag = f"{name}, sigma={sigma:g}"
            x = a.noisy(sigma).sample(32, g).requires_grad_(True)
            assert_close(b.log_prob(x, sigma), a.log_prob(x, sigma), 1e-10, what=f"log_prob {tag}")
            assert_close(b.responsibilities(x, sigma), a.responsibilities(x, sigma), 1e-10,
                         rel=False, what=f"responsibilities {tag}")
            assert_close(b.score(x, sigma), a.score(x, sigma), 1e-10, what=f"score {tag}")
            x0_hat_a, x0_hat_b = a.denoiser(x, sigma), b.denoiser(x, sigma)
            assert_close(x0_hat_b, x0_hat_a, 1e-10, what=f"denoiser {tag}")
            v = torch.randn(x.shape, generator=g, dtype=F64)
            (vjp_a,) = torch.autograd.grad((x0_hat_a * v).sum(), x)
            (vjp_b,) = torch.autograd.grad((x0_hat_b * v).sum(), x)
            assert_close(vjp_b, vjp_a, 1e-10, what=f"v^T d x0_hat / dx {tag}")
            (vjp_a,) = torch.autograd.grad((a.score(x, sigma) * v).sum(), x)  # dps_protocol's
            (vjp_b,) = torch.autograd.grad((b.score(x, sigma) * v).sum(), x)
            assert_close(vjp_b, vjp_a, 1e-10, what=f"v^T d score / dx {tag}")


def test_low_rank_sampling():
    """LowRankGMM's exact samplers against the reference mixture: the moments of sample() for
    the prior and the posterior against their closed forms; sample_x0 draws against the
    reference's draws (mean and covariance) and the denoiser."""
    ref, low, A, y, sigma_y = low_rank_pair("random", d=12)
    g = torch.Generator().manual_seed(14)
    for a, b in ((ref, low), (ref.posterior(A, y, sigma_y), low.posterior(A, y, sigma_y))):
        xs = b.sample(400_000, g)
        second = torch.einsum("k,kde->de", a.weights,
                              a.cov + a.means[:, :, None] * a.means[:, None])
        assert_close(xs.mean(0), a.weights @ a.means, 0.02, rel=False, what="sample mean")
        assert_close(xs.T @ xs / len(xs), second, 0.02, what="sample second moment")
    sigma = 0.8
    x = ref.noisy(sigma).sample(4, g).repeat_interleave(50_000, 0)
    draws = {name: gmm.sample_x0(x, sigma, g).view(4, 50_000, 12) for name, gmm in
             (("reference", ref), ("low rank", low))}
    assert_close(draws["low rank"].mean(1), low.denoiser(x[::50_000], sigma), 0.03, rel=False,
                 what="mean of sample_x0 vs denoiser")
    cov = {name: torch.einsum("bnd,bne->bde", v - v.mean(1, keepdim=True),
                              v - v.mean(1, keepdim=True)) / 50_000
           for name, v in draws.items()}
    assert_close(cov["low rank"], cov["reference"], 0.03, rel=False,
                 what="covariance of sample_x0 draws")


def test_low_rank_needs_one_isotropic_covariance():
    with pytest.raises(ValueError, match="one isotropic covariance"):
        toy_gmm.LowRankGMM.from_gmm(random_gmm("scalar"))  # three different scalars


def test_fig8_exact_mode_weights():
    """The lower mode's weight in closed form: 1 / (1 + exp(1 / (sigma_y^2 + 0.09)))."""
    prior, A, y = toy_gmm.fig8_problem()
    for sigma_y in (1e-3, 0.5, 1.0):
        w = prior.posterior(A, y, sigma_y).weights[0].item()
        assert abs(w - 1 / (1 + math.exp(1 / (sigma_y**2 + 0.09)))) < 1e-12
    assert abs(prior.posterior(A, y, 1.0).weights[0] - 0.2855) < 1e-3  # the 0.71/0.29


def test_fig8_key_names_every_panel_fill(monkeypatch):
    """Fig. 8's key says the filled regions are the noise-free posterior (x1 std 0.001 about
    0.5, drawn a pixel or two wide): in every panel, the exact ones too, the blue shades lie
    only there and the swatch's colour is among them; the sigma_y = 1 posterior is the orange
    outline in every panel."""
    monkeypatch.setattr(plot, "image_grid", lambda rows, **_: rows)
    x = torch.full((2, 2), 2.4, dtype=F64)  # a corner: no dot over the regions
    rows = toy_gmm.draw_fig8({"exact, sigma_y=1": x, "exact, sigma_y=0.001": x,
                              "DPS zeta=0.05": x}, 1.0)
    *panels, key = [p for row in rows for p in row]
    swatch = key.getpixel((15, 13))  # draw_legend: the first entry's swatch
    shades = np.array(plot.SHADES[1:])
    for j, panel in enumerate(panels):
        left, top, right, bottom = panel.info["boxes"]["data"]
        inside = np.asarray(panel)[top + 1:bottom, left + 1:right]
        filled = (inside[..., None, :] == shades).all(-1).any(-1)
        x1 = toy_gmm.LIM[0] + (np.flatnonzero(filled.any(0)) + 0.5) / filled.shape[1] * 5
        assert filled.any() and np.abs(x1 - 0.5).max() < 0.05, (j, x1.min(), x1.max())
        assert (inside == swatch).all(-1).any(), j
        assert (inside == ImageColor.getrgb(plot.COLORS[3])).all(-1).any(), j


def test_implied_score_of_dps():
    """The guided step as an ancestral step with a modified score: s - zeta g / (sigma^2 -
    sigma_next^2) for dps; the unconditional score for ddpm; zero Monte Carlo variance."""
    prior, A_mat, y = toy_gmm.fig8_problem()
    x = prior.noisy(1.0).sample(50, torch.Generator().manual_seed(11))
    _, _, g = dmap.measurement_grad(prior.denoiser, x, 1.0, y[None], lambda x0: x0 @ A_mat.T)
    score, mc_var = toy_gmm.implied_score("dps", prior, A_mat, y, x, 1.0, 0.8, 0, repeats=4,
                                          zeta=0.05)
    assert_close(score, prior.score(x, 1.0) - 0.05 * g / (1.0 - 0.64), 1e-10, what="dps")
    assert float(mc_var.max()) < 1e-20
    score, _ = toy_gmm.implied_score("ddpm", prior, A_mat, y, x, 1.0, 0.8, 0, repeats=1)
    assert_close(score, prior.score(x, 1.0), 1e-12, what="ddpm")


def test_protocol_schedule():
    """The adapted 20-step schedule (docs/gmm_benchmark.md §1.4); the ends of the sigmas."""
    abar = toy_gmm.protocol_abar()
    assert toy_gmm.protocol_timesteps(20, abar) == [0, 6, 13, 20, 28, 36, 45, 55, 66, 78, 92,
                                                    108, 127, 151, 182, 226, 299, 510, 755, 999]
    assert abs(abar[999].item() - 4.08e-5) < 1e-7 and abs(abar[100].item() - 0.147) < 1e-3
    a, sigmas, zeta = toy_gmm.protocol_schedule(100)  # 100 timesteps with t = 0: 99 transitions
    assert len(sigmas) == 100 and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert len(zeta) == 99 and a[0] == abar[999] and a[-1] == 1


@pytest.mark.parametrize("t, t_prev", [(226, 182), (755, 510), (6, 0)])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_protocol_dps_step_equals_our_dps(t, t_prev, eta):
    """One step of the transcribed dps_jax (VP) against dmap.dps (VE) with the translated zeta:
    the guidance term always; the whole step for eta = 1 (for eta < 1 the protocol keeps the
    DDPM mean while our ancestral step is DDIM(eta))."""
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(25, generator=g, dtype=F64) ** 2
    prior, A_mat, y, _ = toy_gmm.protocol_problem(8, 2, weights / weights.sum(), g)
    abar = toy_gmm.protocol_abar()
    a = abar[[t, t_prev]]
    sigmas = ((1 - a) / a).sqrt()
    x_ve = sigmas[0] * torch.randn(50, 8, generator=g, dtype=F64)
    A = lambda x0: x0 @ A_mat.T  # noqa: E731

    def protocol(zeta):  # returns the VE state
        x = dps_x_vp = a[0].sqrt() * x_ve
        x = toy_gmm.dps_protocol(prior, dps_x_vp, y[None], A, a, zeta=zeta, eta=eta,
                                 generator=torch.Generator().manual_seed(8))
        return x / a[1].sqrt()

    def ours(zeta):
        return dmap.dps(prior.denoiser, x_ve, y[None], A, sigmas, zeta=zeta, eta=eta,
                        generator=torch.Generator().manual_seed(8))

    zeta = 2 * toy_gmm.ZETA_PROTOCOL / (a[0] * a[1]).sqrt()
    assert_close(ours(zeta[None]) - ours(0.0), protocol(0.1) - protocol(0.0), 1e-8,
                 what="guidance term")
    if eta == 1.0:
        assert_close(ours(zeta[None]), protocol(0.1), 1e-9, what="whole step")


@pytest.mark.parametrize("P, dy", [(1, 1), (3, 2), (2, 4)])
def test_batched_operator(P, dy):
    """linear_operator: rows of problem p see A_mats[p]; adjoint is the true adjoint per
    problem; and the hand-written gradients of A and of adjoint (each the other) are right, as
    gradcheck finds."""
    g = torch.Generator().manual_seed(P)
    A_mats = torch.randn(P, dy, 7, generator=g, dtype=F64)
    A, parts = toy_gmm.linear_operator(A_mats)
    x, v = torch.randn(4 * P, 7, generator=g, dtype=F64), torch.randn(4 * P, dy, generator=g,
                                                                       dtype=F64)
    assert_close(A(x), torch.cat([x[4 * p:4 * p + 4] @ A_mats[p].T for p in range(P)]), 1e-14)
    assert_close(parts["adjoint"](v), torch.cat([v[4 * p:4 * p + 4] @ A_mats[p]
                                                 for p in range(P)]), 1e-14)
    assert torch.autograd.gradcheck(A, (x.requires_grad_(True),))
    assert torch.autograd.gradcheck(parts["adjoint"], (v.requires_grad_(True),))


def gaussian_prior(d=6, dy=2, seed=9):
    """A one-component mixture N(m, 0.5 I), a linear operator and its measurement."""
    g = torch.Generator().manual_seed(seed)
    prior = GMM.from_cov(torch.ones(1, dtype=F64), torch.randn(1, d, generator=g, dtype=F64),
                         torch.full((1,), 0.5, dtype=F64))
    A_mat = torch.randn(dy, d, generator=g, dtype=F64)
    return prior, A_mat, A_mat @ prior.sample(1, g)[0]


def test_exact_posterior_of_gaussian_prior_is_the_floor():
    """Exact posterior samples against a second exact set: SW at the Monte Carlo floor."""
    prior, A_mat, y = gaussian_prior()
    post = prior.posterior(A_mat, y, 0.1)
    g = torch.Generator().manual_seed(10)
    a, b, c = post.sample(2000, g), post.sample(2000, g), prior.sample(2000, g)
    assert metrics.sliced_wasserstein(a, b) < 0.1 < metrics.sliced_wasserstein(a, c)


def test_quick_run(tmp_path):
    """The whole default run at toy sizes writes its figures and tables, and its exact rows
    are the closed form: x2 is untouched by y, so P(x2 < 0) = w_0 Phi(1/0.3) + w_1 Phi(-1/0.3)
    with w_0 = 1 / (1 + exp(1 / (sigma_y^2 + 0.09))), and E[x1] = sum_k w_k (m_k + 0.09 /
    (0.09 + sigma_y^2) (0.5 - m_k)), m = -1, 1; its exact samples agree within 5 standard
    errors."""
    assert toy_gmm.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("fig8.png", "observation_1.png", "observation_2.png", "observation_3.png",
                 "summary.md", "summary.json", "benchmark_slice.md", "benchmark_slice.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    for sigma_y in (1.0, toy_gmm.NOISE_FREE):
        w0 = 1 / (1 + math.exp(1 / (sigma_y**2 + 0.09)))
        phi = 0.5 * math.erfc((1 / 0.3) / math.sqrt(2))  # Phi(-1/0.3)
        lower = w0 * (1 - phi) + (1 - w0) * phi
        gain = 0.09 / (0.09 + sigma_y**2)
        mean_x1 = w0 * (-1 + gain * 1.5) + (1 - w0) * (1 - gain * 0.5)
        label = f"exact, sigma_y={sigma_y:g}"
        exact, sampled = summary["fig8_exact"][label], summary["fig8"][label]
        assert abs(exact["lower"] - lower) < 1e-12 and abs(exact["mean_x1"] - mean_x1) < 1e-12
        assert abs(sampled["lower"] - lower) < 5 * math.sqrt(lower * (1 - lower) / 200) + 1e-9
        assert abs(sampled["mean_x1"] - mean_x1) < 5 * exact["std_x1"] / math.sqrt(200)
    assert len(summary["observations"]["sigmas"]) == 20


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "--samples must be >= 2, got 0"),
    (["--samples", "-5"], "--samples must be >= 2, got -5"),
    (["--problems", "0"], "--problems must be >= 1, got 0"),
    (["--bench-samples", "-1"], "--bench-samples must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--dims", "7"], "argument --dims: invalid choice: 7"),
    (["--sigma-y", "0"], "--sigma-y must be > 0, got 0"),
    (["--sigma-y", "-1"], "--sigma-y must be > 0, got -1"),
    (["--samples", "many"], "argument --samples: invalid int value: 'many'"),
    (["--out", "FILE"], "is a file, not a folder"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    """One `error:` line on stderr and exit code 2, before any work."""
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    assert toy_gmm.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_explicit_flag_beats_quick(tmp_path):
    assert toy_gmm.parse_args(["--quick"]).samples == 200
    assert toy_gmm.main(["fig8", "--quick", "--samples", "30", "--out", str(tmp_path)]) == 0
    assert "Samples (30 each" in (tmp_path / "summary.md").read_text()


def test_interrupt_writes_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the observations: exit 130, one line naming the part and step, no files."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_gmm, "observations", interrupted)
    out = tmp_path / "o"
    assert toy_gmm.main(["observations", "--quick", "--samples", "10", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("interrupted in Observation I steps, then II, 0 of 21 steps done; "
                       "nothing written"), err[-1]
    assert list(out.iterdir()) == []


def test_log_likelihood_by_bayes_equals_direct():
    """prop4's log p(y | x_sigma) = log p(x | y) - log p(x) + log p(y) (log_evidence) equals the
    direct mixture sum_k r_k(x) N(y; A m_k(x), v A A^T + sigma_y^2 I), with the component
    posterior m_k(x) = (c x + sigma^2 m_k) / (c + sigma^2), v = c sigma^2 / (c + sigma^2)."""
    prior, A_mat, y = toy_gmm.fig8_problem()
    A_mat, sigma_y, sigma = A_mat[:1], 0.7, 0.9  # one measured coordinate
    y = y[:1]
    post = prior.posterior(A_mat, y, sigma_y)
    x = prior.noisy(sigma).sample(50, torch.Generator().manual_seed(0))
    bayes = (post.log_prob(x, sigma) - prior.log_prob(x, sigma)
             + toy_gmm.log_evidence(prior, A_mat, y, sigma_y))
    c = prior.lam[:, 0]  # (K,)
    m = (c[:, None, None] * x + sigma**2 * prior.means[:, None]) / (c + sigma**2)[:, None, None]
    v = c * sigma**2 / (c + sigma**2)
    var = v * (A_mat**2).sum() + sigma_y**2  # (K,)
    log_n = -0.5 * ((y - m @ A_mat.T)[..., 0] ** 2 / var[:, None] + torch.log(2 * math.pi * var)
                    [:, None])  # (K, N)
    direct = (prior.responsibilities(x, sigma).T.log() + log_n).logsumexp(0)
    assert_close(bayes, direct, 1e-10, what="log p(y | x)")


def test_cse_study_quick():
    """The misspecified CSEs are what they say (the sigma_y x3 one is the posterior at 3 sigma_y;
    the reweighted one keeps the posterior's components) and the Prop. 4 record is complete and
    finite."""
    prior, A_mat, y = toy_gmm.fig8_problem()
    qs = toy_gmm.misspecified(prior, A_mat, y, 1.0)
    three = prior.posterior(A_mat, y, 3.0)
    assert torch.equal(qs["sigma_y x3"].means, three.means)
    post = prior.posterior(A_mat, y, 1.0)
    assert torch.equal(qs["prior weights"].means, post.means)
    assert torch.equal(qs["prior weights"].weights, prior.weights)
    out = toy_gmm.prop4(prior, post, post, A_mat, y, 1.0, toy_gmm.fig8_sigmas(10), 500,
                        torch.Generator().manual_seed(0))
    assert all(len(v) == 9 and all(math.isfinite(u) for u in v) for v in out.values())
    # the exact posterior as the CSE: its step is closer to the exact transition on average
    assert sum(out["H_cse"]) < sum(out["H_uncond"])
