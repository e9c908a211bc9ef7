"""Your own operator, --op FILE.py:CLASS (Table 10, right: a segmentation network as A): loading,
the one-line refusals, guidance raising the mIoU on the shipped 32 px prior, eval.py's record,
the command line; and mIoU itself on a case computed by hand."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dmap
import eval as evaluation
import metrics
import operators

PRIOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                     "mini-prior")
EXAMPLE = os.path.join(PRIOR, "example.png")

# The user's file: TinySeg, a random (seeded) segmentation network 3 -> 8 -> 4 channels with 4
# class probabilities per pixel, as the contract's easy path (a subclass of Operator); Half, a
# plain linear nn.Module with an adjoint; Seeded, which takes the seed; then one class per way a
# plugin can be wrong.
SEG = '''
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import operators


class TinySeg(operators.Operator):
    def __init__(self, size):
        super().__init__(size)
        g = torch.Generator().manual_seed(1)  # weights that split example.png into 4 classes
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        for conv in (self.conv1, self.conv2):
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) / \\
                conv.weight[0].numel() ** 0.5

    def forward(self, x):
        self.check(x)
        return F.softmax(4 * self.conv2(torch.tanh(self.conv1(x))), dim=1)


class Half(nn.Module):
    def __init__(self, size):
        super().__init__()

    def forward(self, x):
        return x / 2

    def adjoint(self, v):
        return v / 2


class Seeded(TinySeg):
    def __init__(self, size, seed):
        super().__init__(size)
        self.seed = seed


class NotAModule:
    def __init__(self, size):
        pass


class NeedsClasses(nn.Module):
    def __init__(self, size, classes):
        super().__init__()


class Bad(nn.Module):
    def __init__(self, size, out=None):
        super().__init__()
        self.out = out


class Crashes(Bad):
    def forward(self, x):
        return x.view(-1, 7)


class Numpy(Bad):
    def forward(self, x):
        return x.detach().numpy()


class Batchless(Bad):
    def forward(self, x):
        return x.sum()


class Infinite(Bad):
    def forward(self, x):
        return x / 0


class Detached(Bad):
    def forward(self, x):
        return 2 * x.detach()


class Labels(Bad):
    def forward(self, x):
        return x.argmax(1)
'''


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """The folder holding seg.py (the file above) and broken.py (which fails to import)."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "seg.py").write_text(SEG)
    (folder / "broken.py").write_text("raise RuntimeError('boom\\nand more')\n")
    return folder


def test_miou_by_hand():
    """A 4 x 4 case with 3 classes; pred and target differ in 3 pixels, (0, 1), (1, 3), (3, 2):
    class 0: pred 6 pixels, target 4, both 4, either 6 -> IoU 4/6 = 2/3
    class 1: pred 6, target 6, both 5 (not (0, 1), (1, 3)), either 7 -> 5/7
    class 2: pred 4, target 6, both 4, either 6 -> 2/3
    mIoU = (2/3 + 5/7 + 2/3) / 3 = (14 + 15 + 14) / 63 = 43/63 = 0.68254"""
    pred = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, 1, 1],
                     [2, 2, 0, 0]])
    target = np.array([[0, 1, 1, 1],
                       [0, 0, 1, 2],
                       [2, 2, 1, 1],
                       [2, 2, 2, 0]])
    assert metrics.miou(pred, target) == pytest.approx(43 / 63, abs=1e-12)
    assert metrics.miou(torch.as_tensor(pred), torch.as_tensor(target)) == \
        pytest.approx(43 / 63, abs=1e-12)
    # only classes 1 and 2 (7 occurs in neither map): (5/7 + 2/3) / 2 = 29/42
    assert metrics.miou(pred, target, classes=[1, 2, 7]) == pytest.approx(29 / 42, abs=1e-12)
    assert metrics.miou(target, target) == 1.0
    # a class in one map only counts, with IoU 0: (0 + 1) / 2
    assert metrics.miou(np.array([[0, 1]]), np.array([[2, 1]])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="two label maps"):
        metrics.miou(pred, target[:3])
    with pytest.raises(ValueError, match="none of the classes"):
        metrics.miou(pred, target, classes=[5])


def test_miou_in_the_tables():
    """A known metric outside the default list; the scorer takes it, the tables show it."""
    assert "miou" in metrics.KNOWN and "miou" not in metrics.METRICS
    scorer = metrics.Scorer(["psnr", "miou"])
    ref = np.zeros((16, 16, 3), np.uint8)
    assert set(scorer.pair(ref, ref + 1)) == {"psnr"}  # mIoU needs the operator (Run.restore)
    rows = [dict(psnr=20.0, miou=0.5, y_rmse=0.1), dict(psnr=22.0, miou=0.7, y_rmse=0.2)]
    summary = metrics.summarize(rows, ["psnr", "miou"], 1000)
    assert summary["miou"]["mean"] == pytest.approx(0.6)
    assert metrics.cell(summary, "miou").startswith("0.6000 ± ")
    assert metrics.LABELS["miou"] == "mIoU" and "Table 10" in metrics.CONVENTIONS["miou"]
    with pytest.raises(ValueError, match="psnr, ssim, lpips, fid, kid, sw, miou"):
        metrics.Scorer(["iou"])


def test_load(seg):
    op, args = dmap.make_operator(f"{seg}/seg.py:TinySeg", 32)
    assert isinstance(op, operators.Operator) and not hasattr(op, "adjoint")
    assert args == {"file": str(seg / "seg.py"), "class": "TinySeg", "size": 32}
    assert not op.training and not any(p.requires_grad for p in op.parameters())
    x = dmap.read_image(EXAMPLE, 32)
    y = op(x)
    assert y.shape == (1, 4, 32, 32) and torch.allclose(y.sum(1), torch.ones(1, 32, 32))
    # the hint (the panels' and the CSE's picture of y): the label map in the VOC colours
    hint = op.hint(y)
    colours = operators.voc_colours(4)
    assert hint.shape == (1, 3, 32, 32)
    assert ((colours + 1) * 127.5).round().tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0],
                                                         [128, 128, 0]]
    assert torch.equal(hint[0, :, 5, 7], colours[y[0, :, 5, 7].argmax()])
    assert operators.picture(y[:, :, ::2, ::2], 32).shape == (1, 3, 32, 32)  # upsampled
    assert operators.picture(y.flatten(1), 32).abs().max() == 0  # no picture: mid-grey
    assert operators.short_name(f"{seg}/seg.py:TinySeg") == "TinySeg"
    assert operators.short_name("sr") == "sr"
    # a plain nn.Module is wrapped, with its adjoint; a `seed` parameter gets the seed
    half, args = dmap.make_operator(f"{seg}/seg.py:Half", 32, seed=3)
    assert isinstance(half, operators.Plugin) and "seed" not in args
    assert torch.equal(half.adjoint(x), x / 2) and torch.equal(half.hint(half(x)), x / 2)
    assert torch.equal(half.measure(x), x / 2)
    assert dmap.make_operator(f"{seg}/seg.py:Seeded", 32, seed=3)[1]["seed"] == 3


@pytest.mark.parametrize("name, message", [
    ("missing.py:TinySeg", "missing.py: no such file"),
    ("broken.py:TinySeg", "broken.py failed: RuntimeError: boom"),
    ("seg.py:Nope", "defines no class Nope (its nn.Module classes: TinySeg, Half, Seeded, "),
    ("seg.py:NotAModule", "NotAModule is not a torch.nn.Module; subclass operators.Operator"),
    ("seg.py:NeedsClasses", "NeedsClasses(size=32) failed: TypeError: "),
    ("seg.py:Crashes", "Crashes failed on a (2, 3, 32, 32) test batch in [-1, 1]: RuntimeError"),
    ("seg.py:Numpy", "Numpy returned a ndarray, not a torch.Tensor"),
    ("seg.py:Batchless", "Batchless returned shape () for a batch of 2: the batch must come "),
    ("seg.py:Infinite", "Infinite returned NaN or inf"),
    ("seg.py:Detached", "Detached is not differentiable: its output has no gradient"),
    ("seg.py:Labels", "Labels is not differentiable"),
    ("seg.py", "unknown --op SEG/seg.py; choose from sr, blur, motion_blur, nonlinear_blur, "
     "inpaint, inpaint_random, or FILE.py:CLASS"),
])
def test_refusals(seg, name, message):
    with pytest.raises(ValueError) as e:
        dmap.make_operator(f"{seg}/{name}", 32)
    text = str(e.value)
    assert message.replace("SEG", str(seg)) in text and "\n" not in text, text
    with pytest.raises(ValueError, match="--blur-std applies to --op blur only"):
        dmap.make_operator(f"{seg}/seg.py:TinySeg", 32, blur_std=1.0)


def test_guidance_raises_miou(seg):
    """DPS and DMAP restore example.png from its segmentation alone, y = TinySeg(x): the
    mIoU between argmax TinySeg(restored) and argmax y rises far above the unguided sampler's.
    The shipped prior's 25 steps; DMAP at DPS's cost (dmap_setting "same": 12 steps, K 2).
    Tuned by hand on seeds 0-2 (mIoU per seed, on an AMD EPYC): ddpm 0.15 0.22 0.21;
    dps zeta 1: 0.31 mean, 4: 0.68, 16: 0.40, 64: 0.38; dmap same zeta 2: 0.36, 4: 0.47,
    8: 0.49 0.72 0.62 (0.61 mean), 16: 0.59, 32: 0.45; dmap full (25 steps, K 3, 3x the time)
    zeta 4: 0.71, 8: 0.75."""
    sd = dmap.load_sd2(PRIOR)
    op = dmap.make_operator(f"{seg}/seg.py:TinySeg", 32)[0]
    target = op(dmap.read_image(EXAMPLE, 32)).argmax(1)[0]
    settings = {"ddpm": {}, "dps": dict(zeta=4.0), "dmap": dict(zeta=8.0, dmap_setting="same")}
    miou = {}
    for method, kwargs in settings.items():
        miou[method] = []
        for seed in range(3):
            result = dmap.restore(EXAMPLE, model=sd, method=method, op=f"{seg}/seg.py:TinySeg",
                                  seed=seed, **kwargs)
            x = torch.from_numpy(result["restored"]).permute(2, 0, 1)[None] / 127.5 - 1
            miou[method].append(metrics.miou(op(x).argmax(1)[0], target))
    mean = {m: float(np.mean(v)) for m, v in miou.items()}
    assert mean["dps"] > mean["ddpm"] + 0.25 and mean["dmap"] > mean["ddpm"] + 0.25, miou
    assert result["record"]["operator"]["class"] == "TinySeg"


def test_eval_records_miou(seg, tmp_path):
    """eval.py run's restoration of one image records mIoU, under the class's name, with a
    3-channel picture of y as its measurement."""
    job = evaluation.RunSettings(images=PRIOR, out=str(tmp_path), ops=(f"{seg}/seg.py:TinySeg",),
                                 methods=("dps",), steps=5, zeta={"dps": 4.0}, model=PRIOR,
                                 size=32, metrics=("psnr", "miou"), device="cpu")
    run = evaluation.Run(job, torch.device("cpu"), torch.float32, set())
    run.restore(job.ops[0], "dps", [(0, "example", EXAMPLE)])
    record = json.loads((tmp_path / "TinySeg" / "dps" / "example.json").read_text())
    assert 0 < record["miou"] <= 1 and record["operator"]["class"] == "TinySeg"
    measurement = np.asarray(Image.open(tmp_path / "TinySeg" / "measurement" / "example.png"))
    assert measurement.shape == (32, 32, 3)
    job = evaluation.RunSettings(images=PRIOR, out=str(tmp_path), ops=("blur",), steps=2,
                                 model=PRIOR, size=32, metrics=("miou",), device="cpu")
    with pytest.raises(ValueError, match="; --op blur does not: leave miou out of --metrics"):
        evaluation.Run(job, torch.device("cpu"), torch.float32, set()).restore(
            "blur", "dps", [(0, "example", EXAMPLE)])


def test_command_line(seg, tmp_path, capsys):
    args = [EXAMPLE, "--model", PRIOR, "--method", "dps", "--zeta", "4", "--steps", "5",
            "--out", str(tmp_path)]
    assert dmap.main(args + ["--op", f"{seg}/seg.py:TinySeg"]) == 0
    stem = "example_dps_TinySeg_steps5_zeta4"
    record = json.loads((tmp_path / f"{stem}.json").read_text())
    assert record["operator"] == {"file": str(seg / "seg.py"), "class": "TinySeg", "size": 32}
    assert np.asarray(Image.open(tmp_path / f"{stem}_y.png")).shape == (32, 32, 3)
    capsys.readouterr()
    assert dmap.main(args + ["--op", f"{seg}/missing.py:TinySeg", "--force"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert err[-1].startswith("error: ") and "missing.py: no such file" in err[-1], err
