"""Evaluation: the paper's metrics, runs over image folders, its tables and the Sec. 3 diagnostics.

    python eval.py score --ref DIR --pred DIR              # metrics of restored images
    python eval.py run --images DIR --op sr --methods dps,dmap --out DIR   # Tables 4 and 10
    torchrun --nproc_per_node=N eval.py run ...            # the same, sharded over N GPUs
    python eval.py observe --image IMG --op sr --cse CKPT --out DIR        # Fig. 1, 3, Table 1-3
    python eval.py speed --random-weights --methods dps,dmap-same,dmap     # speed.py's benchmark

Reading order: (1) the metric conventions and the per-image scorer; (2) `score`, pairing two
folders by name; (3) `run`: every image restored by every method with one seed per image, each
restoration written as it finishes (a killed run resumes), images sharded over torchrun's
processes, then the table in the paper's layout and a methods x images figure; (4) the three
observations of Sec. 3 on any denoiser (SD 2.0 here, the exact GMM in the tests); (5) the
command line.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import ctypes
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import scipy.stats
import torch
from PIL import Image
from tqdm import tqdm

import cse
import dmap
import metrics
import operators
import plot

# ---------------------------------------------------------------------------------------------
# (1) Metrics: the conventions, and the scorer of one image pair
# ---------------------------------------------------------------------------------------------

METRICS = ("psnr", "ssim", "lpips", "fid", "kid", "sw")
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
}
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "fid": "FID", "kid": "KID x1e3",
          "sw": "SW x1e2"}
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
    metrics named; the networks load once, before any slow work, and only if asked for."""

    def __init__(self, names, weights: str | None = None, device="cpu"):
        unknown = set(names) - set(METRICS)
        if unknown or not names:
            raise ValueError(f"--metrics takes a comma list of {', '.join(METRICS)}; got "
                             f"{','.join(names) or 'nothing'}")
        self.names, self.device = list(names), device
        try:
            self.lpips = metrics.LPIPS.load(weights).to(device) if "lpips" in names else None
            self.inception = metrics.FIDInception.load(weights).to(device) \
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
            out["psnr"] = metrics.psnr(ref, pred)
        if "ssim" in self.names:
            out["ssim"] = metrics.ssim(ref, pred)
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
    """Each metric over a set of pairs: means with intervals (the per-image ones and, in a run,
    the measurement fit y_rmse); FID and KID from the Inception features (ref, pred), SW from
    the sw_pixels vectors (ref, pred)."""
    out = {m: mean_interval([r[m] for r in per_image]) for m in ("psnr", "ssim", "lpips",
                                                                 "y_rmse")
           if m in names or (m == "y_rmse" and m in per_image[0])}
    ref_features, pred_features = features
    if "sw" in names and pixels[0] is not None:
        a, b = (torch.from_numpy(np.stack(v)) for v in pixels)
        out["sw"] = dict(value=metrics.sliced_wasserstein(
            a, b, generator=torch.Generator().manual_seed(0)), n=len(a))
    if ref_features is not None and len(ref_features) >= 2:
        a, b = np.stack(ref_features), np.stack(pred_features)
        if "fid" in names:
            out["fid"] = dict(value=metrics.frechet_distance(
                a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)),
                n=len(a))
        if "kid" in names:
            mean, std = metrics.kid(a, b, subset_size=kid_subset)
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
    digits = {"psnr": 2, "ssim": 4, "lpips": 4, "y_rmse": 4}[metric]
    ci = "" if s["ci95"] is None else f" ± {s['ci95']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{ci}"


def convention_lines(names, kid_subset) -> list[str]:
    return [f"- {CONVENTIONS[m].format(subset=kid_subset)}" for m in names] + \
        ["- ± is the half-width of the 95% interval of the mean over images (Student t)"]


# ---------------------------------------------------------------------------------------------
# (2) `score`: two folders paired by name
# ---------------------------------------------------------------------------------------------


def list_images(folder: str) -> tuple[dict, list[str]]:
    """{stem: path} of the files PIL can read in `folder` (not recursive), and the names of the
    other files (skipped, and reported)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    found, skipped = {}, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many kinds on non-images and truncated files
            skipped.append(name)
            continue
        found.setdefault(os.path.splitext(name)[0], path)
    if not found:
        raise ValueError(f"{folder} holds no readable image ({len(skipped)} other files)")
    return found, skipped


def read_uint8(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def score(args) -> dict:
    """`python eval.py score`: every metric over the pairs of --ref and --pred with one name.
    A reference of another size than its restoration is prepared as `eval.py run` does
    (centre crop, Lanczos) when the restoration is square, and refused otherwise."""
    ref, ref_skipped = list_images(args.ref)
    pred, pred_skipped = list_images(args.pred)
    scorer = Scorer(args.metrics.split(","), args.metric_weights, args.device)
    report = dict(ref=os.path.abspath(args.ref), pred=os.path.abspath(args.pred),
                  only_in_ref=sorted(set(ref) - set(pred)),
                  only_in_pred=sorted(set(pred) - set(ref)),
                  not_images=dict(ref=ref_skipped, pred=pred_skipped), resized=[], refused={})
    rows, ref_features, pred_features, ref_pixels, pred_pixels = [], [], [], [], []
    for stem in tqdm(sorted(set(ref) & set(pred)), desc="score", unit="image"):
        p = read_uint8(pred[stem])
        r = read_uint8(ref[stem])
        if r.shape != p.shape:
            if p.shape[0] != p.shape[1] or min(r.shape[:2]) < p.shape[0]:
                report["refused"][stem] = f"reference {r.shape[1]}x{r.shape[0]}, restoration " \
                    f"{p.shape[1]}x{p.shape[0]}"
                continue
            r = dmap.to_uint8(dmap.read_image(ref[stem], p.shape[0]))
            report["resized"].append(stem)
        rows.append(dict(name=stem, **scorer.pair(r, p)))
        if scorer.inception is not None:
            ref_features.append(scorer.features(r))
            pred_features.append(scorer.features(p))
        if "sw" in scorer.names:
            ref_pixels.append(sw_pixels(r))
            pred_pixels.append(sw_pixels(p))
    if not rows:
        raise ValueError(f"no image of {args.pred} has a reference of its name and size in "
                         f"{args.ref}")
    report["n"] = len(rows)
    report["metrics"] = summarize(rows, scorer.names, args.kid_subset,
                                  (ref_features or None, pred_features),
                                  (ref_pixels or None, pred_pixels))
    report["per_image"] = rows
    return report


def score_markdown(report: dict, names, kid_subset) -> str:
    lines = [f"# {report['pred']} against {report['ref']}: {report['n']} pairs", ""]
    lines += convention_lines(names, kid_subset) + ["", "| metric | value |", "|---|---|"]
    lines += [f"| {LABELS[m]} | {cell(report['metrics'], m)} |" for m in names]
    for key, what in (("only_in_ref", "references without a restoration"),
                      ("only_in_pred", "restorations without a reference"),
                      ("resized", "references centre-cropped and resized to the restoration")):
        if report[key]:
            lines.append(f"\n{len(report[key])} {what}: {', '.join(report[key][:10])}"
                         + (" ..." if len(report[key]) > 10 else ""))
    for stem, why in report["refused"].items():
        lines.append(f"\nrefused {stem}: {why}")
    for side, names_ in report["not_images"].items():
        if names_:
            lines.append(f"\n{len(names_)} files in --{side} are not images: "
                         f"{', '.join(names_[:10])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# (3) `run`: every image by every method, resumable, sharded; the paper's table and figure
# ---------------------------------------------------------------------------------------------

# The paper's method names (Table 4) -> (sampler, DMAP budget); "+cse" puts the CSE in the
# denoiser (Algorithms 3-4), "cse" alone is the unguided sampler on the CSE.
METHODS = {"ddpm": ("ddpm", None), "dps": ("dps", None), "dsg": ("dsg", None),
           "dmap": ("dmap", "full"), "dmap-same": ("dmap", "same"),
           "freedom": ("freedom", None), "resample": ("resample", None),
           "psld": ("psld", None), "cse": ("ddpm", None)}
PAPER_METHODS = "dps,dsg,dmap,dmap-same,freedom,resample,psld"
# Settings that change a restoration: a rerun into the same --out must keep them.
RUN_KEYS = ("model", "prediction", "size", "steps", "seed", "sigma_y", "dtype", "cse", "batch",
            "metrics", "zeta", "operator_flags")
RESUMES = "every restoration with a record is whole: rerun the same command to continue"


def parse_map(text: str | None, what: str, value=str) -> dict:
    """A comma list of KEY=VALUE (keys as given: 'dps=1.2,sr/dmap=3' or 'sr=runs/a') -> dict;
    ValueError saying the form."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, eq, v = item.partition("=")
        try:
            out[key.strip()] = value(v)
        except ValueError:
            eq = ""
        if not eq or not key.strip():
            raise ValueError(f"{what} takes a comma list of NAME=VALUE, got {item!r}")
    return out


def zeta_for(zetas: dict, op: str, method: str) -> float | None:
    """The step size --zeta gives a method on an operator: 'op/method', then 'method', then the
    same for the method without +cse (DPS+CSE takes DPS's unless it has its own); None: the
    default of dmap.py."""
    for name in (method, method.removesuffix("+cse")):
        for key in (f"{op}/{name}", name):
            if key in zetas:
                return zetas[key]
    return None


def cse_for(args, op: str) -> str | None:
    """The CSE of an operator: --cse PATH for every operator, or --cse sr=PATH,blur=PATH."""
    if not args.cse or "=" not in args.cse:
        return args.cse
    return parse_map(args.cse, "--cse").get(op)


def parse_methods(args, ops: list[str]) -> list[str]:
    """--methods as a list, each known, and a CSE for every operator of a CSE method; the
    --zeta keys checked against them."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    valid = list(METHODS) + [m + "+cse" for m in METHODS if m not in ("cse", "ddpm")]
    for m in methods:
        if m not in valid:
            raise ValueError(f"unknown method {m}; choose from {', '.join(valid)}")
        missing = [op for op in ops if m.endswith("cse") and not cse_for(args, op)]
        if missing:
            raise ValueError(f"method {m} needs a trained CSE for --op {missing[0]}: pass --cse "
                             "PATH (or --cse OP=PATH,...)")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods needs distinct names, got {args.methods!r}")
    for key in parse_map(args.zeta, "--zeta", float):
        op, _, m = key.rpartition("/")
        if m not in valid or (op and op not in operators.OPERATORS):
            raise ValueError(f"--zeta {key}: name a method ({', '.join(valid)}), optionally "
                             "after an operator and /, as sr/dps=1.2")
    return methods


def method_args(args, method: str, op: str, image: str, seed: int):
    """dmap.py's own arguments for one restoration, so that its checks, defaults (zeta per
    method and operator, DMAP budgets) and operator flags are the ones used."""
    sampler, budget = METHODS[method.removesuffix("+cse")]
    argv = [image, "--method", sampler, "--op", op, "--size", str(args.size), "--seed", str(seed),
            "--sigma-y", str(args.sigma_y), "--device", args.device, "--dtype", args.dtype,
            "--model", args.model]
    if budget:
        argv += ["--dmap-setting", budget]
    if args.steps:  # one budget for all; DMAP (same) keeps half the steps of the others
        argv += ["--steps", str(max(1, args.steps // 2) if budget == "same" else args.steps)]
    if method.endswith("cse"):
        argv += ["--cse", cse_for(args, op)]
    if args.prediction:
        argv += ["--prediction", args.prediction]
    zeta = zeta_for(parse_map(args.zeta, "--zeta", float), op, method)
    if zeta is not None:
        argv += ["--zeta", str(zeta)]
    for name, (flag_op, _, _) in dmap.OPERATOR_FLAGS.items():
        if flag_op == op and getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return dmap.parse_args(argv)


class PeakMemory:
    """Peak memory in MB over a with-block (`mb`), and its rise over what was in use at the start
    (`above`): torch.cuda.max_memory_allocated on a GPU; on the CPU the resident set size
    (/proc/self/statm) polled every 20 ms by a thread (rarely enough not to slow the threads
    doing the work; a network's peak lasts far longer), after glibc has handed freed pages back
    (malloc_trim), so the start is what is in use (both None without /proc)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self.above, self.stop = device, None, None, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def poll(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            try:
                ctypes.CDLL(None).malloc_trim(0)
            except (OSError, AttributeError):  # not glibc: the start may include freed pages
                pass
            self.start = self.peak = self.rss()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "thread"):
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss())
        if hasattr(self, "start"):
            self.mb, self.above = self.peak / 2**20, (self.peak - self.start) / 2**20


def image_list(args) -> tuple[list, list]:
    """The first --n images of --images (sorted by name) large enough for --size, as (index,
    stem, path), and the files left out with the reason."""
    found, not_images = list_images(args.images)
    images, left_out = [], [(name, "not an image") for name in not_images]
    for stem, path in found.items():
        if len(images) == args.n:
            break
        with Image.open(path) as image:
            side = min(image.size)
        if side < args.size:
            left_out.append((os.path.basename(path), f"{side} px, smaller than --size"))
        else:
            images.append((len(images), stem, path))
    if not images:
        raise ValueError(f"no image of {args.images} is at least {args.size} px on its short "
                         "side; pass a smaller --size")
    return images, left_out


def code_version() -> str:
    """The git commit of this file's checkout (+dirty with uncommitted changes), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def images_sha256(images) -> dict:
    """{stem: the sha256 of the file's bytes} of a run's images: other bytes under the same
    names are other images."""
    out = {}
    for _, stem, path in images:
        with open(path, "rb") as f:
            out[stem] = hashlib.sha256(f.read()).hexdigest()
    return out


def parsed(path: str) -> dict | None:
    """The JSON object in the file `path`; None when it holds none (truncated, or not JSON)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError:  # json's errors, and bytes that are not text
        return None
    return value if isinstance(value, dict) else None


def made_of(out: str, stem: str) -> bool:
    """Whether --out holds anything made of the image `stem`: its reference (written before
    its restorations), a restoration or a measurement."""
    return any(os.path.exists(os.path.join(out, "reference", stem + e)) for e in (".png", ".npy")) \
        or bool(glob.glob(os.path.join(glob.escape(out), "*", "*", glob.escape(stem) + ".png")))


def check_run(args, images, settings: dict) -> dict | None:
    """--out holds one run: a rerun with other images or settings would mix two experiments.
    An image whose bytes changed before anything was made of it (one that could not be read,
    since fixed) is no other run. -> what run.json is to hold, None when it holds it."""
    path = os.path.join(args.out, "run.json")
    if not os.path.exists(path):
        return settings
    old = parsed(path)
    if old is None:
        raise ValueError(f"{path} does not parse: it holds the settings of the run in --out; "
                         "delete it if this command's settings are that run's, or use another "
                         "--out")
    other = [why for key, why in (
        ("images", f"folder {old.get('images')}, not {settings['images']}"),
        ("n", f"n = {old.get('n')}, not {settings['n']}")) if old.get(key) != settings[key]]
    # A settings file without images_sha256 was written before the images' bytes were kept:
    # they cannot be checked, and are kept from now on.
    kept, now = old.get("images_sha256"), settings["images_sha256"]
    if kept is not None:
        other += [f"other bytes in {os.path.basename(file)}" for _, stem, file in images
                  if kept.get(stem) != now[stem] and made_of(args.out, stem)]
    if other:
        raise ValueError(f"--out {args.out} holds a run of other images ({other[0]}); use "
                         "another --out")
    for key in RUN_KEYS:
        if old.get(key) != settings[key]:
            raise ValueError(f"--out {args.out} holds a run with {key} = {old.get(key)!r}, not "
                             f"{settings[key]!r}; use another --out")
    return None if kept == now else dict(old, images_sha256=now)


class Run:
    """What every restoration of a run shares: the scorer, the pipeline, and the CSE of each
    operator that a CSE method restores (loaded first, so that a CSE trained for another
    operator or size is refused before anything is restored)."""

    def __init__(self, args, device, dtype, cse_ops):
        self.args, self.device = args, device
        if "lpips" in args.metrics.split(",") and args.size < metrics.LPIPS.MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {metrics.LPIPS.MIN_SIZE} px, and "
                             f"--size is {args.size}: drop lpips from --metrics")
        self.scorer = Scorer(args.metrics.split(","), args.metric_weights, device)
        self.controlnets = {op: cse.load_cse(cse_for(args, op), op, args.size, device, dtype)[0]
                            for op in cse_ops}
        self.sd = dmap.load_sd2(args.model, args.prediction, device, dtype)
        dmap.set_checkpointing(self.sd.unet, self.sd.vae, args.checkpointing)
        self.context = dmap.encode_prompt(self.sd, "")

    def denoiser(self, method: str, op_name: str, op, y):
        sd = self.sd
        if not method.endswith("cse"):
            return dmap.SDDenoiser(sd.unet, self.context, sd.abar, sd.prediction)
        return cse.CSEDenoiser(sd.unet, self.controlnets[op_name], self.context, sd.abar,
                               op.hint(y), sd.prediction)

    def reference(self, stem: str, path: str) -> tuple[np.ndarray, torch.Tensor]:
        """The reference as the run sees it (centre crop, Lanczos to --size), written once to
        reference/ with its Inception features."""
        x = dmap.read_image(path, self.args.size)
        image = dmap.to_uint8(x)
        folder = os.path.join(self.args.out, "reference")
        os.makedirs(folder, exist_ok=True)
        if self.scorer.inception is not None and \
                not os.path.exists(os.path.join(folder, stem + ".npy")):
            features = self.scorer.features(image)
            cli.write_atomic(os.path.join(folder, stem + ".npy"),
                             lambda tmp: np.save(tmp, features))
        if not os.path.exists(os.path.join(folder, stem + ".png")):
            cli.write_atomic(os.path.join(folder, stem + ".png"), Image.fromarray(image).save)
        return image, x

    def restore(self, op_name: str, method: str, batch: list) -> None:
        """One batch of images (index, stem, path) restored by one method, then per image:
        the restoration, its measurement, its features, and last its record (which marks it
        done). The batch shares the seed of its first image."""
        index, stem, path = batch[0]
        seed = self.args.seed + index
        a = method_args(self.args, method, op_name, path, seed)
        steps, kwargs = dmap.settings(a)
        op, op_args = dmap.build_operator(a)
        op = op.to(self.device)  # data in float32, networks in --dtype (dmap.SDDenoiser)
        refs = [self.reference(s, p) for _, s, p in batch]
        x_ref = torch.cat([x for _, x in refs]).to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        y = op.measure(x_ref, self.args.sigma_y, generator)
        denoiser = self.denoiser(method, op_name, op, y)
        start = time.perf_counter()
        with PeakMemory(self.device) as peak:
            z0 = dmap.sample(a, self.sd, denoiser, op, y, steps, kwargs, generator)
            with torch.no_grad():
                restored = self.sd.decode(z0)
        seconds = (time.perf_counter() - start) / len(batch)
        with torch.no_grad():  # measurement fit, on [-1, 1] before the 8-bit rounding
            y_rmse = (op(restored.clamp(-1, 1)) - y).flatten(1).pow(2).mean(1).sqrt().tolist()
        hint = op.hint(y) if y.shape[-1] != self.args.size else y
        folder = os.path.join(self.args.out, op_name, method)
        os.makedirs(os.path.join(self.args.out, op_name, "measurement"), exist_ok=True)
        os.makedirs(folder, exist_ok=True)
        for b, (i, s, p) in enumerate(batch):
            image = dmap.to_uint8(restored[b:b + 1])
            cli.write_atomic(os.path.join(folder, s + ".png"), Image.fromarray(image).save)
            measurement = os.path.join(self.args.out, op_name, "measurement", s + ".png")
            if not os.path.exists(measurement):
                cli.write_atomic(measurement,
                                 Image.fromarray(dmap.to_uint8(hint[b:b + 1])).save)
            features = self.scorer.features(image)
            if features is not None:
                cli.write_atomic(os.path.join(folder, s + ".npy"),
                                 lambda tmp, f=features: np.save(tmp, f))
            record = dict(image=os.path.abspath(p), index=i, seed=seed, batch=len(batch),
                          method=method, op=op_name, operator=op_args,
                          sampler=dict(kwargs, steps=steps), seconds=round(seconds, 3),
                          peak_mb=None if peak.mb is None else round(peak.mb, 1),
                          y_rmse=y_rmse[b], **self.scorer.pair(refs[b][0], image))
            cli.write_json(os.path.join(folder, s + ".json"), record)


def todo(args, images, ops, methods, rank, world) -> list:
    """This process's work: (op, method, batch). The batches are fixed: the images in order,
    --batch at a time, the c-th batch on process c % world (disjoint shards covering every
    image), so that a restoration does not depend on interruptions or on the number of
    processes. A batch is redone whole when any of its images has no record yet, or one that
    does not parse (a line on stderr names it): it then gets its seed and companions again."""
    batches = [images[k:k + args.batch] for k in range(0, len(images), args.batch)]
    work = []
    for op in ops:
        for method in methods:
            for batch in batches[rank::world]:
                missing = False
                for _, stem, _ in batch:
                    path = os.path.join(args.out, op, method, stem + ".json")
                    if not os.path.exists(path):
                        missing = True
                    elif parsed(path) is None:
                        print(f"{path} does not parse; restoring it again", file=sys.stderr)
                        missing = True
                if missing:
                    work.append((op, method, batch))
    return work


def collect(args, images, ops, methods) -> dict:
    """The table's numbers from the files on disk (all shards): per operator and method the
    summary, the mean time and the peak memory; ValueError naming what is missing or does not
    parse."""
    names = args.metrics.split(",")
    on_disk = {}
    for op in ops:
        for m in methods:
            for _, stem, _ in images:
                path = os.path.join(args.out, op, m, stem + ".json")
                on_disk[op, m, stem] = parsed(path) if os.path.exists(path) else None
    missing = ["/".join(key) for key, record in on_disk.items() if record is None]
    if missing:
        raise ValueError(f"{len(missing)} restorations are missing or unreadable (first: "
                         f"{missing[0]}); run the same command again to redo them")
    feats = {"fid", "kid"} & set(names)

    def load(path):
        with open(path, "rb") as f:
            return np.load(f)

    ref = [load(os.path.join(args.out, "reference", s + ".npy")) for _, s, _ in images] \
        if feats else None
    sw = "sw" in names
    ref_pixels = [sw_pixels(read_uint8(os.path.join(args.out, "reference", s + ".png")))
                  for _, s, _ in images] if sw else None
    table = {}
    for op in ops:
        for m in methods:
            folder = os.path.join(args.out, op, m)
            records = [on_disk[op, m, stem] for _, stem, _ in images]
            pred = [load(os.path.join(folder, s + ".npy")) for _, s, _ in images] \
                if feats else None
            pred_pixels = [sw_pixels(read_uint8(os.path.join(folder, s + ".png")))
                           for _, s, _ in images] if sw else None
            summary = summarize(records, names, args.kid_subset, (ref, pred),
                                (ref_pixels, pred_pixels))
            peaks = [r["peak_mb"] for r in records if r["peak_mb"] is not None]
            summary.update(seconds=float(np.mean([r["seconds"] for r in records])),
                           peak_mb=max(peaks) if peaks else None, sampler=records[0]["sampler"])
            table[f"{op}/{m}"] = summary
    return table


def table_markdown(args, table, ops, methods, settings, left_out) -> str:
    """Table 4's layout (Table 10's for inpainting): a row per method, per operator the time
    per image and each metric; the conventions and the code version above it."""
    names = args.metrics.split(",")
    lines = [f"# eval.py run: {settings['n']} images of {settings['images']}, code "
             f"{settings['code']}", "",
             f"model {settings['model']}, {settings['size']} px, seed {settings['seed']} + "
             f"image index, sigma_y {settings['sigma_y']}, {settings['dtype']} on "
             f"{settings['device']}, batch {settings['batch']}", ""]
    lines += ["- time (s): sampling and decoding per image (batch time / batch), the mean over "
              "images; peak memory per image in its JSON record",
              "- y RMSE: the measurement fit, RMS of A(x) - y on [-1, 1] pixels (x the "
              "restoration before 8-bit rounding)"] + \
        convention_lines(names, args.kid_subset) + [""]
    head = ["method"] + [f"{op} {c}" for op in ops for c in ["time (s)"] +
                         [LABELS[n] for n in names] + ["y RMSE"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m]
        for op in ops:
            s = table[f"{op}/{m}"]
            row += [f"{s['seconds']:.1f}"] + [cell(s, n) for n in names] + [cell(s, "y_rmse")]
        lines.append("| " + " | ".join(row) + " |")
    if left_out:
        lines += ["", f"{len(left_out)} files left out: " + ", ".join(
            f"{name} ({why})" for name, why in left_out[:10])]
    return "\n".join(lines) + "\n"


def grid(args, op: str, methods, images) -> Image.Image:
    """Fig. 6: a row per image (the first --grid), measurement | each method | reference."""
    rows, titles = [], []
    for _, stem, _ in images[:args.grid]:
        paths = [os.path.join(args.out, op, "measurement", stem + ".png")] + \
            [os.path.join(args.out, op, m, stem + ".png") for m in methods] + \
            [os.path.join(args.out, "reference", stem + ".png")]
        images = [Image.open(p) for p in paths]
        grow = max(1, 128 // images[0].width)  # small images drawn at 128 px or more
        rows.append([im.resize((im.width * grow, im.height * grow), Image.NEAREST)
                     for im in images])
        titles.append(["measurement"] + list(methods) + ["reference"])
    return plot.image_grid(rows, titles, title=f"{op}: {len(methods)} methods")


def run(args) -> str:
    """`python eval.py run` (or under torchrun): restores what is missing, then rank 0 writes
    table.md, table.json and a grid per operator; returns a one-line summary."""
    ops = [o.strip() for o in args.op.split(",")]
    for o in ops:
        if o not in operators.OPERATORS:
            raise ValueError(f"unknown --op {o}; choose from {', '.join(operators.OPERATORS)}")
    methods = parse_methods(args, ops)
    checks = [(args.n >= 1, f"--n must be >= 1, got {args.n}"),
              (args.batch >= 1, f"--batch must be >= 1, got {args.batch}"),
              (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
              (args.grid >= 0, f"--grid must be >= 0, got {args.grid}")]
    checks += [(getattr(args, name) is None or op in ops, f"--{name.replace('_', '-')} applies "
                f"to --op {op}, which this run does not restore")
               for name, (op, _, _) in dmap.OPERATOR_FLAGS.items()]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for op in ops:  # every method's flags checked by dmap.py before anything loads
        for m in methods:
            dmap.settings(method_args(args, m, op, "-", args.seed))
    images, left_out = image_list(args)
    rank, world, device = cse.distributed(torch.device(args.device))
    args.device = str(device)
    settings = dict(images=os.path.abspath(args.images), n=len(images),
                    images_sha256=images_sha256(images),
                    model=os.path.abspath(args.model), prediction=args.prediction,
                    size=args.size, steps=args.steps, seed=args.seed, sigma_y=args.sigma_y,
                    dtype=args.dtype, cse={op: os.path.abspath(cse_for(args, op)) for op in ops
                                           if cse_for(args, op)} or None,
                    batch=args.batch, metrics=args.metrics, zeta=args.zeta,
                    operator_flags={k: getattr(args, k) for k in dmap.OPERATOR_FLAGS
                                    if getattr(args, k) is not None},
                    device=device.type, code=code_version())
    stale = check_run(args, images, settings)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {args.out} ({e.strerror})") from None
    work = todo(args, images, ops, methods, rank, world)
    if work:
        context = Run(args, device, getattr(torch, args.dtype),
                      {op for op, m, _ in work if m.endswith("cse")})
    if rank == 0 and stale is not None:  # after loading: a run that cannot start leaves none
        cli.write_json(os.path.join(args.out, "run.json"), stale)
    if work:
        for op, m, batch in tqdm(work, desc=f"rank {rank}" if world > 1 else "restore",
                                 unit="batch", position=rank):
            try:
                context.restore(op, m, batch)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"while restoring {batch[0][1]} with {m} ({op}); "
                                        f"{RESUMES}") from None
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return f"rank {rank}: {len(work)} batches restored"
    table = collect(args, images, ops, methods)
    text = table_markdown(args, table, ops, methods, settings, left_out)
    cli.write_text(os.path.join(args.out, "table.md"), text)
    cli.write_json(os.path.join(args.out, "table.json"), dict(settings=settings, table=table,
                                                         left_out=left_out))
    if args.grid:
        for op in ops:
            cli.write_atomic(os.path.join(args.out, op, "grid.png"),
                             grid(args, op, methods, images).save)
    print(text)
    return f"{len(work)} batches restored, table of {len(images)} images in " \
        f"{os.path.join(args.out, 'table.md')}"


# ---------------------------------------------------------------------------------------------
# (4) The three observations of Sec. 3, on any denoiser
# ---------------------------------------------------------------------------------------------


def tweedie_score(denoiser, x, sigma: float) -> torch.Tensor:
    """s(x) = (x0_hat(x) - x) / sigma^2 (Tweedie, Eq. 4), flattened to (N, n)."""
    with torch.no_grad():
        return (denoiser(x, sigma) - x).flatten(1) / sigma**2


def score_error(score, reference, sigma: float, mc_var=None) -> float:
    """sigma * RMS over samples and coordinates of s - s_ref: epsilon units, per coordinate (so
    SD latents and 2-d toys are on one scale); the squared error debiased by the Monte Carlo
    variance of an estimated s (dmap.implied_score)."""
    se = (score - reference).pow(2).sum(1) - (0 if mc_var is None else mc_var)
    return sigma * math.sqrt(max(se.mean().item() / score.shape[1], 0.0))


def observation_1(reference, denoiser, runs, x, y, A, sigmas, *, repeats=8, seed=0, parts=None,
                  every=1, callback=None) -> dict:
    """Observation I (Fig. 1, Table 1; Eq. 9-10): along the trajectory of the unguided sampler on
    the reference conditional denoiser started at x (the CSE on SD, as the paper's ControlNet
    check; the exact posterior on a GMM), every `every`-th step, the score_error against the
    reference's score of the unconditional score and of the score each run (label, sampler,
    hyper-parameters) implies (dmap.implied_score; `repeats` noise draws, DPS's is exact).
    The authors' distance (1 - abar_t) mean((eps - eps_ref)^2) (pipe.py:3537-3577,
    docs/official_code.md §9.2) is (1 - abar_t) times our value squared; their reference was a
    StableSR trajectory, which this project has no weights for."""
    s = sigmas.tolist()
    generator = torch.Generator(x.device).manual_seed(seed)
    out = dict(sigmas=[], error={label: [] for label in ["unconditional"] + [r[0] for r in runs]})
    for i in range(len(s) - 1):
        if i % every == 0:
            ref = tweedie_score(reference, x, s[i])
            out["sigmas"].append(s[i])
            out["error"]["unconditional"].append(
                score_error(tweedie_score(denoiser, x, s[i]), ref, s[i]))
            for label, name, hyper in runs:
                score, mc_var = dmap.implied_score(
                    name, denoiser, x, y, A, s[i], s[i + 1], repeats=1 if name == "dps" else
                    repeats, seed=seed + i, parts=parts, **hyper)
                out["error"][label].append(score_error(score, ref, s[i], mc_var))
        x = dmap.ddpm(reference, x, y, A, sigmas[i:i + 2], generator=generator)
        if callback is not None:
            callback(i)
    return out


def observation_2(reference, denoiser, runs, x, y, A, sigmas, *, repeats=8, seed=0, parts=None,
                  chunk=64, callback=None) -> dict:
    """Observation II (Table 2; Eq. 11-12): at the first step, over the samples x of p(x_T | y)
    (on SD, N(0, sigma_max^2), which it is up to the data's variance), the mean of each score:
    every valid conditional score has mean zero there. Per label, in epsilon units and per
    coordinate: sigma ||mean|| / sqrt(n), its standard error, and sigma * RMS ||s|| / sqrt(n)."""
    s = sigmas.tolist()
    parts_of = {label: [] for label in ["reference conditional", "unconditional"] +
                [r[0] for r in runs]}
    for k in range(0, len(x), chunk):
        xk = x[k:k + chunk]
        parts_of["reference conditional"].append(tweedie_score(reference, xk, s[0]))
        parts_of["unconditional"].append(tweedie_score(denoiser, xk, s[0]))
        for label, name, hyper in runs:
            parts_of[label].append(dmap.implied_score(
                name, denoiser, xk, y, A, s[0], s[1], repeats=1 if name == "dps" else repeats,
                seed=seed + k, parts=parts, **hyper)[0])
        if callback is not None:
            callback(len(xk))
    out, n = {}, x[0].numel()
    for label, chunks in parts_of.items():
        v = torch.cat(chunks).double()
        out[label] = dict(norm=s[0] * v.mean(0).norm().item() / math.sqrt(n),
                          se=s[0] * (v.std(0) / math.sqrt(len(v))).norm().item() / math.sqrt(n),
                          rms=s[0] * v.pow(2).sum(1).mean().sqrt().item() / math.sqrt(n))
    return out


def pixel_std(samples: torch.Tensor) -> np.ndarray:
    """Observation III (Fig. 3, Table 3; Eq. 13): the standard deviation over k samples (k, ...)
    of one measurement, per coordinate; images (k, 3, H, W) -> (H, W), averaged over RGB (the
    authors' cal_var.ipynb: torch.std(xs, dim=0) on [-1, 1] images, docs/official_code.md §9.4)."""
    std = samples.double().std(0)
    return (std.mean(0) if std.ndim == 3 else std).cpu().numpy()


def observe(args) -> str:
    """`python eval.py observe`: the three observations for one measurement of --image on SD 2.0
    (or any pipeline folder), with a trained CSE as the reference conditional score. Each part is
    written when done and skipped when its file exists (a killed run resumes)."""
    os.makedirs(args.out, exist_ok=True)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k, (op, _, _) in
             dmap.OPERATOR_FLAGS.items() if op == args.op and getattr(args, k) is not None]
    a = dmap.parse_args([args.image, "--method", "dps", "--op", args.op, "--size", str(args.size),
                         "--seed", str(args.seed), "--cse", args.cse, "--model", args.model,
                         *flags])
    dmap.check_operator_flags(args)
    checks = [(min(args.k, args.k_mean, args.trajectories, args.batch, args.every,
                   args.repeats, args.steps) >= 1, "--k, --k-mean, --trajectories, --batch, "
               "--every, --repeats and --steps must be >= 1"),
              (args.k >= 2, "--k must be >= 2 (a standard deviation needs two samples)")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    op = dmap.build_operator(a)[0].to(device)  # data in float32, networks in --dtype
    generator = torch.Generator(device).manual_seed(args.seed)
    y = op.measure(dmap.read_image(args.image, args.size).to(device), 0.0, generator)
    sd = dmap.load_sd2(args.model, args.prediction, device, dtype)
    unconditional = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar, sd.prediction)
    reference = dmap.load_denoiser(a, sd, op, y, device, dtype)[0]  # the CSE

    def A(z):
        return op(sd.decode(z))

    given = parse_map(args.zeta, "--zeta", float)

    def zeta_of(method):  # --zeta's, else dmap.ZETA's: (SR x8, the other operators)
        value = zeta_for(given, args.op, method)
        return dmap.ZETA[method][0 if args.op == "sr" else 1] if value is None else value

    zeta, rate = zeta_of("dps"), zeta_of("dsg")
    try:
        zetas = [float(z) for z in args.zetas.split(",")] if args.zetas else \
            [zeta / 4, zeta, 4 * zeta]
    except ValueError:
        raise ValueError(f"--zetas takes a comma list of numbers, got {args.zetas!r}") from None
    runs = [(f"DPS zeta={z:g}", "dps", dict(zeta=z)) for z in zetas] + \
        [(f"DSG rate={rate:g}", "dsg", dict(zeta=rate)),
         (f"DMAP zeta={zeta_of('dmap'):g}", "dmap", dict(zeta=zeta_of("dmap")))]
    sigmas = dmap.sd_sigmas(args.steps, sd.abar)
    latent = sd.latent(args.size)

    def noise(n, seed):
        g = torch.Generator(device).manual_seed(seed)
        return sigmas[0].item() * dmap.noise_like(torch.empty((n, *latent), device=device), g)

    done = {}
    for name in ("observation_1", "observation_2"):
        path = os.path.join(args.out, name + ".json")
        if os.path.exists(path):
            done[name] = parsed(path)
            if done[name] is None:  # truncated by a crash before the atomic writers: redo it
                del done[name]
                print(f"{path} does not parse; computing it again", file=sys.stderr)
    if "observation_1" not in done:
        with tqdm(total=args.steps, desc="observation I", unit="step") as bar:
            done["observation_1"] = observation_1(
                reference, unconditional, runs, noise(args.trajectories, args.seed + 1), y, A,
                sigmas, repeats=args.repeats, seed=args.seed, every=args.every,
                callback=lambda i: bar.update(1))
        cli.write_json(os.path.join(args.out, "observation_1.json"), done["observation_1"])
    if "observation_2" not in done:
        with tqdm(total=args.k_mean, desc="observation II", unit="sample") as bar:
            done["observation_2"] = observation_2(
                reference, unconditional, runs, noise(args.k_mean, args.seed + 2), y, A, sigmas,
                repeats=args.repeats, seed=args.seed, chunk=args.batch, callback=bar.update)
        cli.write_json(os.path.join(args.out, "observation_2.json"), done["observation_2"])
    maps = {}
    for label, name, hyper in runs[:len(zetas)] + runs[-1:] + [("CSE", "ddpm", {})]:
        path = os.path.join(args.out, "observation_3_" + label.replace(" ", "_") + ".npy")
        if not os.path.exists(path):
            denoiser = reference if label == "CSE" else unconditional
            images = []
            for k in tqdm(range(0, args.k, args.batch), desc=f"observation III {label}",
                          unit="batch"):
                b = min(args.batch, args.k - k)
                g = torch.Generator(device).manual_seed(args.seed + 3 + k)
                z0 = dmap.SAMPLERS[name](denoiser, noise(b, args.seed + 3 + k), y, A, sigmas,
                                         generator=g, **hyper)
                with torch.no_grad():
                    images.append(sd.decode(z0).float().clamp(-1, 1))  # as the authors
            std = pixel_std(torch.cat(images))
            cli.write_atomic(path, lambda tmp, v=std: np.save(tmp, v))
        maps[label] = np.load(path)
    text = observations_markdown(args, done, maps)
    cli.write_text(os.path.join(args.out, "observations.md"), text)
    for file, image in draw_observations(done, maps).items():
        cli.write_atomic(os.path.join(args.out, file), image.save)
    print(text)
    return f"wrote observations.md, observation_1.png and observation_3.png to {args.out}"


def observations_markdown(args, done, maps) -> str:
    one, two = done["observation_1"], done["observation_2"]
    lines = [f"# Observations of Sec. 3 on {args.image} ({args.op}, {args.size} px, "
             f"{args.steps} steps, code {code_version()})", "",
             "Reference conditional score: the CSE " + args.cse + ". Errors and means in "
             "epsilon units per coordinate (sigma * RMS); the authors' Fig. 1 plots (1 - abar_t)"
             " times the squared error.", "",
             f"## Table 1: mean score error over the {len(one['sigmas'])} steps "
             f"({args.trajectories} CSE trajectories)", "", "| score | error |", "|---|---|"]
    lines += [f"| {label} | {np.mean(e):.4g} |" for label, e in one["error"].items()]
    lines += ["", f"## Table 2: the mean score at x_T over {args.k_mean} samples", "",
              "| score | norm of the mean | its standard error | RMS of the score |",
              "|---|---|---|---|"]
    lines += [f"| {label} | {m['norm']:.4g} | {m['se']:.3g} | {m['rms']:.4g} |"
              for label, m in two.items()]
    lines += ["", f"## Table 3: per-pixel standard deviation over {args.k} samples (pixels on "
              "[-1, 1], as the authors' cal_var.ipynb: StableSR 0.1080, DPS 0.0453)", "",
              "| method | mean std |", "|---|---|"]
    lines += [f"| {label} | {v.mean():.4g} |" for label, v in maps.items()]
    return "\n".join(lines) + "\n"


def draw_observations(done, maps) -> dict:
    one = done["observation_1"]
    curve = plot.line_plot({label: (one["sigmas"], e) for label, e in one["error"].items()},
                           logx=True, logy=True, xlabel="sigma (sampling runs right to left)",
                           ylabel="sigma * RMS error", title="Observation I: each score "
                           "against the CSE's, along CSE trajectories")
    top = max(v.max() for v in maps.values())
    heat = plot.image_grid([[plot.heat_map(v, vmin=0, vmax=top, label="std") for v in
                             maps.values()]], [[f"{k}: mean {v.mean():.3g}" for k, v in
                                                maps.items()]],
                           title="Observation III: per-pixel standard deviation over samples")
    return {"observation_1.png": curve, "observation_3.png": heat}


# ---------------------------------------------------------------------------------------------
# (5) The command line
# ---------------------------------------------------------------------------------------------


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, once: not for a required flag, a flag without
    one (None) or a switch, nor where the help already says it; a list as it is typed."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if action.required or default is None or default is False or \
                default is argparse.SUPPRESS or "(default" in help:
            return help
        if isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{help} (default: {str(default).replace('%', '%%')})"


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    fmt = DefaultsHelpFormatter
    s = commands.add_parser("score", help="metrics of --pred against --ref", formatter_class=fmt)
    r = commands.add_parser("run", help="restore a folder with every method; the paper's table",
                            formatter_class=fmt)
    o = commands.add_parser("observe", help="the three observations of Sec. 3",
                            formatter_class=fmt)
    import speed  # here, not at the top: speed.py builds on this module

    speed.add_arguments(commands.add_parser(
        "speed", help="seconds, memory and FLOP per sampling step, against the bare network "
        "calls and diffusers' models", formatter_class=fmt))
    s.add_argument("--ref", required=True, help="folder of reference images")
    s.add_argument("--pred", required=True, help="folder of restorations, named as the "
                   "references (any image suffix)")
    s.add_argument("--json", help="also write the report as JSON to this file")
    s.add_argument("--force", action="store_true", help="overwrite --json")
    r.add_argument("--images", required=True, help="folder of reference images (the paper: the "
                   "first 1000 of ImageNet val)")
    r.add_argument("--op", default="sr", help="operator, or a comma list (one table column "
                   "group each)")
    r.add_argument("--methods", default=PAPER_METHODS, help="comma list of "
                   f"{', '.join(METHODS)}, and NAME+cse")
    r.add_argument("--n", "--num-images", dest="n", type=int, default=1000,
                   help="the first N images by name (under torchrun: --num-images)")
    r.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    r.add_argument("--steps", type=int, help="sampling steps for every method, DMAP (same) "
                   "half of them (default: the paper's, 500 and 250)")
    r.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise std on [-1, 1]")
    r.add_argument("--batch", type=int, default=1, help="images restored at once (a batch "
                   "shares the seed of its first image)")
    r.add_argument("--grid", type=int, default=4, help="images in the figure of each operator")
    r.add_argument("--checkpointing", default="none", choices=dmap.CHECKPOINTING,
                   help="recompute activations in the backward pass (dmap.py --help)")
    r.add_argument("--zeta", help="step sizes instead of dmap.py's defaults: a comma list of "
                   "[OP/]METHOD=VALUE (dps=1.2,sr/dmap=2.4; NAME+cse takes NAME's unless given)")
    o.add_argument("--image", required=True, help="the reference image of the measurement")
    o.add_argument("--op", default="sr", choices=list(operators.OPERATORS),
                   help="operator")
    o.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    o.add_argument("--steps", type=int, default=50, help="sampling steps")
    o.add_argument("--zeta", help="dps, dsg and dmap step sizes instead of dmap.py's "
                   "defaults, as for run (dps=1.2,dsg=0.1,dmap=2.4)")
    o.add_argument("--zetas", help="DPS step sizes, comma list (default: DPS's zeta x 1/4, 1, "
                   "4)")
    o.add_argument("--trajectories", type=int, default=4, help="CSE trajectories (Obs. I)")
    o.add_argument("--every", type=int, default=1, help="score errors every this many steps")
    o.add_argument("--repeats", type=int, default=8, help="noise draws per point for the DSG "
                   "and DMAP implied scores")
    o.add_argument("--k-mean", type=int, default=1000, help="samples of x_T (Obs. II)")
    o.add_argument("--k", type=int, default=50, help="samples per method (Obs. III)")
    o.add_argument("--batch", type=int, default=8, help="samples at once")
    for q in (r, o):
        dmap.add_operator_flags(q)
        q.add_argument("--model", default=os.environ.get("SD2_MODEL",
                                                         "./weights/stable-diffusion-2-base"),
                       help="SD 2.0 pipeline folder or single .safetensors file ($SD2_MODEL)")
        q.add_argument("--prediction", choices=["eps", "v"],
                       help="eps (512-base) or v (768-v), for a single-file checkpoint")
        q.add_argument("--size", type=int, default=512, help="image size in pixels")
        q.add_argument("--seed", type=int, default=0, help="random seed (run: + image index)")
        q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="network dtype; latents and guidance stay float32")
    r.add_argument("--cse", help="a trained CSE, for the methods cse and NAME+cse")
    o.add_argument("--cse", required=True, help="a trained CSE: the reference conditional "
                   "score")
    for q in (s, r):
        q.add_argument("--metrics", default=",".join(METRICS), help="comma list of "
                       f"{', '.join(METRICS)}")
        q.add_argument("--metric-weights", help="folder of the LPIPS and FID weight files "
                       "(default: $TORCH_HOME/hub/checkpoints, downloaded there if missing)")
        q.add_argument("--kid-subset", type=int, default=1000, help="KID subset size")
    for q in (s, r, o):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (under torchrun: cuda:LOCAL_RANK)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def body():
        try:
            if args.command == "score":
                if args.json and os.path.exists(args.json) and not args.force:
                    raise ValueError(f"{args.json} exists; pass --force to overwrite it")
                report = score(args)
                print(score_markdown(report, args.metrics.split(","), args.kid_subset))
                if args.json:
                    cli.write_json(args.json, report)
                done = f"scored {report['n']} pairs"
            elif args.command == "run":
                done = run(args)
            elif args.command == "speed":
                import speed

                done = speed.speed(args)
            else:
                done = observe(args)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return f"{done} in {time.perf_counter() - start:.0f} s"

    interrupted = {"score": "while scoring; nothing written",
                   "speed": "during the benchmark; nothing written",
                   "run": f"before the end; {RESUMES}",
                   "observe": "before the end; every part on disk is whole: rerun the same "
                              "command to continue"}[args.command]
    return cli.run(body, interrupted=interrupted, to_stderr=True)


if __name__ == "__main__":
    sys.exit(main())
