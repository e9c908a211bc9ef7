"""Image quality metrics of the paper's tables, on 8-bit images as they are saved.

Reading order: (1) PSNR, per image, averaged over images (the authors' fid.py:22-24; note that
torchmetrics' default pools the squared error over all images instead, which gives other
numbers); (2) SSIM (Wang et al., IEEE TIP 2004): an 11 x 11 Gaussian window of std 1.5, on each
RGB channel, K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the pixels whose
window lies inside the image. Both equal scikit-image's `skimage.metrics` with the settings
named in each docstring (tests/test_metrics.py). These are the two metrics of the tables that
need no learned network.
"""

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (H, W, C) on [0, 1]: -10 log10 mean((a - b)^2);
    skimage.metrics.peak_signal_noise_ratio(a / 255, b / 255, data_range=1)."""
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float("inf") if mse == 0 else float(-10 * np.log10(mse))


def gaussian_window(size: int = 11, std: float = 1.5) -> torch.Tensor:
    """The normalised separable Gaussian (size,) of SSIM (skimage: gaussian_filter, sigma 1.5,
    truncate 3.5, i.e. 11 taps)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-r**2 / (2 * std**2))
    return w / w.sum()


def ssim(a: np.ndarray, b: np.ndarray, K1: float = 0.01, K2: float = 0.03) -> float:
    """Mean SSIM of two uint8 images (H, W, C) on [0, 1], channels averaged;
    skimage.metrics.structural_similarity(a / 255, b / 255, channel_axis=2, data_range=1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim needs two (H, W, C) images of one shape, got {a.shape}, {b.shape}")
    w = gaussian_window()
    if min(a.shape[:2]) < len(w):
        raise ValueError(f"ssim needs images of at least {len(w)} x {len(w)}, got {a.shape[:2]}")
    x, y = (torch.from_numpy(v.astype(np.float64) / 255).permute(2, 0, 1)[:, None]
            for v in (a, b))  # (C, 1, H, W)

    def blur(v):  # the window's weighted mean at every pixel it fits around: "valid"
        return F.conv2d(F.conv2d(v, w.view(1, 1, -1, 1)), w.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    C1, C2 = K1**2, K2**2  # data range 1
    s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    return s.mean().item()
