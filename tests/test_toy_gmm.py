"""The exact Gaussian-mixture formulas of toy_gmm.py against autograd, closed forms and Monte
Carlo; its parts and its command line, and the command line it shares with gmm_benchmark.py.
(The benchmark: tests/test_gmm_benchmark.py; every sampler fitting y on a Gaussian prior:
tests/test_samplers.py.)"""

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import ImageColor
from tqdm import tqdm

import dmap
import gmm_benchmark
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
    """The whole default run at toy sizes writes its figures and tables (the benchmark's are
    gmm_benchmark.py's), and its exact rows
    are the closed form: x2 is untouched by y, so P(x2 < 0) = w_0 Phi(1/0.3) + w_1 Phi(-1/0.3)
    with w_0 = 1 / (1 + exp(1 / (sigma_y^2 + 0.09))), and E[x1] = sum_k w_k (m_k + 0.09 /
    (0.09 + sigma_y^2) (0.5 - m_k)), m = -1, 1; its exact samples agree within 5 standard
    errors."""
    assert toy_gmm.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("fig8.png", "observation_1.png", "observation_2.png", "observation_3.png",
                 "summary.md", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob("benchmark*"))
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
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["benchmark"], "argument part: invalid choice: 'benchmark'"),
    (["--sigma-y", "0"], "--sigma-y must be > 0, got 0"),
    (["--sigma-y", "-1"], "--sigma-y must be > 0, got -1"),
    (["--samples", "many"], "argument --samples: invalid int value: 'many'"),
    (["--out", "FILE"], "is a file, not a folder"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    """The usage and one `error:` line on stderr, exit code 2, before any work."""
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        toy_gmm.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "o")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage: ") and err[1].startswith("error: ") \
        and message in err[1], err
    assert not (tmp_path / "o").exists()


def test_explicit_flag_beats_quick(tmp_path):
    assert toy_gmm.parse_args(["--quick"]).samples == 200
    assert toy_gmm.main(["fig8", "--quick", "--samples", "30", "--out", str(tmp_path)]) == 0
    assert "Samples (30 each" in (tmp_path / "summary.md").read_text()


def test_interrupt_writes_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the observations: exit 130, one line naming the part and step, no files."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_gmm, "observation_scores", interrupted)
    out = tmp_path / "o"
    assert toy_gmm.main(["observations", "--quick", "--samples", "10", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("interrupted in Observation I steps, then II, 0 of 21 steps done; "
                       "nothing written"), err[-1]
    assert list(out.iterdir()) == []


def test_parts_as_functions(tmp_path):
    """fig8() and observations() called as a notebook would: what they return is what the
    command writes, and with `out` they write it."""
    def quiet(desc, total, unit):  # a silent bar
        return tqdm(total=total, disable=True)

    f = toy_gmm.fig8(samples=20, steps=10, progress=quiet)
    assert set(f["samples"]) == set(f["stats"]) and len(f["exact"]) == 2
    assert f["files"]["summary.md"] == f["table"]
    obs = toy_gmm.observations(tmp_path, fig8_result=f, n=10, n_mean=20, steps=10, progress=quiet)
    assert len(obs["scores"]["sigmas"]) == 10
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["fig8", "fig8_exact", "observations"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "observation_1.png", "observation_2.png", "observation_3.png", "summary.json",
        "summary.md"]


@pytest.mark.parametrize("module", [toy_gmm, gmm_benchmark])
def test_help_gives_each_default_once(module, capsys):
    """Both commands (their shared flags are toy_gmm.command_line's): a flag's help ends with
    its default once; none for switches."""
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out.split("positional arguments:")[1]
    blocks = [" ".join(b.split()) for b in re.split(r"\n  (?=[-{])", text)[1:]]
    assert len(blocks) == {toy_gmm: 8, gmm_benchmark: 10}[module], blocks
    for block in blocks:
        switch = block.startswith(("-h", "--quick"))
        assert block.count("(default") == (0 if switch else 1), block
        assert "(default: None)" not in block and "(default: [" not in block, block
