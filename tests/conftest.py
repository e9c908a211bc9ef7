"""Shared test helpers. Tests import `assert_close` from here (pytest puts tests/ on sys.path)."""

import torch


def assert_close(actual, expected, tol: float, *, rel: bool = True, what: str = ""):
    """Assert max|actual - expected| <= tol (times max|expected| when rel); print the errors."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-12) if rel else torch.tensor(1.0)
    print(f"{what}: max abs err {err.max():.3e}, mean {err.mean():.3e}, scale {scale:.3e}")
    assert err.max() <= tol * scale, f"{what}: max err {err.max():.3e} > {tol:g} x {scale:.3e}"
