"""metrics.py's LPIPS and FID networks against lpips 0.1.4 and pytorch-fid 0.3.0 themselves.

Those packages need torchvision, which cannot be imported next to this project's CPU torch, so
they run in a second environment (`.ci/run` builds .venv-ref and sets METRICS_REF_PYTHON):
tests/metrics_reference.py writes random weights in the three community file layouts through
the packages' own code paths, and their outputs; here our networks load those very files.
CI runs this test (it fails there without the environment); elsewhere it is skipped without.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from conftest import assert_close

import metrics

REF_PYTHON = os.environ.get("METRICS_REF_PYTHON")
if not REF_PYTHON and not os.environ.get("CI"):
    pytest.skip("set METRICS_REF_PYTHON to a python with torchvision, lpips and pytorch-fid "
                "(see .ci/run)", allow_module_level=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Real photographs (128 x 128 crops) and noisy copies; the weight files and the packages'
    outputs on them."""
    assert REF_PYTHON, "CI needs METRICS_REF_PYTHON (.ci/run builds .venv-ref)"
    folder = tmp_path_factory.mktemp("metric_nets")
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
              skimage.data.rocket()]
    a = np.stack([p[100:228, 100:228] for p in photos] + [p[:128, -128:] for p in photos])
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    b[::2] = np.roll(a[::2], 3, axis=2)  # half of the pairs: a small shift instead of noise
    np.save(folder / "images.npy", a)
    np.save(folder / "pairs.npy", b)
    script = os.path.join(os.path.dirname(__file__), "metrics_reference.py")
    subprocess.run([REF_PYTHON, script, str(folder)], check=True, capture_output=True)
    as_float = [torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 for v in (a, b)]
    return folder, as_float, np.load(folder / "reference.npz")


def test_lpips_equals_lpips_package(reference):
    folder, (a, b), ref = reference
    net = metrics.LPIPS.load(str(folder))
    with torch.no_grad():
        d = net(2 * a - 1, 2 * b - 1)
    assert_close(d, torch.from_numpy(ref["lpips"]), 1e-5, what="LPIPS")
    assert (d > 0).all() and d.std() > 0.1 * d.mean()  # distinct pairs give distinct values


def test_inception_features_and_fid_equal_pytorch_fid(reference):
    folder, (a, b), ref = reference
    net = metrics.FIDInception.load(str(folder))
    with torch.no_grad():
        fa, fb = net(a).double().numpy(), net(b).double().numpy()
    for ours, theirs, what in ((fa, ref["features_a"], "photos"), (fb, ref["features_b"],
                                                                  "pairs")):
        assert_close(ours, theirs, 1e-5, what=f"Inception pool features, {what}")
    assert fa.std(0).mean() > 0.01  # the features depend on the image
    fid = metrics.frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0),
                                   np.cov(fb, rowvar=False))
    assert fid == pytest.approx(float(ref["fid"]), rel=1e-4)


def test_wrong_or_missing_weight_files_say_what_to_do(reference, tmp_path, monkeypatch):
    folder = reference[0]

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable weight file.*download it again"):
        metrics.FIDInception.load(str(tmp_path))
    os.symlink(folder / "alex.pth", tmp_path / "alexnet-owt-7be5be79.pth")  # a wrong file
    os.symlink(folder / "alex.pth", tmp_path / "alex.pth")
    with pytest.raises(ValueError, match="not the LPIPS weights"):
        metrics.LPIPS.load(str(tmp_path))
    missing = r"alexnet-owt-7be5be79.pth are missing.*download.pytorch.org.*into .*empty"
    with pytest.raises(ValueError, match=missing):
        metrics.LPIPS.load(str(tmp_path / "empty"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
