"""Shared test helpers, imported by the tests (pytest puts tests/ on sys.path)."""

import torch


def assert_close(actual, expected, tol: float, *, rel: bool = True, what: str = ""):
    """Assert max|actual - expected| <= tol (times max|expected| when rel); print the errors."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-12) if rel else torch.tensor(1.0)
    print(f"{what}: max abs err {err.max():.3e}, mean {err.mean():.3e}, scale {scale:.3e}")
    assert err.max() <= tol * scale, f"{what}: max err {err.max():.3e} > {tol:g} x {scale:.3e}"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (reference inits leave some at exactly 0 or 1), so a swapped or
    skipped weight shows in the outputs: weights ~ N(0, 1/fan_in), biases ~ 0.2 N(0, 1), norm
    scales ~ 1 + 0.2 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()
