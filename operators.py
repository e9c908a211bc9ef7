"""The degradation operators y = A(x) of the experiments (Xu et al., ICLR 2025; DPS, Chung et al.).

Every operator is a small nn.Module on images in [-1, 1], NCHW, any batch size:
`forward(x) -> y`; `measure(x, sigma_y, generator)` adds Gaussian noise (the official runs use
sigma_y = 0); `hint(y)` is the degraded image at full size, the ControlNet input of CSE;
`adjoint(y)` exists only on the linear operators and is their true adjoint, <A x, y> = <x, A* y>.
Kernels and masks are buffers built on CPU at construction, so they follow `.to(device, dtype)`.

Your own operator (the paper's Table 10, right: a network as A, e.g. a segmentation network):
`--op FILE.py:CLASS` (dmap.py, eval.py run, cse.py train; in Python the op of
dmap.make_operator and dmap.restore) imports FILE.py and builds CLASS. The contract:
- CLASS is a torch.nn.Module; the easy path is a subclass of Operator (below), which brings the
  defaults. It is built on CPU as CLASS(size=S), S the image side in pixels, with seed=SEED
  too if its __init__ takes `seed`; then put in eval mode with its parameters frozen (guidance
  differentiates with respect to x only) and moved with .to(device).
- forward(x): images (B, 3, S, S) in [-1, 1], float32 -> y, a tensor of any shape with the
  batch first, differentiable in x (the samplers follow the gradient of ||A(x) - y||).
- Optional: adjoint(v), for a linear A only (PSLD needs it); hint(y), an image (B, 3, S, S) in
  [-1, 1] of the measurement, which the CSE takes and the panels and measurement files show;
  measure(x, sigma_y, generator), by default y = forward(x) + sigma_y * noise.
- hint's default (Operator.hint, `picture`): y itself when it is such an image; else a picture
  of it: 3 channels resized to S (bicubic), 1 channel as grey, (B, C, h, w) scores of C classes
  as the argmax label map in the PASCAL VOC colours, any other shape mid-grey.
- A plain nn.Module is wrapped (Plugin): its forward, and its adjoint, hint and measure if it
  has them, else Operator's. Files and folders name the operator by CLASS (short_name).
- Checked when built, on a random (2, 3, S, S) batch; each failure is one ValueError line: no
  such file, an import that fails, no such class, not an nn.Module, a build that fails, a
  forward that fails or returns no tensor, NaN or inf, or no gradient with respect to x.

Reading order: (1) the base class; (2) SR (MATLAB bicubic); (3) Gaussian and motion blur;
(4) nonlinear blur (bkse KernelWizard); (5) inpainting; the registry OPERATORS; (6) your own
operator, FILE.py:CLASS.
Sources: the official code `op.py` and DPS2022 `guided_diffusion/measurements.py`,
`util/resizer.py`, `util/img_utils.py`, as described in docs/official_code.md §6 and
docs/sd2_formats.md §5.3.
"""

import importlib.util
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from checkpoint import load_state

# ---------------------------------------------------------------------------------------------
# (1) The base class
# ---------------------------------------------------------------------------------------------


class Operator(nn.Module):
    """A degradation A on size x size images; subclasses define forward (and adjoint if linear)."""

    def __init__(self, size: int):
        super().__init__()
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"size must be a positive integer (image side in pixels), got {size}")
        self.size = size

    def check(self, x: torch.Tensor):
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"{type(self).__name__} expects NCHW images of {self.size}x{self.size}"
                             f", got shape {tuple(x.shape)}; build the operator with size=H")

    def measure(self, x: torch.Tensor, sigma_y: float = 0.0, generator=None) -> torch.Tensor:
        """y = A(x) + sigma_y * noise. The official code uses sigma_y = 0
        (docs/official_code.md §6.6)."""
        if sigma_y < 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        y = self(x)
        if sigma_y == 0:
            return y
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return y + sigma_y * noise

    def hint(self, y: torch.Tensor) -> torch.Tensor:
        """The CSE hint, an image of y at full size: for blurs and masks y itself; for other
        measurements (your own operator's) the `picture` of y."""
        return picture(y, self.size)


def voc_colours(n: int) -> torch.Tensor:
    """The first n PASCAL VOC label colours (VOCdevkit's labelcolormap: the bits of class i
    dealt to R, G, B from the top bit down), (n, 3) in [-1, 1]."""
    colours = torch.zeros(n, 3)
    for i in range(n):
        c, bit = i, 7
        while c:
            for k in range(3):
                colours[i, k] += ((c >> k) & 1) << bit
            c, bit = c >> 3, bit - 1
    return colours / 127.5 - 1


def picture(y: torch.Tensor, size: int) -> torch.Tensor:
    """A (B, 3, size, size) image in [-1, 1] of a measurement y (B, ...), Operator.hint's
    default: y itself if it is one; 3 channels resized (bicubic), 1 channel as grey; C class
    scores (B, C, h, w) as the colours of their argmax (nearest); other shapes mid-grey."""
    if y.ndim != 4:
        return y.new_zeros(len(y), 3, size, size)
    if y.shape[1] in (1, 3):
        image = y.expand(-1, 3, -1, -1)
        mode = "bicubic"
    else:
        image = voc_colours(y.shape[1]).to(y)[y.argmax(1)].permute(0, 3, 1, 2)
        mode = "nearest"
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image, size=(size, size), mode=mode)


# ---------------------------------------------------------------------------------------------
# (2) Super-resolution: MATLAB imresize (Assaf Shocher's Resizer, as used by DPS and ILVR)
# ---------------------------------------------------------------------------------------------


def cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB imresize, resizer.py `cubic`)."""
    t = np.abs(t)
    return ((1.5 * t**3 - 2.5 * t**2 + 1) * (t <= 1)
            + (-0.5 * t**3 + 2.5 * t**2 - 4 * t + 2) * ((1 < t) & (t <= 2)))


def resize_matrix(n: int, factor: int) -> np.ndarray:
    """The (n // factor, n) matrix of 1-D bicubic downscaling by `factor` (resizer.py
    `contributions` with antialiasing): y = M x equals Resizer on one axis."""
    s = 1.0 / factor
    width = 4.0 * factor  # the cubic support (4) stretched by 1/s: antialiasing
    center = np.arange(1, n // factor + 1) / s + 0.5 * (1 - 1 / s)  # 1-based input coordinate
    left = np.floor(center - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2) - 1  # (n_out, taps), 0-based inputs
    w = s * cubic(s * (center[:, None] - taps - 1))
    w = w / w.sum(axis=1, keepdims=True)
    # half-sample symmetric boundary: the sequence 0..n-1, n-1..0, repeated
    mirror = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    cols = mirror[np.mod(taps.astype(np.int64), 2 * n)]
    M = np.zeros((n // factor, n))
    np.add.at(M, (np.repeat(np.arange(n // factor), taps.shape[1]), cols.ravel()), w.ravel())
    return M


class SR(Operator):
    """Bicubic downscaling by `factor` (official op.py SuperResolutionOperator, x8 at 512).

    y = M x M^T per channel with the exact 1-D Resizer matrices. The official code maps x to
    [0, 1] and back around the Resizer; rows of M sum to 1, so that map changes nothing.
    """

    def __init__(self, size: int = 512, factor: int = 8):
        super().__init__(size)
        if not (isinstance(factor, int) and factor >= 1):
            raise ValueError(f"factor must be an integer >= 1, got {factor}")
        if size % factor:
            raise ValueError(f"SR x{factor} needs an image size divisible by {factor}, got {size}")
        self.factor = factor
        self.register_buffer("M", torch.tensor(resize_matrix(size, factor), dtype=torch.float32))

    def forward(self, x):
        self.check(x)
        return self.M @ x @ self.M.T  # (N, C, size/f, size/f)

    def adjoint(self, y):
        # The true adjoint M^T y M. (Official PSLD used nearest x8 upsampling as the "transpose";
        # that is not the adjoint of this A and is not offered here.)
        return self.M.T @ y @ self.M

    def hint(self, y):
        # official op.py keep_shape: bicubic x factor upsampling of y (no antialias)
        return F.interpolate(y, scale_factor=self.factor, mode="bicubic", align_corners=False)


# ---------------------------------------------------------------------------------------------
# (3) Gaussian and motion blur: ReflectionPad2d(k // 2), then depthwise cross-correlation
# ---------------------------------------------------------------------------------------------


def reflect_pad_adjoint(z: torch.Tensor, p: int) -> torch.Tensor:
    """Adjoint of F.pad(x, (p, p, p, p), mode="reflect"): fold each padded border back onto the
    pixels it copied. Along one axis of length n, padded index i < p copies x[p - i] and
    index p + n + j copies x[n - 2 - j]."""
    for dim in (-1, -2):
        n = z.shape[dim] - 2 * p
        lo = z.narrow(dim, 0, p).flip(dim)  # now index j holds the copy of x[j + 1]
        hi = z.narrow(dim, p + n, p).flip(dim)  # index j holds the copy of x[n - 1 - p + j]
        pad_lo = (1, n - 1 - p) if dim == -1 else (0, 0, 1, n - 1 - p)
        pad_hi = (n - 1 - p, 1) if dim == -1 else (0, 0, n - 1 - p, 1)
        z = z.narrow(dim, p, n) + F.pad(lo, pad_lo) + F.pad(hi, pad_hi)
    return z


class Convolution(Operator):
    """y = k (*) reflect_pad(x): the official Blurkernel (ReflectionPad2d(k // 2) + depthwise
    Conv2d without bias, i.e. cross-correlation); subclasses register the (1, 1, k, k) buffer
    `kernel`."""

    def __init__(self, size: int, kernel_size: int, reach: int | None = None):
        """reach: how far the kernel's non-zero taps reach from its centre (kernel_size // 2
        unless given); the reflect padding needs images larger than that."""
        super().__init__(size)
        if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        reach = kernel_size // 2 if reach is None else reach
        if size <= reach:
            raise ValueError(f"a {kernel_size}x{kernel_size} blur needs images larger than "
                             f"{reach} px (reflect padding), got {size}")

    def forward(self, x):
        self.check(x)
        p, k = self.kernel.shape[-1] // 2, self.kernel.expand(x.shape[1], -1, -1, -1)
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), k, groups=x.shape[1])

    def adjoint(self, y):
        # The padding is part of A, so A* = pad* o conv*: the transposed convolution gives the
        # padded-size image, whose borders are folded back. Written out rather than a vjp of
        # forward: exact, one transposed convolution, and it works under torch.no_grad.
        p, k = self.kernel.shape[-1] // 2, self.kernel.expand(y.shape[1], -1, -1, -1)
        return reflect_pad_adjoint(F.conv_transpose2d(y, k, groups=y.shape[1]), p)


def gaussian_kernel(kernel_size: int, std: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(delta, std) on a kernel_size^2 delta (official Blurkernel):
    the outer product of a normalised sampled Gaussian of radius int(4 std + 0.5) (truncate=4)."""
    r = int(4.0 * std + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * t**2 / std**2)
    g = g / g.sum()
    k = torch.zeros(kernel_size, kernel_size, dtype=torch.float64)
    c = kernel_size // 2
    k[c - r:c + r + 1, c - r:c + r + 1] = torch.outer(g, g)
    return k


class Blur(Convolution):
    """Gaussian blur, 61x61, std 3.0 (official GaussialBlurOperator); centre tap 0.0176849.

    The kernel's taps beyond radius r = int(4 std + 0.5) are zero, so it is applied as its
    (2r + 1)^2 centre: the same image (the reflect padding a tap reaches is the same), at a
    fraction of the cost (25x25 at std 3, 9x9 at std 1), and images need only be larger than r.
    """

    def __init__(self, size: int = 512, kernel_size: int = 61, std: float = 3.0):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        r = int(4.0 * std + 0.5)
        super().__init__(size, kernel_size, reach=r)
        if r > kernel_size // 2:
            raise ValueError(f"std {std} is too wide for a {kernel_size}x{kernel_size} kernel: "
                             f"need int(4 std + 0.5) <= {kernel_size // 2}; raise kernel_size")
        self.register_buffer("kernel", gaussian_kernel(2 * r + 1, std).float()[None, None])


def motion_kernel(kernel_size: int, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """A random motion-blur trajectory kernel: LeviBorodenko/motionblur `Kernel((k, k),
    intensity).kernelMatrix`, the same draws in the same order, but from `rng`. The official
    code draws from numpy's global RNG (twice per operator, the first kernel discarded), so the
    exact kernels differ from ours."""
    eps = 0.1  # motionblur.py's "tiny error"
    n = 2 * kernel_size  # drawn on a supersized canvas, downscaled at the end (antialiasing)
    diagonal = math.hypot(n, n)
    # step lengths: beta(1, 30) steps until the path exceeds a random maximum length
    max_len = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps, total = [], 0.0
    while total < max_len:
        step = rng.beta(1, 30) * (1 - intensity + eps) * diagonal
        if step < max_len:
            steps.append(step)
            total += step
    # angles: the first uniform in (-max_angle, max_angle), then triangular magnitudes whose sign
    # flips w.r.t. the previous angle with probability `jitter`
    max_angle = rng.uniform(0, intensity * math.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(-max_angle, max_angle)]
    while len(angles) < len(steps):
        angle = rng.triangular(0, intensity * max_angle, max_angle + eps)
        sign = -np.sign(angles[-1]) if rng.uniform() < jitter else np.sign(angles[-1])
        angles.append(angle * sign)
    # path = cumulative sum of the increments, centred on its centre of mass, randomly rotated,
    # moved to the canvas centre
    path = np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))
    path = (path - path.mean()) * np.exp(1j * rng.uniform(0, math.pi)) + (n + 1j * n) / 2
    # render: a white line on black (motionblur.py draws on RGB and converts to L at the end;
    # for grey pixels that is the same as drawing on L), blur, LANCZOS downscale, normalise
    image = Image.new("L", (n, n))
    # (motionblur.py's width int(diagonal / 150) is 0, an invisible line, below 53 px kernels)
    ImageDraw.Draw(image).line([(z.real, z.imag) for z in path], fill=255,
                               width=max(1, int(diagonal / 150)))
    image = image.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    image = image.resize((kernel_size, kernel_size), resample=Image.LANCZOS)
    k = np.asarray(image, dtype=np.float32)
    return k / k.sum()


class MotionBlur(Convolution):
    """Motion blur, 61x61, intensity 0.5 (ddps MotionBlurOperator); one kernel per instance,
    drawn from np.random.default_rng(seed)."""

    def __init__(self, size: int = 512, kernel_size: int = 61, intensity: float = 0.5,
                 seed: int = 0):
        super().__init__(size, kernel_size)
        if not 0 <= intensity <= 1:
            raise ValueError(f"intensity must be in [0, 1], got {intensity}")
        k = motion_kernel(kernel_size, intensity, np.random.default_rng(seed))
        self.register_buffer("kernel", torch.from_numpy(k)[None, None])


# ---------------------------------------------------------------------------------------------
# (4) Nonlinear blur: the bkse KernelWizard (Tran et al., CVPR 2021), GOPRO_wVAE weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelWizardConfig:
    nf: int = 64  # feature width; the kernel code has 8 * nf = 512 channels
    front_RBs: int = 10  # residual blocks of feature_extractor
    back_RBs: int = 20  # residual blocks of recon_trunk
    extractor_blocks: int = 4  # ResnetBlocks of kernel_extractor (weights only, see below)
    input_nc: int = 3


GOPRO = KernelWizardConfig()  # bkse options/generate_blur/default.yml
TINY = KernelWizardConfig(nf=8, front_RBs=1, back_RBs=1, extractor_blocks=1)  # tests


class ResidualBlock_noBN(nn.Module):
    """bkse models/backbones/resnet.py: conv-ReLU-conv plus identity."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class ResnetBlock(nn.Module):
    """bkse ResnetBlock (pix2pix) with reflect padding and norm 'none' (Identity, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.Identity(), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.Identity())

    def forward(self, x):
        return x + self.conv_block(x)


class KernelExtractor(nn.Module):
    """bkse KernelExtractor (the encoder F of sharp/blurred pairs). adaptKernel never runs it:
    it is built only because GOPRO_wVAE.pth holds its weights (91.6 M of the 115.3 M params)."""

    def __init__(self, cfg: KernelWizardConfig):
        super().__init__()
        nf, out = cfg.nf, 2 * 8 * cfg.nf  # use_vae: mean and log-variance of the kernel code
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(2 * nf, nf, 7, bias=False), nn.Identity(),
                  nn.ReLU()]
        for i in range(5):
            cin, cout = min(nf * 2**i, out), min(nf * 2 ** (i + 1), out)
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.Identity(), nn.ReLU()]
        layers += [ResnetBlock(out) for _ in range(cfg.extractor_blocks)]
        self.model = nn.Sequential(*layers)


class UnetSkipConnectionBlock(nn.Module):
    """One level of bkse's pix2pix U-Net (norm 'none', so convs have no bias except the
    outermost up-convolution). The innermost level concatenates the kernel code k."""

    def __init__(self, outer: int, inner: int, submodule=None, outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        conv = nn.Conv2d(outer, inner, 4, 2, 1, bias=False)
        self.down = nn.Sequential(conv) if outermost else nn.Sequential(nn.LeakyReLU(0.2), conv)
        self.submodule = submodule
        self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1,
                                                              bias=outermost))
        if outermost:
            self.up.append(nn.Tanh())

    def forward(self, x, k):
        if self.outermost:
            return self.up(self.submodule(self.down(x), k))
        # bkse's LeakyReLU is in place, so the skip connection below also sees leaky_relu(x)
        x = self.down[0](x)
        h = self.down[1](x)
        h = torch.cat([h, k], 1) if self.submodule is None else self.submodule(h, k)
        return torch.cat([self.up(h), x], 1)


class KernelAdapter(nn.Module):
    """bkse KernelAdapter (the function G): a 5-level U-Net nf -> 8 nf channels."""

    def __init__(self, cfg: KernelWizardConfig):
        super().__init__()
        nf = cfg.nf
        block = UnetSkipConnectionBlock(8 * nf, 8 * nf)  # innermost: features (+) kernel code
        for outer, inner in ((4 * nf, 8 * nf), (2 * nf, 4 * nf), (nf, 2 * nf)):
            block = UnetSkipConnectionBlock(outer, inner, block)
        self.model = UnetSkipConnectionBlock(nf, nf, block, outermost=True)

    def forward(self, x, k):
        return self.model(x, k)


class KernelWizard(nn.Module):
    """bkse models/kernel_encoding/kernel_wizard.py; forward(x, k) is its `adaptKernel`:
    blur the sharp image x in [0, 1] with the latent kernel code k (B, 8 nf, H/128, W/128).
    Module and parameter names are bkse's, so GOPRO_wVAE loads without renaming."""

    def __init__(self, cfg: KernelWizardConfig = GOPRO):
        super().__init__()
        self.cfg = cfg
        nf, c = cfg.nf, cfg.input_nc
        self.feature_extractor = nn.Sequential(  # (B, nf, H/4, W/4)
            nn.Conv2d(c, nf, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 3, 2, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 3, 2, 1), nn.LeakyReLU(0.1),
            *[ResidualBlock_noBN(nf) for _ in range(cfg.front_RBs)])
        self.kernel_extractor = KernelExtractor(cfg)
        self.adapter = KernelAdapter(cfg)
        self.recon_trunk = nn.Sequential(  # (B, c, H, W); bkse writes 64 for nf after the shuffles
            *[ResidualBlock_noBN(nf) for _ in range(cfg.back_RBs)],
            nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, c, 3, 1, 1))

    def forward(self, x, k):
        return x + self.recon_trunk(self.adapter(self.feature_extractor(x), k))


def load_kernel_wizard(path: str, cfg: KernelWizardConfig = GOPRO, device=None,
                       dtype=None) -> KernelWizard:
    """KernelWizard from a safetensors file of bkse's state dict (all 159 tensors, strict).

    The bkse/DPS weights GOPRO_wVAE.pth are a pickle, which we do not read; convert them once:
    python -c "import torch, safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in
    torch.load('GOPRO_wVAE.pth', map_location='cpu').items()}, 'GOPRO_wVAE.safetensors')"
    """
    with torch.device("meta"):
        net = KernelWizard(cfg)
    return load_state(net, path, lambda key: key, device, dtype)


class NonlinearBlur(Operator):
    """Nonlinear blur (official op.py NonlinearBlurOperator): y = clamp(2 G((x + 1) / 2, k) - 1)
    with G the KernelWizard and k = 1.2 * randn(1, 512, H/128, W/128).

    `weights`: a safetensors path (see load_kernel_wizard) or a KernelWizard (e.g. a random
    TINY one for tests). The kernel code is drawn once from `seed` and FIXED for the instance,
    so A is a deterministic function; the official code redraws it on every call, including
    inside each guidance step. Nonlinear: there is no adjoint.
    """

    def __init__(self, size: int = 512, weights="weights/GOPRO_wVAE.safetensors", seed: int = 0):
        super().__init__(size)
        if size % 128:
            raise ValueError(f"nonlinear_blur needs an image size divisible by 128, got {size}")
        if isinstance(weights, str) and not os.path.isfile(weights):
            raise ValueError(f"{weights}: no such file; nonlinear_blur needs bkse's KernelWizard "
                             "weights converted to safetensors once (README.md, \"Restoring an "
                             "image\": the GOPRO_wVAE step), or --kernel-weights PATH")
        net = weights if isinstance(weights, KernelWizard) else load_kernel_wizard(weights)
        self.net = net.eval().requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("k", 1.2 * torch.randn(1, 8 * net.cfg.nf, size // 128, size // 128,
                                                    generator=g))

    def forward(self, x):
        self.check(x)
        y = self.net((x + 1) / 2, self.k.expand(x.shape[0], -1, -1, -1))
        return (2 * y - 1).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# (5) Inpainting: A = x * mask (a 0/1 mask is self-adjoint)
# ---------------------------------------------------------------------------------------------


class Mask(Operator):
    """y = x * mask with a 0/1 buffer `mask` (1, 1, H, W) shared across channels."""

    def forward(self, x):
        self.check(x)
        return x * self.mask

    def adjoint(self, y):
        return y * self.mask


class Inpaint(Mask):
    """A box x box centre square removed (mask 0 inside); by default a quarter of the side, the
    paper's 128x128 at 512, so it scales with the image. Not in the official code
    (docs/official_code.md §6.5); DPS's box mask (128x128 at 256) sits at a random position,
    ours is fixed at the centre."""

    def __init__(self, size: int = 512, box: int | None = None):
        super().__init__(size)
        box = size // 4 if box is None else box
        if not (isinstance(box, int) and 1 <= box < size):
            raise ValueError(f"box must be an integer in [1, size={size}), got {box}")
        mask = torch.ones(1, 1, size, size)
        a = (size - box) // 2
        mask[..., a:a + box, a:a + box] = 0
        self.register_buffer("mask", mask)


class InpaintRandom(Mask):
    """Random pixels removed, the same in every channel (DPS's random mask): exactly
    int(fraction * size^2) pixels, drawn from torch.Generator().manual_seed(seed). DPS draws the
    fraction per image from U(0.3, 0.7); we fix it, by default to the hard end, 0.7."""

    def __init__(self, size: int = 512, fraction: float = 0.7, seed: int = 0):
        super().__init__(size)
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction (of pixels missing) must be in [0, 1), got {fraction}")
        g = torch.Generator().manual_seed(seed)
        missing = torch.randperm(size * size, generator=g)[:int(fraction * size * size)]
        mask = torch.ones(size * size)
        mask[missing] = 0
        self.register_buffer("mask", mask.reshape(1, 1, size, size))


OPERATORS = {
    "sr": SR,
    "blur": Blur,
    "motion_blur": MotionBlur,
    "nonlinear_blur": NonlinearBlur,
    "inpaint": Inpaint,
    "inpaint_random": InpaintRandom,
}


# ---------------------------------------------------------------------------------------------
# (6) Your own operator: FILE.py:CLASS (the contract is in the module docstring)
# ---------------------------------------------------------------------------------------------


class Plugin(Operator):
    """A plain nn.Module `net` as an Operator: its forward, and its adjoint, hint and measure
    where it has them (else Operator's)."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__(size)
        self.net = net
        for name in ("adjoint", "hint", "measure"):
            if callable(getattr(net, name, None)):
                setattr(self, name, getattr(net, name))

    def forward(self, x):
        self.check(x)
        return self.net(x)


def plugin_spec(op: str) -> tuple[str, str] | None:
    """(FILE.py, CLASS) of an operator named FILE.py:CLASS, else None."""
    path, _, name = op.rpartition(":")
    return (path, name) if path.endswith(".py") and name.isidentifier() else None


def short_name(op: str) -> str:
    """The name that files, folders and records give an operator: its registry key, or the
    CLASS of FILE.py:CLASS."""
    spec = plugin_spec(op)
    return op if spec is None else spec[1]


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_plugin(op: str, size: int, seed: int = 0) -> tuple[Operator, dict]:
    """Operator FILE.py:CLASS for size x size images, built, frozen and checked as the module
    docstring says; -> (operator, {"file", "class", and the keywords it was built with})."""
    path, name = plugin_spec(op)
    what = f"--op {op}"
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path}: no such file")
    path = os.path.abspath(path)
    module_name = "operator_plugin_" + re.sub(r"\W", "_", path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as `import` does: dataclasses and pickle look it up
    sys.path.insert(0, os.path.dirname(path))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ValueError(f"{what}: importing {path} failed: {first_line(e)}") from None
    finally:
        sys.path.remove(os.path.dirname(path))
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        found = [k for k, v in vars(module).items() if isinstance(v, type)
                 and issubclass(v, nn.Module) and v.__module__ == module_name]
        raise ValueError(f"{what}: {path} defines no class {name} (its nn.Module classes: "
                         f"{', '.join(found) or 'none'})")
    if not issubclass(cls, nn.Module):
        raise ValueError(f"{what}: {name} is not a torch.nn.Module; subclass operators.Operator")
    kwargs = {"size": size}
    if "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = seed
    call = f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        net = cls(**kwargs)
    except Exception as e:
        raise ValueError(f"{what}: {call} failed: {first_line(e)}") from None
    operator = (net if isinstance(net, Operator) else Plugin(net, size)).eval()
    operator.requires_grad_(False)
    check_plugin(operator, f"{what}: {name}", size)
    return operator, {"file": path, "class": name, **kwargs}


def check_plugin(operator: Operator, what: str, size: int) -> None:
    """ValueError unless forward maps a random (2, 3, size, size) batch in [-1, 1] to a finite
    tensor with the batch first that has a gradient with respect to the batch."""
    x = (torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    x.requires_grad_(True)
    try:
        with torch.enable_grad():
            y = operator(x)
    except Exception as e:
        raise ValueError(f"{what} failed on a (2, 3, {size}, {size}) test batch in [-1, 1]: "
                         f"{first_line(e)}") from None
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{what} returned a {type(y).__name__}, not a torch.Tensor")
    if y.ndim == 0 or len(y) != 2:
        raise ValueError(f"{what} returned shape {tuple(y.shape)} for a batch of 2: the batch "
                         "must come first")
    if not torch.isfinite(y).all():
        raise ValueError(f"{what} returned NaN or inf on a test batch in [-1, 1]")
    try:
        grad = torch.autograd.grad(y.sum(), x, allow_unused=True)[0] if y.requires_grad else None
    except Exception as e:
        raise ValueError(f"{what}: its backward pass failed: {first_line(e)}") from None
    if grad is None:
        raise ValueError(f"{what} is not differentiable: its output has no gradient with respect "
                         "to the image (keep it in torch: no .detach(), numpy or argmax)")
