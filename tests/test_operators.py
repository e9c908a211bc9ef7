"""Operators: adjointness, shapes, determinism, dtype; parity with Pillow, scipy and the notes."""

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import torch
import torch.nn.functional as F
from conftest import assert_close
from PIL import Image
from safetensors.torch import save_file

from operators import (
    GOPRO,
    OPERATORS,
    SR,
    TINY,
    Blur,
    Inpaint,
    InpaintRandom,
    KernelWizard,
    MotionBlur,
    NonlinearBlur,
    load_kernel_wizard,
)


def tiny_wizard():
    torch.manual_seed(0)
    return KernelWizard(TINY)


# small instances of every registered operator (sizes and kernels cut down for CPU seconds)
SMALL = {
    "sr": lambda: SR(64, factor=4),
    "blur": lambda: Blur(64, kernel_size=15, std=1.5),
    "motion_blur": lambda: MotionBlur(64, kernel_size=15, seed=1),
    "nonlinear_blur": lambda: NonlinearBlur(128, weights=tiny_wizard(), seed=1),
    "inpaint": lambda: Inpaint(64, box=16),
    "inpaint_random": lambda: InpaintRandom(64, fraction=0.7, seed=1),
}
LINEAR = [name for name in OPERATORS if hasattr(OPERATORS[name], "adjoint")]


def astronaut() -> torch.Tensor:
    """skimage's 512x512 astronaut as a (1, 3, 512, 512) float64 image in [-1, 1]."""
    x = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].double()
    return x / 127.5 - 1


def test_registry():
    assert set(SMALL) == set(OPERATORS)
    assert LINEAR == ["sr", "blur", "motion_blur", "inpaint", "inpaint_random"]


def check_adjoint(op, dtype, tol, batch=2):
    op = op.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, op.size, op.size, generator=g, dtype=dtype)
    y = torch.randn(op(x).shape, generator=g, dtype=dtype)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert_close(lhs, rhs, tol, what=f"<Ax, y> vs <x, A*y> ({type(op).__name__}, {dtype})")


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_adjoint(name, dtype, tol):
    check_adjoint(SMALL[name](), dtype, tol)


@pytest.mark.parametrize("name", ["sr", "blur"])
def test_adjoint_full_size(name):
    check_adjoint(OPERATORS[name](), torch.float32, 1e-4, batch=1)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_shapes_measure_hint(name):
    op = SMALL[name]()
    x = torch.rand(2, 3, op.size, op.size) * 2 - 1
    y = op(x)
    side = op.size // 4 if name == "sr" else op.size
    assert y.shape == (2, 3, side, side)
    assert op.hint(y).shape == x.shape
    assert torch.equal(op.measure(x), y)  # sigma_y = 0 by default, as in the official runs
    noisy = [op.measure(x, 0.05, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1])
    assert_close((noisy[0] - y).std(), 0.05, 0.05, what="noise std")


@pytest.mark.parametrize("name", list(OPERATORS))
def test_deterministic_and_float64(name):
    op, op2 = SMALL[name](), SMALL[name]()
    x = torch.rand(1, 3, op.size, op.size) * 2 - 1
    y = op(x)
    assert torch.equal(y, op2(x))  # same seed, same operator
    op64 = op.to(torch.float64)
    y64 = op64(x.double())
    assert y64.dtype == torch.float64
    assert_close(y64, y, 1e-5, what=f"{name} float64 vs float32")


def test_seeds_differ():
    x = torch.rand(1, 3, 64, 64)
    assert not torch.equal(MotionBlur(64, 15, seed=1)(x), MotionBlur(64, 15, seed=2)(x))
    assert not torch.equal(InpaintRandom(64, seed=1).mask, InpaintRandom(64, seed=2).mask)


# --- SR: the Resizer matrix ---------------------------------------------------------------------

def test_resizer_taps_match_notes():
    # docs/sd2_formats.md §5.3: x4, 256 -> 64, output pixel 10, inputs 34..49
    taps = [-0.001709, -0.010986, -0.018311, -0.011963, 0.022705, 0.097412, 0.181885, 0.240967,
            0.240967, 0.181885, 0.097412, 0.022705, -0.011963, -0.018311, -0.010986, -0.001709]
    M = SR(256, factor=4).M
    assert_close(M[10, 34:50], torch.tensor(taps), 6e-7, rel=False, what="taps")
    assert M[10, :34].abs().max() == 0 and M[10, 50:].abs().max() == 0
    assert_close(M.sum(1), torch.ones(64), 1e-6, what="rows sum to 1")


def test_resizer_matches_pillow_interior():
    # Pillow's BICUBIC: a = -0.5, kernel stretched by the factor when downscaling; its boundary
    # rule (truncate and renormalise) differs from the mirror, so compare interior pixels only
    x = astronaut().float()
    y = SR(512, factor=8)(x)[0]
    ref = torch.stack([torch.from_numpy(np.array(
        Image.fromarray(c.numpy()).resize((64, 64), Image.BICUBIC))) for c in x[0]])
    assert_close(y[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], 1e-5, what="SR x8 vs Pillow interior")


def test_sr_hint_is_bicubic_upsampling():
    op = SR(64, factor=4)
    y = torch.rand(1, 3, 16, 16)
    assert torch.equal(op.hint(y), torch.nn.functional.interpolate(y, scale_factor=4,
                                                                   mode="bicubic"))


# --- Gaussian and motion blur -------------------------------------------------------------------

def test_gaussian_kernel_matches_scipy():
    delta = np.zeros((61, 61))
    delta[30, 30] = 1
    ref = scipy.ndimage.gaussian_filter(delta, sigma=3.0)  # the official Blurkernel
    k = Blur().kernel[0, 0].double()  # its 25 x 25 centre: every tap beyond radius 12 is 0
    assert k.shape == (25, 25) and ref[:18].max() == ref[43:].max() == ref[:, :18].max() == 0
    assert_close(k, torch.from_numpy(ref[18:43, 18:43]), 1e-6, what="Gaussian kernel vs scipy")
    assert abs(k[12, 12] - 0.0176849) < 1e-7
    assert abs(k.sum() - 1) < 1e-6
    # applied as its centre, the blur is the official 61 x 61 one
    x = astronaut()[..., :64, 200:264].float()
    full = torch.from_numpy(ref).float()[None, None].expand(3, -1, -1, -1)
    official = F.conv2d(F.pad(x, (30, 30, 30, 30), mode="reflect"), full, groups=3)
    assert_close(Blur(64)(x), official, 1e-6, what="centre vs 61 x 61 kernel")


def test_blur_matches_scipy():
    # torch's reflect padding (d c b | a b c d) is scipy's mode "mirror": equal everywhere;
    # scipy's default "reflect" (c b a | a b c d) agrees 12 px (the kernel radius) from the edge
    x = astronaut()[..., :256, 128:384].float()  # the face: a 256 crop keeps the test fast
    y = Blur(256)(x)[0]
    for mode, crop in (("mirror", 0), ("reflect", 12)):
        ref = np.stack([scipy.ndimage.gaussian_filter(c, 3.0, mode=mode) for c in x[0].numpy()])
        ref = torch.from_numpy(ref)
        inner = slice(crop, 256 - crop)
        assert_close(y[:, inner, inner], ref[:, inner, inner], 1e-5, what=f"blur vs scipy {mode}")


def test_motion_kernel():
    k = MotionBlur(seed=0).kernel[0, 0]
    assert k.shape == (61, 61)
    assert (k >= 0).all() and abs(k.sum() - 1) < 1e-5
    assert k.max() < 0.5 and (k > 0).sum() > 20  # a trajectory, not a delta
    assert torch.equal(k, MotionBlur(seed=0).kernel[0, 0])


# --- Nonlinear blur: KernelWizard ---------------------------------------------------------------

def test_kernel_wizard_full_size_names():
    # docs/sd2_formats.md §5.3: GOPRO_wVAE.pth holds 159 tensors, 115,265,475 params
    with torch.device("meta"):
        state = KernelWizard(GOPRO).state_dict()
    assert len(state) == 159
    assert sum(t.numel() for t in state.values()) == 115_265_475
    counts = {p: sum(k.startswith(p + ".") for k in state)
              for p in ("feature_extractor", "kernel_extractor", "adapter", "recon_trunk")}
    assert counts == {"feature_extractor": 46, "kernel_extractor": 14, "adapter": 11,
                      "recon_trunk": 88}
    assert state["adapter.model.submodule.submodule.submodule.submodule.up.1.weight"].shape == (
        1024, 512, 4, 4)  # innermost: features (+) 512-channel kernel code
    assert "adapter.model.up.1.bias" in state and "adapter.model.submodule.up.1.bias" not in state


def test_nonlinear_blur_output():
    op = SMALL["nonlinear_blur"]()
    assert op.k.shape == (1, 64, 1, 1)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    y = op(x)
    assert y.abs().max() <= 1 and not torch.equal(y, x)
    assert_close(op(x[1:]), y[1:], 1e-5, what="batch independence")  # the code is fixed


def test_kernel_wizard_safetensors_round_trip(tmp_path):
    net = tiny_wizard()
    path = str(tmp_path / "kw.safetensors")
    save_file(net.state_dict(), path)
    loaded = load_kernel_wizard(path, TINY)
    x, k = torch.rand(1, 3, 128, 128), torch.randn(1, 64, 1, 1)
    assert torch.equal(loaded(x, k), net(x, k))
    with pytest.raises(ValueError, match="missing"):
        save_file({k: v for k, v in net.state_dict().items() if "adapter" not in k}, path)
        load_kernel_wizard(path, TINY)
    with pytest.raises(ValueError, match="no such file"):
        NonlinearBlur(128, weights=str(tmp_path / "nothing.safetensors"))


# --- Bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: SR(512, factor=0), "factor must be an integer >= 1"),
    (lambda: SR(512, factor=2.5), "factor must be an integer >= 1"),
    (lambda: SR(100, factor=8), "divisible by 8, got 100"),
    (lambda: SR(0), "size must be a positive integer"),
    (lambda: Blur(kernel_size=60), "kernel_size must be a positive odd integer, got 60"),
    (lambda: Blur(std=-1.0), "std must be > 0"),
    (lambda: Blur(std=0.0), "std must be > 0"),
    (lambda: Blur(kernel_size=15, std=3.0), "too wide for a 15x15 kernel"),
    (lambda: Blur(size=12), "needs images larger than 12 px"),  # the std-3 taps reach 12
    (lambda: MotionBlur(kernel_size=8), "kernel_size must be a positive odd integer, got 8"),
    (lambda: MotionBlur(intensity=1.5), r"intensity must be in \[0, 1\]"),
    (lambda: NonlinearBlur(100, weights=KernelWizard(TINY)), "divisible by 128, got 100"),
    (lambda: Inpaint(64, box=100), r"box must be an integer in \[1, size=64\), got 100"),
    (lambda: Inpaint(64, box=0), r"box must be an integer in \[1, size=64\), got 0"),
    (lambda: InpaintRandom(64, fraction=1.0), r"fraction .* must be in \[0, 1\), got 1.0"),
    (lambda: InpaintRandom(64, fraction=-0.1), r"fraction .* must be in \[0, 1\), got -0.1"),
    (lambda: SR(64, factor=4)(torch.zeros(1, 3, 32, 32)), "expects NCHW images of 64x64"),
    (lambda: Inpaint(64, box=16).measure(torch.zeros(1, 3, 64, 64), sigma_y=-1.0),
     "sigma_y must be >= 0"),
])
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()
