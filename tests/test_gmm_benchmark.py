"""The MCGdiff benchmark of gmm_benchmark.py: its low-rank mixtures against toy_gmm.GMM, the
protocol's schedule and DPS step against our dps, the inexact CSE's formulas, and its command
line."""

import json
import math

import pytest
import torch
from conftest import assert_close

import dmap
import gmm_benchmark
import toy_gmm
from toy_gmm import F64, GMM


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
        ref, A, y, sigma_y = gmm_benchmark.protocol_problem(800, 4, weights / weights.sum(), g)
    return ref, gmm_benchmark.LowRankGMM.from_gmm(ref), A, y, sigma_y


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
        gmm_benchmark.LowRankGMM.from_gmm(GMM.from_cov(  # three different scalars
            torch.full((3,), 1 / 3, dtype=F64), torch.eye(3, dtype=F64),
            torch.tensor([0.2, 0.5, 0.9], dtype=F64)))


def test_protocol_schedule():
    """The adapted 20-step schedule (docs/gmm_benchmark.md §1.4); the ends of the sigmas."""
    abar = gmm_benchmark.protocol_abar()
    assert gmm_benchmark.protocol_timesteps(20, abar) == [
        0, 6, 13, 20, 28, 36, 45, 55, 66, 78, 92, 108, 127, 151, 182, 226, 299, 510, 755, 999]
    assert abs(abar[999].item() - 4.08e-5) < 1e-7 and abs(abar[100].item() - 0.147) < 1e-3
    a, sigmas, zeta = gmm_benchmark.protocol_schedule(100)  # 100 with t = 0: 99 transitions
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
    prior, A_mat, y, _ = gmm_benchmark.protocol_problem(8, 2, weights / weights.sum(), g)
    abar = gmm_benchmark.protocol_abar()
    a = abar[[t, t_prev]]
    sigmas = ((1 - a) / a).sqrt()
    x_ve = sigmas[0] * torch.randn(50, 8, generator=g, dtype=F64)
    A = lambda x0: x0 @ A_mat.T  # noqa: E731

    def protocol(zeta):  # returns the VE state
        x = dps_x_vp = a[0].sqrt() * x_ve
        x = gmm_benchmark.dps_protocol(prior, dps_x_vp, y[None], A, a, zeta=zeta, eta=eta,
                                 generator=torch.Generator().manual_seed(8))
        return x / a[1].sqrt()

    def ours(zeta):
        return dmap.dps(prior.denoiser, x_ve, y[None], A, sigmas, zeta=zeta, eta=eta,
                        generator=torch.Generator().manual_seed(8))

    zeta = 2 * gmm_benchmark.ZETA_PROTOCOL / (a[0] * a[1]).sqrt()
    assert_close(ours(zeta[None]) - ours(0.0), protocol(0.1) - protocol(0.0), 1e-8,
                 what="guidance term")
    if eta == 1.0:
        assert_close(ours(zeta[None]), protocol(0.1), 1e-9, what="whole step")


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
             + gmm_benchmark.log_evidence(prior, A_mat, y, sigma_y))
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
    qs = gmm_benchmark.misspecified(prior, A_mat, y, 1.0)
    three = prior.posterior(A_mat, y, 3.0)
    assert torch.equal(qs["sigma_y x3"].means, three.means)
    post = prior.posterior(A_mat, y, 1.0)
    assert torch.equal(qs["prior weights"].means, post.means)
    assert torch.equal(qs["prior weights"].weights, prior.weights)
    out = gmm_benchmark.prop4(prior, post, post, A_mat, y, 1.0, toy_gmm.fig8_sigmas(10), 500,
                        torch.Generator().manual_seed(0))
    assert all(len(v) == 9 and all(math.isfinite(u) for u in v) for v in out.values())
    # the exact posterior as the CSE: its step is closer to the exact transition on average
    assert sum(out["H_cse"]) < sum(out["H_uncond"])


def test_quick_run(tmp_path, capsys):
    """The default command (the slice) at toy sizes writes its tables: every method of
    dmap.SAMPLERS, the floor and dps_protocol on 2 problems per d = 8 cell, and the
    concentration of its first dy; `cse` writes its figures and tables."""
    assert gmm_benchmark.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark_slice.json").read_text())
    methods = ["exact posterior (floor)", "dps_protocol"] + list(dmap.SAMPLERS)
    cells = {dy: [(dy, m, i) for m in methods for i in (0, 1)] for dy in (1, 2, 4)}
    assert [(r["dy"], r["method"], r["problem"]) for r in rows] == \
        cells[1] + [(1, "concentration", 0)] + cells[2] + cells[4]
    assert all(r["d"] == 8 and r["steps"] == 5 and math.isfinite(r.get("sw", 0)) for r in rows)
    assert (tmp_path / "benchmark_slice.md").read_text().startswith(
        "# MCGdiff GMM benchmark (slice)")
    assert "wrote" in capsys.readouterr().out
    assert gmm_benchmark.main(["cse", "--quick", "--problems", "1", "--out", str(tmp_path)]) == 0
    for name in ("cse.md", "cse.json", "cse_cross_entropy.png", "cse_log_likelihood.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize("argv, message", [
    (["--problems", "0"], "--problems must be >= 1, got 0"),
    (["--bench-samples", "-1"], "--bench-samples must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--dims", "7"], "argument --dims: invalid choice: 7"),
    (["--dys", "3"], "argument --dys: invalid choice: 3"),
    (["benchmark"], "argument part: invalid choice: 'benchmark'"),
    (["--out", "FILE"], "is a file, not a folder"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    """The usage and one `error:` line on stderr, exit code 2, before any work."""
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        gmm_benchmark.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "o")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage: ") and err[1].startswith("error: ") \
        and message in err[1], err
    assert not (tmp_path / "o").exists()


def test_interrupt_writes_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the benchmark: exit 130, one line naming the stage, no files."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(gmm_benchmark, "benchmark_rows", interrupted)
    out = tmp_path / "o"
    assert gmm_benchmark.main(["--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    runs = 3 * 2 * (len(dmap.SAMPLERS) + 2)  # dy x problems x (methods, floor, dps_protocol)
    assert err[-1] == (f"interrupted in benchmark (problem, method) runs, 0 of {runs} runs "
                       "done; nothing written"), err[-1]
    assert list(out.iterdir()) == []
