"""The exact Gaussian-mixture formulas of toy_gmm.py against autograd, closed forms and Monte
Carlo; the MCGdiff protocol's DPS step against our dps; every sampler on a Gaussian prior."""

import math

import pytest
import torch
from conftest import assert_close

import dmap
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
    # the weights of notes/gmm_benchmark.md §1.6: w'_k ∝ w_k N(y; A m_k, sigma_y^2 I + A C_k A^T)
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


def test_fig8_exact_mode_weights():
    """The lower mode's weight in closed form: 1 / (1 + exp(1 / (sigma_y^2 + 0.09)))."""
    prior, A, y = toy_gmm.fig8_problem()
    for sigma_y in (1e-3, 0.5, 1.0):
        w = prior.posterior(A, y, sigma_y).weights[0].item()
        assert abs(w - 1 / (1 + math.exp(1 / (sigma_y**2 + 0.09)))) < 1e-12
    assert abs(prior.posterior(A, y, 1.0).weights[0] - 0.2855) < 1e-3  # the 0.71/0.29


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


def test_sliced_wasserstein():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1000, 4, generator=g, dtype=F64)
    assert toy_gmm.sliced_wasserstein(a, a) == 0
    v = torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=F64)
    # a shifted copy: each 1-D W1 is exactly |<v, theta>|
    theta = torch.randn(4, 100, generator=torch.Generator().manual_seed(6), dtype=F64)
    expected = (v @ (theta / theta.norm(dim=0))).abs().mean().item()
    sw = toy_gmm.sliced_wasserstein(a + v, a, generator=torch.Generator().manual_seed(6))
    assert abs(sw - expected) < 1e-12
    # two independent samples of the same law: small, and far below the shift's ~ 0.5 |v| d^-1/2
    b = torch.randn(1000, 4, generator=g, dtype=F64)
    assert toy_gmm.sliced_wasserstein(a, b) < 0.1 < expected


def test_protocol_schedule():
    """The adapted 20-step schedule of notes §1.4 and the ends of the sigma schedule."""
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


def gaussian_prior(d=6, dy=2, seed=9):
    """A one-component mixture N(m, 0.5 I), a linear operator and its measurement."""
    g = torch.Generator().manual_seed(seed)
    prior = GMM.from_cov(torch.ones(1, dtype=F64), torch.randn(1, d, generator=g, dtype=F64),
                         torch.full((1,), 0.5, dtype=F64))
    A_mat = torch.randn(dy, d, generator=g, dtype=F64)
    return prior, A_mat, A_mat @ prior.sample(1, g)[0]


# zeta: the un-squared-norm step overshoots once zeta |A|^2 is large (|A| = 2.4 here)
GUIDED = {"dps": dict(zeta=0.1), "dsg": dict(zeta=0.3), "dmap": dict(zeta=0.3),
          "freedom": dict(zeta=0.1), "resample": dict(zeta=0.1), "psld": dict(zeta=0.1)}


@pytest.mark.parametrize("name", [m for m in dmap.SAMPLERS if m != "ddpm"])
def test_guided_samplers_fit_y_better_than_unguided(name):
    assert set(GUIDED) == set(dmap.SAMPLERS) - {"ddpm"}, "a new sampler needs a setting here"
    prior, A_mat, y = gaussian_prior()
    sigmas = dmap.karras_sigmas(30, 0.01, 10.0)
    fit = {}
    for method, hyper in (("ddpm", {}), (name, GUIDED[name])):
        x = toy_gmm.run(method, prior, A_mat, y, sigmas, 200, 0, **hyper)
        fit[method] = (x @ A_mat.T - y).norm(dim=1).mean().item()
    print(fit)
    assert fit[name] < 0.5 * fit["ddpm"]


def test_exact_posterior_of_gaussian_prior_is_the_floor():
    """Exact posterior samples against a second exact set: SW at the Monte Carlo floor."""
    prior, A_mat, y = gaussian_prior()
    post = prior.posterior(A_mat, y, 0.1)
    g = torch.Generator().manual_seed(10)
    a, b, c = post.sample(2000, g), post.sample(2000, g), prior.sample(2000, g)
    assert toy_gmm.sliced_wasserstein(a, b) < 0.1 < toy_gmm.sliced_wasserstein(a, c)


def test_quick_run(tmp_path, monkeypatch):
    """The whole default run at toy sizes writes its figures and tables."""
    monkeypatch.setattr("sys.argv", ["toy_gmm.py", "--quick", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        toy_gmm.main()
    finally:
        torch.set_num_threads(threads)
    for name in ("fig8.png", "observation_1.png", "observation_2.png", "observation_3.png",
                 "summary.md", "summary.json", "benchmark_slice.md", "benchmark_slice.json"):
        assert (tmp_path / name).stat().st_size > 0, name
