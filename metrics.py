"""Image quality metrics of the paper's tables, on 8-bit images as they are saved.

Reading order: (1) PSNR, per image, averaged over images (the authors' fid.py:22-24; note that
torchmetrics' default pools the squared error over all images instead, which gives other
numbers); (2) SSIM (Wang et al., IEEE TIP 2004): an 11 x 11 Gaussian window of std 1.5, on each
RGB channel, K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the pixels whose
window lies inside the image. Both equal scikit-image's `skimage.metrics` with the settings
named in each docstring (tests/test_metrics.py); (3) the Frechet distance and KID between two
sets of features, the distances FID and KID compute on Inception features (tested against
closed forms and pytorch-fid's sqrtm form).
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


# ---------------------------------------------------------------------------------------------
# (3) Distances between feature sets (FID and KID take these on Inception pool features)
# ---------------------------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al., NeurIPS 2017, the FID
    of pytorch-fid's calculate_frechet_distance), in float64. tr (S1 S2)^(1/2) is written as
    sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix with the same eigenvalues as
    S1 S2, so no complex parts or near-singular retries are needed; eigenvalues below 0 from
    rounding are taken as 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, V = np.linalg.eigh((s1 + s1.T) / 2)
    root = (V * np.sqrt(np.clip(w, 0, None))) @ V.T  # S1^(1/2)
    m = root @ s2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance (Binkowski et al., ICLR 2018): the unbiased MMD^2 with the
    kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size`
    rows of each set (torch-fidelity's defaults 100 x 1000; the authors used 100 x 10); returns
    (mean, std over subsets)."""
    n = min(subset_size, len(f1), len(f2))
    if n < 2:
        raise ValueError(f"kid needs at least 2 features per set, got {len(f1)} and {len(f2)}")
    rng, d, values = np.random.default_rng(seed), f1.shape[1], []
    for _ in range(subsets):
        x = np.asarray(f1[rng.choice(len(f1), n, replace=False)], np.float64)
        y = np.asarray(f2[rng.choice(len(f2), n, replace=False)], np.float64)
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = n * (n - 1)  # the unbiased within-set means leave the diagonal out
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                      - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
