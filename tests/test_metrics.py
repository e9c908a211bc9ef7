"""metrics.py against scikit-image on real photographs: PSNR exactly, SSIM to 1e-6."""

import numpy as np
import pytest
import skimage.data
import skimage.metrics
import torch
from scipy.ndimage import gaussian_filter

import metrics


def pairs():
    """(reference, degraded) uint8 pairs: noise, blur, a constant shift, and an identical pair."""
    rng = np.random.default_rng(0)
    for ref in (skimage.data.astronaut()[::4, ::4], skimage.data.coffee()[::3, ::3]):
        noisy = np.clip(ref + rng.normal(0, 20, ref.shape), 0, 255).astype(np.uint8)
        blurred = gaussian_filter(ref.astype(float), (2, 2, 0)).round().astype(np.uint8)
        shifted = np.clip(ref.astype(int) + 30, 0, 255).astype(np.uint8)
        yield from ((ref, noisy), (ref, blurred), (ref, shifted), (ref, ref))


@pytest.mark.parametrize("i", range(8))
def test_psnr_and_ssim_equal_skimage(i):
    a, b = list(pairs())[i]
    fa, fb = a / 255, b / 255
    expected_psnr = skimage.metrics.peak_signal_noise_ratio(fa, fb, data_range=1) \
        if not np.array_equal(a, b) else float("inf")
    assert metrics.psnr(a, b) == pytest.approx(expected_psnr, rel=1e-12)
    expected = skimage.metrics.structural_similarity(
        fa, fb, channel_axis=2, data_range=1, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False)
    assert abs(metrics.ssim(a, b) - expected) < 1e-6, (metrics.ssim(a, b), expected)


def test_ssim_bad_input():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 11 x 11"):
        metrics.ssim(a, a)
    with pytest.raises(ValueError, match="one shape"):
        metrics.ssim(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 17, 3), np.uint8))


def test_frechet_distance_closed_forms():
    """Diagonal (commuting) covariances: ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2; a general pair
    against scipy's sqrtm form (pytorch-fid's); identical Gaussians: 0."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        expected, rel=1e-12)
    X, Y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = X @ X.T + 0.1 * np.eye(6), Y @ Y.T
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_kid_is_the_unbiased_mmd():
    """One subset holding all rows equals the unbiased MMD^2 written as a double loop; the same
    distribution gives about 0, a shifted one clearly more."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.5

    def k(u, v):
        return (u @ v / 4 + 1) ** 3

    n = len(x)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    expected = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
                - 2 * sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n**2)
    mean, std = metrics.kid(x, y, subsets=1, subset_size=n)
    assert mean == pytest.approx(expected, rel=1e-12) and std == 0
    same = metrics.kid(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)), 20, 100)[0]
    shifted = metrics.kid(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)) + 0.5, 20, 100)[0]
    assert abs(same) < 0.05 < shifted


def test_sliced_wasserstein():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    assert metrics.sliced_wasserstein(a, a) == 0
    v = torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=torch.float64)
    # a shifted copy: each 1-D W1 is exactly |<v, theta>|
    theta = torch.randn(4, 100, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    expected = (v @ (theta / theta.norm(dim=0))).abs().mean().item()
    sw = metrics.sliced_wasserstein(a + v, a, generator=torch.Generator().manual_seed(6))
    assert abs(sw - expected) < 1e-12
    # two independent samples of the same law: small, and far below the shift's ~ 0.5 |v| d^-1/2
    b = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    assert metrics.sliced_wasserstein(a, b) < 0.1 < expected
