"""Image quality metrics of the paper's tables, on 8-bit images as they are saved.

Reading order: (1) PSNR, per image, averaged over images (the authors' fid.py:22-24; note that
torchmetrics' default pools the squared error over all images instead, which gives other
numbers); (2) SSIM (Wang et al., IEEE TIP 2004): an 11 x 11 Gaussian window of std 1.5, on each
RGB channel, K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the pixels whose
window lies inside the image. Both equal scikit-image's `skimage.metrics` with the settings
named in each docstring (tests/test_metrics.py); then mIoU, of two label maps (Table 10, right:
the segmentation network as the operator); (3) the Frechet distance and KID between two
sets of features, the distances FID and KID compute on Inception features (tested against
closed forms and pytorch-fid's sqrtm form), and the sliced Wasserstein distance between two
sample sets; (4) the two networks of LPIPS and FID, written in plain torch with the layer
names of the community weight files, so the very files that the `lpips` and `pytorch-fid`
packages load give the very numbers they give (tests/test_metric_nets.py compares both, on
random weights, with the packages themselves); (5) the conventions of the tables, the scorer
of one image pair and the summaries over images that eval.py reports.
"""

import math
import os
import urllib.error

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn


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


def miou(pred, target, classes=None) -> float:
    """Mean intersection over union of two integer label maps (H, W) (numpy or torch), the
    segmentation score of Table 10 (right) of Xu et al.: IoU_c = |pred = c and target = c| /
    |pred = c or target = c|, averaged over the classes c present in either map (of `classes`
    only, if given: an iterable of labels)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(f"miou needs two label maps (H, W) of one shape, got "
                         f"{tuple(pred.shape)}, {tuple(target.shape)}")
    present = torch.cat([pred.flatten(), target.flatten()]).unique()
    if classes is not None:
        present = present[torch.isin(present, torch.as_tensor(list(classes)))]
    if len(present) == 0:
        raise ValueError(f"miou: none of the classes {list(classes)} occurs in either map")
    p, t = (v[None] == present[:, None, None] for v in (pred, target))  # (classes, H, W)
    iou = (p & t).sum((1, 2)).double() / (p | t).sum((1, 2))
    return iou.mean().item()


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


def sliced_wasserstein(a, b, n_slices=100, generator=None) -> float:
    """Sliced Wasserstein distance between two sample sets (n, d) of torch tensors: the mean
    over n_slices random unit directions of the 1-D W1 between the projections (MCGdiff's
    sliced_wasserstein, docs/gmm_benchmark.md §1.6); equal sample sizes: W1 = mean |sorted
    diff|. toy_gmm.py's metric, and eval.py's distribution metric that needs no network."""
    return sliced_wasserstein_to(b, n_slices, generator)(a)


def sliced_wasserstein_to(b, n_slices=100, generator=None):
    """a -> sliced_wasserstein(a, b), the directions drawn and b projected and sorted once: for
    many sample sets against one reference (the toy benchmark's methods against one exact
    posterior set; half the metric's time)."""
    theta = torch.randn(b.shape[1], n_slices, generator=generator, dtype=b.dtype)
    theta = theta / theta.norm(dim=0)
    pb = (b @ theta).sort(0).values

    def sw(a) -> float:
        assert a.shape == b.shape, f"equal sample sets needed, got {a.shape} and {b.shape}"
        return ((a @ theta).sort(0).values - pb).abs().mean().item()

    return sw


# ---------------------------------------------------------------------------------------------
# (4) The community networks: LPIPS (AlexNet, v0.1) and the FID InceptionV3
# ---------------------------------------------------------------------------------------------

# The files the community packages load, and where they download them from. torch.hub checks
# the SHA-256 prefix that the first and last names carry; lpips ships alex.pth in its wheel.
WEIGHTS = {
    "alexnet-owt-7be5be79.pth": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "alex.pth": "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/"
                "weights/v0.1/alex.pth",
    "pt_inception-2015-12-05-6726825d.pth": "https://github.com/mseitzer/pytorch-fid/releases/"
                                            "download/fid_weights/"
                                            "pt_inception-2015-12-05-6726825d.pth",
}


def load_weights(name: str, folder: str | None = None) -> dict:
    """The state dict in weight file `name`: from `folder` (--metric-weights), else from
    $TORCH_HOME/hub/checkpoints, else downloaded there by torch.hub with its hash checked;
    ValueError naming the file, its URL and where to put it when none of these works."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    for where in [folder, hub] if folder else [hub]:
        path = os.path.join(where, name)
        if os.path.isfile(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated, not a torch file, or pickled code
                raise ValueError(f"{path} is not a readable weight file ({type(e).__name__}); "
                                 f"download it again from {WEIGHTS[name]}") from None
    try:
        return torch.hub.load_state_dict_from_url(WEIGHTS[name], model_dir=hub, progress=False,
                                                  check_hash=True, map_location="cpu",
                                                  weights_only=True)
    except (OSError, RuntimeError, urllib.error.URLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"metric weights {name} are missing and could not be downloaded "
                         f"({reason}): download {WEIGHTS[name]} into {folder or hub}, or pass "
                         "--metric-weights DIR") from None


def load_into(module: nn.Module, state: dict, what: str) -> nn.Module:
    """Load `state` into `module` (BatchNorm's num_batches_tracked may be absent), in eval mode;
    ValueError when a tensor is missing or of another shape: not the file `what` names."""
    own = module.state_dict()
    bad = [k for k, v in own.items() if not k.endswith("num_batches_tracked")
           and (k not in state or state[k].shape != v.shape)]
    if bad:
        raise ValueError(f"these are not the {what} weights: {bad[0]} is missing or of another "
                         f"shape ({len(bad)} such tensors)")
    module.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    return module.eval().requires_grad_(False)


class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet (Zhang et al., CVPR 2018; lpips 0.1.4, lpips/pretrained_networks.py
    and lpips/lpips.py): images in [-1, 1] are shifted and scaled per channel (ScalingLayer),
    the five ReLU outputs of torchvision's AlexNet features are unit-normalised over channels
    (eps 1e-10), their squared differences weighted by the 1 x 1 "lin" layers (no bias) and
    averaged over space, and the five terms summed."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    TAPS = (1, 4, 7, 9, 11)  # the ReLUs after which lpips' slices 1-5 end
    # the two 3 x 3 max-pools need 3 x 3 inputs, so conv1 (11, stride 4, pad 2) must give 7 x 7
    MIN_SIZE = 31

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(  # torchvision's alexnet().features, same indices
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 192, 384, 256, 256))
        shape = (1, 3, 1, 1)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(shape), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(shape), persistent=False)

    @classmethod
    def load(cls, folder: str | None = None) -> "LPIPS":
        """torchvision's AlexNet file (features.*) plus lpips' v0.1 alex.pth (lin{i}.model.1)."""
        alexnet, lin = load_weights("alexnet-owt-7be5be79.pth", folder), load_weights("alex.pth",
                                                                                     folder)
        state = {k: v for k, v in alexnet.items() if k.startswith("features.")}
        state.update({f"lin.{i}.weight": lin.get(f"lin{i}.model.1.weight") for i in range(5)})
        return load_into(cls(), {k: v for k, v in state.items() if v is not None}, "LPIPS")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pairs in [-1, 1] -> (N,) distances."""
        if min(a.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {self.MIN_SIZE} x {self.MIN_SIZE} "
                             f"pixels, got {a.shape[-2]} x {a.shape[-1]}: drop lpips from "
                             "--metrics")
        x = (torch.cat([a, b]) - self.shift) / self.scale
        total, k = 0, 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                unit = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fa, fb = unit.chunk(2)
                total = total + self.lin[k]((fa - fb) ** 2).mean((2, 3))
                k += 1
        return total.flatten()


class Conv(nn.Module):
    """torchvision's BasicConv2d: convolution without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def average3(x):
    """The 3 x 3 average pool of pytorch-fid's FIDInception blocks: padding left out of the
    mean (count_include_pad=False), as in the TensorFlow graph, unlike torchvision's."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):  # pytorch-fid FIDInceptionA (inception.py)
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(average3(x))], 1)


class InceptionB(nn.Module):  # torchvision InceptionB (the grid reduction to 17 x 17)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # pytorch-fid FIDInceptionC: factorised 7 x 7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(average3(x))], 1)


class InceptionD(nn.Module):  # torchvision InceptionD (the grid reduction to 8 x 8)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """pytorch-fid FIDInceptionE_1 (average pool without padding) and, with max_pool,
    FIDInceptionE_2 (Mixed_7c: a 3 x 3 max pool, a bug of the TensorFlow graph kept for FID)."""

    def __init__(self, cin, max_pool=False):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else average3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """pytorch-fid 0.3.0's InceptionV3 up to the 2048-d pool features (output block 3, the FID
    default): images in [0, 1] resized to 299 x 299 bilinearly (align_corners False, no
    antialias), scaled to [-1, 1], torchvision's Inception3 with pytorch-fid's FID blocks."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d, self.Mixed_6a = InceptionA(288, 64), InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b = InceptionD(768), InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    @classmethod
    def load(cls, folder: str | None = None) -> "FIDInception":
        """pytorch-fid's pt_inception-2015-12-05 file (its 1008-way fc layer is not used)."""
        return load_into(cls(), load_weights("pt_inception-2015-12-05-6726825d.pth", folder),
                         "FID Inception")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 2048) pool features."""
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


# ---------------------------------------------------------------------------------------------
# (5) The tables' conventions, and the scorer of one image pair (eval.py)
# ---------------------------------------------------------------------------------------------

METRICS = ("psnr", "ssim", "lpips", "fid", "kid", "sw")  # eval.py's default --metrics
# Every metric eval.py knows: mIoU needs the operator, so eval.py run computes it (Run.restore)
KNOWN = METRICS + ("miou",)
CONVENTIONS = {
    "psnr": "PSNR (dB): the mean over images of per-image PSNR on 8-bit images scaled to [0, 1] "
            "(the authors' fid.py; torchmetrics' default pools the error over images instead)",
    "ssim": "SSIM: Gaussian window 11, std 1.5, on RGB (channels averaged), K1 0.01, K2 0.03 "
            "(skimage: gaussian_weights, use_sample_covariance=False)",
    "lpips": "LPIPS: AlexNet with the v0.1 linear layers, inputs in [-1, 1] (lpips 0.1.4, as the "
             "authors)",
    "fid": "FID: pytorch-fid's InceptionV3 (2015-12-05), 2048-d pool features of [0, 1] images "
           "resized bilinearly to 299 without antialias; restored vs reference images",
    "kid": "KID (x 1e3): unbiased MMD^2, kernel (x.y / 2048 + 1)^3, 100 subsets of "
           "min({subset}, n) images (torch-fidelity's 100 x 1000; the authors' 100 x 10)",
    "sw": "SW (x 1e2): sliced Wasserstein distance, the mean over 100 random directions of the "
          "1-D W1 between restored and reference images as vectors of [0, 1] pixels, the images "
          "box-filtered to at most 64 px a side first (no network, no download; ours)",
    "miou": "mIoU: mean over classes present of the intersection over union of argmax A(x) and "
            "argmax y, the operator's class scores (B, C, h, w) of the restoration x (before "
            "8-bit rounding) and the measurement (Table 10, right), the mean over images",
}
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "fid": "FID", "kid": "KID x1e3",
          "sw": "SW x1e2", "miou": "mIoU"}
SW_SIDE = 64  # SW's images are box-filtered to at most this side: vectors of 3 x 64 x 64


def sw_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the vector SW compares: [0, 1] pixels, box-filtered to at most
    SW_SIDE a side (at 512 px, 786k-value vectors would make each random slice mostly pixel
    noise, and 1000 of them take 3 GB)."""
    side = max(1, math.ceil(max(image.shape[:2]) / SW_SIDE))
    h, w = image.shape[0] // side * side, image.shape[1] // side * side
    a = image[:h, :w].astype(np.float64) / 255
    return a.reshape(h // side, side, w // side, side, 3).mean((1, 3)).ravel()


def as_tensor(image: np.ndarray, device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 on [0, 1], as torchvision's ToTensor."""
    return torch.tensor(image).permute(2, 0, 1)[None].float().div(255).to(device)


class Scorer:
    """The per-image metrics (PSNR, SSIM, LPIPS) and Inception features (for FID, KID) of the
    metrics named; the networks load once, before any slow work, and only if asked for. mIoU is
    accepted, but needs the operator: the caller computes it (eval.py Run.restore)."""

    def __init__(self, names, weights: str | None = None, device="cpu"):
        unknown = set(names) - set(KNOWN)
        if unknown or not names:
            raise ValueError(f"--metrics takes a comma list of {', '.join(KNOWN)}; got "
                             f"{','.join(names) or 'nothing'}")
        self.names, self.device = list(names), device
        try:
            self.lpips = LPIPS.load(weights).to(device) if "lpips" in names else None
            self.inception = FIDInception.load(weights).to(device) \
                if {"fid", "kid"} & set(names) else None
        except ValueError as e:  # a weight file missing or unreadable: the metrics without one
            networks = [m for m in self.names if m in ("lpips", "fid", "kid")]
            rest = [m for m in self.names if m not in networks] or ["psnr", "ssim"]
            leave = " and ".join(filter(None, [", ".join(networks[:-1]), networks[-1]]))
            raise ValueError(f"{e}, or leave {leave} out: --metrics {','.join(rest)}") from None

    @torch.no_grad()
    def pair(self, ref: np.ndarray, pred: np.ndarray) -> dict:
        out = {}
        if "psnr" in self.names:
            out["psnr"] = psnr(ref, pred)
        if "ssim" in self.names:
            out["ssim"] = ssim(ref, pred)
        if self.lpips is not None:
            a, b = (2 * as_tensor(v, self.device) - 1 for v in (ref, pred))
            out["lpips"] = self.lpips(a, b).item()
        return out

    @torch.no_grad()
    def features(self, image: np.ndarray) -> np.ndarray | None:
        if self.inception is None:
            return None
        return self.inception(as_tensor(image, self.device))[0].double().cpu().numpy()


def mean_interval(values) -> dict:
    """The mean and the half-width of its 95% interval (Student t, n - 1 degrees of freedom;
    None for one value, or with an infinite PSNR of identical images)."""
    v = np.asarray(values, np.float64)
    half = float(scipy.stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) \
        if len(v) > 1 and np.isfinite(v).all() else None
    return dict(mean=float(v.mean()), ci95=half, n=len(v))


def summarize(per_image: list[dict], names, kid_subset, features=(None, None),
              pixels=(None, None)) -> dict:
    """Each metric over a set of pairs: means with intervals (the per-image ones the records
    hold, and in a run the measurement fit y_rmse and mIoU); FID and KID from the Inception
    features (ref, pred), SW from the sw_pixels vectors (ref, pred)."""
    out = {m: mean_interval([r[m] for r in per_image]) for m in ("psnr", "ssim", "lpips",
                                                                 "miou", "y_rmse")
           if m in per_image[0] and (m in names or m == "y_rmse")}
    ref_features, pred_features = features
    if "sw" in names and pixels[0] is not None:
        a, b = (torch.from_numpy(np.stack(v)) for v in pixels)
        out["sw"] = dict(value=sliced_wasserstein(
            a, b, generator=torch.Generator().manual_seed(0)), n=len(a))
    if ref_features is not None and len(ref_features) >= 2:
        a, b = np.stack(ref_features), np.stack(pred_features)
        if "fid" in names:
            out["fid"] = dict(value=frechet_distance(
                a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)),
                n=len(a))
        if "kid" in names:
            mean, std = kid(a, b, subset_size=kid_subset)
            out["kid"] = dict(mean=mean, std=std, n=len(a), subset=min(kid_subset, len(a)))
    return out


def cell(summary: dict, metric: str) -> str:
    """One table entry: mean +- 95% half-width, FID's value, KID x 1e3 +- its std."""
    s = summary.get(metric)
    if s is None:
        return "n/a"
    if metric == "fid":
        return f"{s['value']:.2f}"
    if metric == "sw":
        return f"{1e2 * s['value']:.3f}"
    if metric == "kid":
        return f"{1e3 * s['mean']:.2f} ± {1e3 * s['std']:.2f}"
    digits = {"psnr": 2, "ssim": 4, "lpips": 4, "miou": 4, "y_rmse": 4}[metric]
    ci = "" if s["ci95"] is None else f" ± {s['ci95']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{ci}"


def convention_lines(names, kid_subset) -> list[str]:
    return [f"- {CONVENTIONS[m].format(subset=kid_subset)}" for m in names] + \
        ["- ± is the half-width of the 95% interval of the mean over images (Student t)"]
