"""metrics.py against scikit-image on real photographs: PSNR exactly, SSIM to 1e-6."""

import numpy as np
import pytest
import skimage.data
import skimage.metrics
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
