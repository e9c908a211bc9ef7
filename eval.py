"""Evaluation: the paper's metrics, runs over image folders, its tables and the Sec. 3 diagnostics.

    python eval.py score --ref DIR --pred DIR              # metrics of restored images
    python eval.py run --images DIR --op sr --methods dps,dmap --out DIR   # Tables 4 and 10
    torchrun --nproc_per_node=N eval.py run ...            # the same, sharded over N GPUs
    python eval.py observe ... / speed ...  # aliases of observations.py and speed.py

Reading order: (1) the metric conventions and the per-image scorer; (2) `score`, pairing two
folders by name; (3) `run`: every image restored by every method with one seed per image, each
restoration written as it finishes (a killed run resumes), images sharded over torchrun's
processes, then the table in the paper's layout and a methods x images figure; (4) the command
line. Each is a function: score(ref, pred, ...), run(images, out, ...).
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import glob
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cse
import dmap
import metrics
import observations
import operators
import plot
import speed
from controlnet import load_cse
from metrics import KNOWN, LABELS, METRICS, Scorer, cell, convention_lines, summarize, sw_pixels

# ---------------------------------------------------------------------------------------------
# (1) `score`: two folders paired by name
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


def score(ref: str, pred: str, *, metrics: tuple = METRICS, metric_weights: str | None = None,
          kid_subset: int = 1000, device: str = dmap.DEVICE) -> dict:
    """Every metric over the pairs of images with one name (any suffix) in the folders `ref`
    (references) and `pred` (restorations). A reference of another size than its restoration
    is prepared as `run` does (centre crop, Lanczos) when the restoration is square, and refused
    otherwise. metric_weights: the folder of the LPIPS and FID weight files (None: torch's hub
    cache). -> the report: per image, the summary per metric, what could not be paired."""
    ref_folder, pred_folder = ref, pred
    ref, ref_skipped = list_images(ref_folder)
    pred, pred_skipped = list_images(pred_folder)
    scorer = Scorer(list(metrics), metric_weights, device)
    report = dict(ref=os.path.abspath(ref_folder), pred=os.path.abspath(pred_folder),
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
        raise ValueError(f"no image of {pred_folder} has a reference of its name and size in "
                         f"{ref_folder}")
    report["n"] = len(rows)
    report["metrics"] = summarize(rows, scorer.names, kid_subset,
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
# (2) `run`: every image by every method, resumable, sharded; the paper's table and figure
# ---------------------------------------------------------------------------------------------

PAPER_METHODS = ("dps", "dsg", "dmap", "dmap-same", "freedom", "resample", "psld")
# Settings that change a restoration: a rerun into the same --out must keep them.
RUN_KEYS = ("model", "prediction", "size", "steps", "seed", "sigma_y", "dtype", "cse", "batch",
            "metrics", "zeta", "operator_flags", "eta", "knobs")
BEFORE = {"eta": 1.0}  # what a run.json written before a setting existed ran with
RESUMES = "every restoration with a record is whole: rerun the same command to continue"


@dataclass(frozen=True)
class RunSettings:
    """What `run` restores and how: its keywords, normalised (operators, methods and metrics as
    tuples; zeta {method or op/method: step}; cse {op: path}; operator {setting: value}, the
    OPERATOR_FLAGS given). The defaults are the paper's."""

    images: str
    out: str
    ops: tuple = ("sr",)
    methods: tuple = PAPER_METHODS
    n: int = 1000
    steps: int | None = None
    eta: float = 1.0  # ancestral (DDPM) steps; 0: DDIM, the PF-ODE (Table 9)
    knobs: dict = field(default_factory=dict)  # sampler settings for every method, as {"K": 2}
    sigma_y: float = 0.0
    batch: int = 1
    grid: int = 4
    checkpointing: str = "none"
    compile: bool = False  # dmap.compile_networks; like checkpointing, not a setting of the run
    zeta: dict = field(default_factory=dict)
    cse: dict = field(default_factory=dict)
    operator: dict = field(default_factory=dict)
    model: str = dmap.DEFAULT_MODEL
    prediction: str | None = None
    size: int = 512
    seed: int = 0
    dtype: str = "float32"
    metrics: tuple = METRICS
    metric_weights: str | None = None
    kid_subset: int = 1000
    device: str = dmap.DEVICE


def zeta_for(zetas: dict, op: str, method: str) -> float | None:
    """The step size `zetas` gives a method on an operator: 'op/method', then 'method', then the
    same for the method without +cse (DPS+CSE takes DPS's unless it has its own); None: the
    default of dmap.sampler_settings."""
    for name in (method, method.removesuffix("+cse")):
        for key in (f"{op}/{name}", name):
            if key in zetas:
                return zetas[key]
    return None


def check_methods(job: RunSettings) -> None:
    """Each method known, and with a CSE for every operator of a CSE method; the zeta keys
    checked against them."""
    valid = list(dmap.METHODS) + [m + "+cse" for m in dmap.METHODS if m not in ("cse", "ddpm")]
    for m in job.methods:
        if m not in valid:
            raise ValueError(f"unknown method {m}; choose from {', '.join(valid)}")
        missing = [op for op in job.ops if m.endswith("cse") and not job.cse.get(op)]
        if missing:
            raise ValueError(f"method {m} needs a trained CSE for --op {missing[0]}: pass --cse "
                             "PATH (or --cse OP=PATH,...)")
    if not job.methods or len(set(job.methods)) != len(job.methods):
        raise ValueError(f"--methods needs distinct names, got {','.join(job.methods)!r}")
    for key in job.zeta:
        op, _, m = key.rpartition("/")
        if m not in valid or (op and op not in operators.OPERATORS and
                              operators.plugin_spec(op) is None):
            raise ValueError(f"--zeta {key}: name a method ({', '.join(valid)}), optionally "
                             "after an operator and /, as sr/dps=1.2")


def operator_settings(job: RunSettings, op: str) -> dict:
    """The run's operator settings that apply to operator op (dmap.OPERATOR_FLAGS)."""
    return {k: v for k, v in job.operator.items() if dmap.OPERATOR_FLAGS[k][0] == op}


def method_settings(job: RunSettings, method: str, op: str) -> tuple[str, int, dict]:
    """(sampler, steps, its keyword arguments) of one method of the run on operator op, from
    dmap.sampler_settings: its checks and defaults (zeta per method and operator, DMAP budgets).
    One step budget for all; DMAP (same) keeps half the steps of the others."""
    sampler, budget = dmap.METHODS[method.removesuffix("+cse")]
    steps = None if not job.steps else max(1, job.steps // 2) if budget == "same" else job.steps
    steps, kwargs, _ = dmap.sampler_settings(sampler, op, model=job.model, steps=steps,
                                             zeta=zeta_for(job.zeta, op, method),
                                             dmap_setting=budget, eta=job.eta, **job.knobs)
    return sampler, steps, kwargs


def image_list(job: RunSettings) -> tuple[list, list]:
    """The first --n images of --images (sorted by name) large enough for --size, as (index,
    stem, path), and the files left out with the reason."""
    found, not_images = list_images(job.images)
    images, left_out = [], [(name, "not an image") for name in not_images]
    for stem, path in found.items():
        if len(images) == job.n:
            break
        with Image.open(path) as image:
            side = min(image.size)
        if side < job.size:
            left_out.append((os.path.basename(path), f"{side} px, smaller than --size"))
        else:
            images.append((len(images), stem, path))
    if not images:
        raise ValueError(f"no image of {job.images} is at least {job.size} px on its short "
                         "side; pass a smaller --size")
    return images, left_out


def images_sha256(images) -> dict:
    """{stem: the sha256 of the file's bytes} of a run's images: other bytes under the same
    names are other images."""
    out = {}
    for _, stem, path in images:
        with open(path, "rb") as f:
            out[stem] = hashlib.sha256(f.read()).hexdigest()
    return out


def made_of(out: str, stem: str) -> bool:
    """Whether --out holds anything made of the image `stem`: its reference (written before
    its restorations), a restoration or a measurement."""
    return any(os.path.exists(os.path.join(out, "reference", stem + e)) for e in (".png", ".npy")) \
        or bool(glob.glob(os.path.join(glob.escape(out), "*", "*", glob.escape(stem) + ".png")))


def check_run(job: RunSettings, images, settings: dict) -> dict | None:
    """--out holds one run: a rerun with other images or settings would mix two experiments.
    An image whose bytes changed before anything was made of it (one that could not be read,
    since fixed) is no other run. -> what run.json is to hold, None when it holds it."""
    path = os.path.join(job.out, "run.json")
    if not os.path.exists(path):
        return settings
    old = cli.read_json(path)
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
                  if kept.get(stem) != now[stem] and made_of(job.out, stem)]
    if other:
        raise ValueError(f"--out {job.out} holds a run of other images ({other[0]}); use "
                         "another --out")
    for key in RUN_KEYS:
        if old.get(key, BEFORE.get(key)) != settings[key]:
            raise ValueError(f"--out {job.out} holds a run with {key} = {old.get(key)!r}, not "
                             f"{settings[key]!r}; use another --out")
    return None if kept == now else dict(old, images_sha256=now)


class Run:
    """What every restoration of a run shares: the scorer, the pipeline, and the CSE of each
    operator that a CSE method restores (loaded first, so that a CSE trained for another
    operator or size is refused before anything is restored)."""

    def __init__(self, job: RunSettings, device, dtype, cse_ops):
        self.job, self.device = job, device
        if "lpips" in list(job.metrics) and job.size < metrics.LPIPS.MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {metrics.LPIPS.MIN_SIZE} px, and "
                             f"--size is {job.size}: drop lpips from --metrics")
        self.scorer = Scorer(list(job.metrics), job.metric_weights, device)
        self.controlnets = {op: load_cse(job.cse[op], op, job.size, device, dtype)[0]
                            for op in cse_ops}
        self.sd = dmap.load_sd2(job.model, job.prediction, device, dtype)
        dmap.set_checkpointing(self.sd.unet, self.sd.vae, job.checkpointing)
        if job.compile:
            dmap.compile_networks(self.sd, *self.controlnets.values())
        self.context = dmap.encode_prompt(self.sd, "")

    def denoiser(self, method: str, op_name: str, op, y):
        sd = self.sd
        if not method.endswith("cse"):
            return dmap.SDDenoiser(sd.unet, self.context, sd.abar, sd.prediction)
        return dmap.CSEDenoiser(sd.unet, self.controlnets[op_name], self.context, sd.abar,
                               op.hint(y), sd.prediction)

    def reference(self, stem: str, path: str) -> tuple[np.ndarray, torch.Tensor]:
        """The reference as the run sees it (centre crop, Lanczos to --size), written once to
        reference/ with its Inception features."""
        x = dmap.read_image(path, self.job.size)
        image = dmap.to_uint8(x)
        folder = os.path.join(self.job.out, "reference")
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
        seed = self.job.seed + index
        sampler, steps, kwargs = method_settings(self.job, method, op_name)
        op, op_args = dmap.make_operator(op_name, self.job.size, seed=seed, model=self.job.model,
                                         **operator_settings(self.job, op_name))
        op = op.to(self.device)  # data in float32, networks in --dtype (dmap.SDDenoiser)
        refs = [self.reference(s, p) for _, s, p in batch]
        x_ref = torch.cat([x for _, x in refs]).to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        y = op.measure(x_ref, self.job.sigma_y, generator)
        scores_classes = "miou" in self.scorer.names
        if scores_classes and (op_name in operators.OPERATORS or y.ndim != 4 or y.shape[1] < 2):
            raise ValueError("mIoU needs an operator that measures class scores (B, C >= 2, h, "
                             f"w), as a segmentation network (FILE.py:CLASS); --op {op_name} "
                             "does not: leave miou out of --metrics")
        denoiser = self.denoiser(method, op_name, op, y)
        start = time.perf_counter()
        with speed.PeakMemory(self.device) as peak:
            z0 = dmap.posterior_sample(self.sd, denoiser, op, y, method=sampler,
                                       size=self.job.size, steps=steps, sampler_kwargs=kwargs,
                                       generator=generator)
            with torch.no_grad():
                restored = self.sd.decode(z0)
        seconds = (time.perf_counter() - start) / len(batch)
        with torch.no_grad():  # measurement fit, on [-1, 1] before the 8-bit rounding
            fit = op(restored.clamp(-1, 1))
        y_rmse = (fit - y).flatten(1).pow(2).mean(1).sqrt().tolist()
        # mIoU of the class maps argmax A(x) and argmax y, per image (Table 10, right)
        miou = [metrics.miou(a, t) for a, t in zip(fit.argmax(1), y.argmax(1), strict=True)] \
            if scores_classes else None
        hint = op.hint(y)  # an image of y (operators.picture for a measurement of another kind)
        op_folder = os.path.join(self.job.out, operators.short_name(op_name))
        folder = os.path.join(op_folder, method)
        os.makedirs(os.path.join(op_folder, "measurement"), exist_ok=True)
        os.makedirs(folder, exist_ok=True)
        for b, (i, s, p) in enumerate(batch):
            image = dmap.to_uint8(restored[b:b + 1])
            cli.write_atomic(os.path.join(folder, s + ".png"), Image.fromarray(image).save)
            measurement = os.path.join(op_folder, "measurement", s + ".png")
            if not os.path.exists(measurement):
                cli.write_atomic(measurement,
                                 Image.fromarray(dmap.to_uint8(hint[b:b + 1])).save)
            features = self.scorer.features(image)
            if features is not None:
                cli.write_atomic(os.path.join(folder, s + ".npy"),
                                 lambda tmp, f=features: np.save(tmp, f))
            scores = self.scorer.pair(refs[b][0], image)
            if miou is not None:
                scores["miou"] = miou[b]
            record = dict(image=os.path.abspath(p), index=i, seed=seed, batch=len(batch),
                          method=method, op=op_name, operator=op_args,
                          sampler=dict(kwargs, steps=steps), seconds=round(seconds, 3),
                          peak_mb=None if peak.mb is None else round(peak.mb, 1),
                          y_rmse=y_rmse[b], **scores)
            cli.write_json(os.path.join(folder, s + ".json"), record)


def todo(job: RunSettings, images, ops, methods, rank, world) -> list:
    """This process's work: (op, method, batch). The batches are fixed: the images in order,
    --batch at a time, the c-th batch on process c % world (disjoint shards covering every
    image), so that a restoration does not depend on interruptions or on the number of
    processes. A batch is redone whole when any of its images has no record yet, or one that
    does not parse (a line on stderr names it): it then gets its seed and companions again."""
    batches = [images[k:k + job.batch] for k in range(0, len(images), job.batch)]
    work = []
    for op in ops:
        for method in methods:
            for batch in batches[rank::world]:
                missing = False
                for _, stem, _ in batch:
                    path = os.path.join(job.out, operators.short_name(op), method, stem + ".json")
                    if not os.path.exists(path):
                        missing = True
                    elif cli.read_json(path) is None:
                        print(f"{path} does not parse; restoring it again", file=sys.stderr)
                        missing = True
                if missing:
                    work.append((op, method, batch))
    return work


def collect(job: RunSettings, images, ops, methods) -> dict:
    """The table's numbers from the files on disk (all shards): per operator and method the
    summary, the mean time and the peak memory; ValueError naming what is missing or does not
    parse."""
    names = list(job.metrics)
    on_disk = {}
    for op in ops:
        for m in methods:
            for _, stem, _ in images:
                path = os.path.join(job.out, operators.short_name(op), m, stem + ".json")
                on_disk[op, m, stem] = cli.read_json(path) if os.path.exists(path) else None
    missing = ["/".join(key) for key, record in on_disk.items() if record is None]
    if missing:
        raise ValueError(f"{len(missing)} restorations are missing or unreadable (first: "
                         f"{missing[0]}); run the same command again to redo them")
    feats = {"fid", "kid"} & set(names)

    def load(path):
        with open(path, "rb") as f:
            return np.load(f)

    ref = [load(os.path.join(job.out, "reference", s + ".npy")) for _, s, _ in images] \
        if feats else None
    sw = "sw" in names
    ref_pixels = [sw_pixels(read_uint8(os.path.join(job.out, "reference", s + ".png")))
                  for _, s, _ in images] if sw else None
    table = {}
    for op in ops:
        for m in methods:
            folder = os.path.join(job.out, operators.short_name(op), m)
            records = [on_disk[op, m, stem] for _, stem, _ in images]
            pred = [load(os.path.join(folder, s + ".npy")) for _, s, _ in images] \
                if feats else None
            pred_pixels = [sw_pixels(read_uint8(os.path.join(folder, s + ".png")))
                           for _, s, _ in images] if sw else None
            summary = summarize(records, names, job.kid_subset, (ref, pred),
                                (ref_pixels, pred_pixels))
            peaks = [r["peak_mb"] for r in records if r["peak_mb"] is not None]
            summary.update(seconds=float(np.mean([r["seconds"] for r in records])),
                           peak_mb=max(peaks) if peaks else None, sampler=records[0]["sampler"])
            table[f"{operators.short_name(op)}/{m}"] = summary
    return table


def table_markdown(job: RunSettings, table, ops, methods, settings, left_out) -> str:
    """Table 4's layout (Table 10's for inpainting): a row per method, per operator the time
    per image and each metric; the conventions and the code version above it."""
    names = list(job.metrics)
    lines = [f"# eval.py run: {settings['n']} images of {settings['images']}, code "
             f"{settings['code']}", "",
             f"model {settings['model']}, {settings['size']} px, seed {settings['seed']} + "
             f"image index, sigma_y {settings['sigma_y']}, eta {settings['eta']}"
             f"{' (PF-ODE)' if settings['eta'] == 0 else ''}, {settings['dtype']} on "
             f"{settings['device']}, batch {settings['batch']}", ""]
    lines += ["- time (s): sampling and decoding per image (batch time / batch), the mean over "
              "images; peak memory per image in its JSON record",
              "- y RMSE: the measurement fit, RMS of A(x) - y on [-1, 1] pixels (x the "
              "restoration before 8-bit rounding)"] + \
        convention_lines(names, job.kid_subset) + [""]
    head = ["method"] + [f"{operators.short_name(op)} {c}" for op in ops for c in ["time (s)"] +
                         [LABELS[n] for n in names] + ["y RMSE"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m]
        for op in ops:
            s = table[f"{operators.short_name(op)}/{m}"]
            row += [f"{s['seconds']:.1f}"] + [cell(s, n) for n in names] + [cell(s, "y_rmse")]
        lines.append("| " + " | ".join(row) + " |")
    if left_out:
        lines += ["", f"{len(left_out)} files left out: " + ", ".join(
            f"{name} ({why})" for name, why in left_out[:10])]
    return "\n".join(lines) + "\n"


def grid(job: RunSettings, op: str, methods, images) -> Image.Image:
    """Fig. 6: a row per image (the first --grid), measurement | each method | reference."""
    rows, titles = [], []
    for _, stem, _ in images[:job.grid]:
        folder = os.path.join(job.out, operators.short_name(op))
        paths = [os.path.join(folder, "measurement", stem + ".png")] + \
            [os.path.join(folder, m, stem + ".png") for m in methods] + \
            [os.path.join(job.out, "reference", stem + ".png")]
        images = [Image.open(p) for p in paths]
        grow = max(1, 128 // images[0].width)  # small images drawn at 128 px or more
        rows.append([im.resize((im.width * grow, im.height * grow), Image.NEAREST)
                     for im in images])
        titles.append(["measurement"] + list(methods) + ["reference"])
    return plot.image_grid(rows, titles, title=f"{op}: {len(methods)} methods")


def run(images: str, out: str, **settings) -> dict:
    """Restore the first n images of the folder `images` with every method on every operator
    into `out` and score them (Tables 4 and 10; under torchrun, sharded over the processes):
    what has a record is not redone (a killed run resumes), a rerun with other images or
    settings is refused. settings: RunSettings' fields (ops, methods, n, steps, zeta, cse,
    metrics, ...), each with the paper's default. Rank 0 then writes table.md, table.json and a
    grid per operator; -> {"table", "settings", "left_out", "markdown", "restored": batches
    restored here} (other ranks: only "restored")."""
    job = RunSettings(images=images, out=out, **settings)
    check_methods(job)
    checks = [(job.n >= 1, f"--n must be >= 1, got {job.n}"),
              (job.batch >= 1, f"--batch must be >= 1, got {job.batch}"),
              (job.steps is None or job.steps >= 1, f"--steps must be >= 1, got {job.steps}"),
              (job.grid >= 0, f"--grid must be >= 0, got {job.grid}"),
              (job.sigma_y >= 0, f"--sigma-y must be >= 0, got {job.sigma_y}"),
              (job.size >= 8 and job.size % 8 == 0, f"--size must be a multiple of 8, got "
               f"{job.size}")]
    checks += [(job.operator.get(name) is None or op in job.ops, f"--{name.replace('_', '-')} "
                f"applies to --op {op}, which this run does not restore")
               for name, (op, _, _) in dmap.OPERATOR_FLAGS.items()]
    cli.check(checks)
    for op in job.ops:  # every method's settings checked before anything loads
        dmap.make_operator(op, job.size, model=job.model, **operator_settings(job, op))
        for m in job.methods:
            method_settings(job, m, op)
    images, left_out = image_list(job)
    rank, world, device = cse.distributed(torch.device(job.device))
    settings = dict(images=os.path.abspath(job.images), n=len(images),
                    images_sha256=images_sha256(images),
                    model=os.path.abspath(job.model), prediction=job.prediction,
                    size=job.size, steps=job.steps, eta=job.eta, knobs=job.knobs or None,
                    seed=job.seed, sigma_y=job.sigma_y,
                    dtype=job.dtype, cse={op: os.path.abspath(job.cse[op]) for op in job.ops
                                          if job.cse.get(op)} or None,
                    batch=job.batch, metrics=",".join(job.metrics), zeta=job.zeta or None,
                    operator_flags={k: v for k, v in job.operator.items() if v is not None},
                    device=device.type, code=cli.code_version())
    stale = check_run(job, images, settings)
    try:
        os.makedirs(job.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {job.out} ({e.strerror})") from None
    work = todo(job, images, job.ops, job.methods, rank, world)
    if work:
        context = Run(job, device, getattr(torch, job.dtype),
                      {op for op, m, _ in work if m.endswith("cse")})
    if rank == 0 and stale is not None:  # after loading: a run that cannot start leaves none
        cli.write_json(os.path.join(job.out, "run.json"), stale)
    for op, m, batch in tqdm(work, desc=f"rank {rank}" if world > 1 else "restore",
                             unit="batch", position=rank, disable=not work):
        try:
            context.restore(op, m, batch)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"while restoring {batch[0][1]} with {m} ({op}); "
                                    f"{RESUMES}") from None
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return dict(restored=len(work))
    table = collect(job, images, job.ops, job.methods)
    text = table_markdown(job, table, job.ops, job.methods, settings, left_out)
    cli.write_text(os.path.join(job.out, "table.md"), text)
    cli.write_json(os.path.join(job.out, "table.json"), dict(settings=settings, table=table,
                                                        left_out=left_out))
    if job.grid:
        for op in job.ops:
            cli.write_atomic(os.path.join(job.out, operators.short_name(op), "grid.png"),
                             grid(job, op, job.methods, images).save)
    return dict(table=table, settings=settings, left_out=left_out, markdown=text,
                restored=len(work))


# ---------------------------------------------------------------------------------------------
# (3) The command line: score and run; observe (observations.py) and speed (speed.py) as aliases
# ---------------------------------------------------------------------------------------------


def command_line() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.DefaultsHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    fmt = cli.DefaultsHelpFormatter
    s = commands.add_parser("score", help="metrics of --pred against --ref", formatter_class=fmt)
    r = commands.add_parser("run", help="restore a folder with every method; the paper's table",
                            formatter_class=fmt)
    observations.add_arguments(commands.add_parser(
        "observe", help="the three observations of Sec. 3 (python observations.py)",
        formatter_class=fmt))
    speed.add_arguments(commands.add_parser(
        "speed", help="seconds, memory and FLOP per sampling step (python speed.py)",
        formatter_class=fmt))
    s.add_argument("--ref", required=True, help="folder of reference images")
    s.add_argument("--pred", required=True, help="folder of restorations, named as the "
                   "references (any image suffix)")
    s.add_argument("--json", help="also write the report as JSON to this file")
    s.add_argument("--force", action="store_true", help="overwrite --json")
    r.add_argument("--images", required=True, help="folder of reference images (the paper: the "
                   "first 1000 of ImageNet val)")
    r.add_argument("--op", default="sr", help="operator, or a comma list (one table column "
                   "group each)")
    r.add_argument("--methods", default=",".join(PAPER_METHODS), help="comma list of "
                   f"{', '.join(dmap.METHODS)}, and NAME+cse")
    r.add_argument("--n", "--num-images", dest="n", type=int, default=1000,
                   help="the first N images by name (under torchrun: --num-images)")
    r.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    r.add_argument("--steps", type=int, help="sampling steps for every method, DMAP (same) "
                   "half of them (default: the paper's, 500 and 250)")
    r.add_argument("--eta", type=float, default=1.0, help="ancestral noise of every method: 1 "
                   "DDPM, 0 DDIM (the PF-ODE of Table 9)")
    r.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise std on [-1, 1]")
    r.add_argument("--batch", type=int, default=1, help="images restored at once (a batch "
                   "shares the seed of its first image)")
    r.add_argument("--grid", type=int, default=4, help="images in the figure of each operator")
    r.add_argument("--checkpointing", default="none", choices=dmap.CHECKPOINTING,
                   help="recompute activations in the backward pass (dmap.py --help)")
    r.add_argument("--compile", action="store_true", help="torch.compile the networks; the "
                   "first batches compile (dmap.py --help)")
    r.add_argument("--zeta", help="step sizes instead of dmap.py's defaults: a comma list of "
                   "[OP/]METHOD=VALUE (dps=1.2,sr/dmap=2.4; NAME+cse takes NAME's unless given)")
    dmap.add_operator_flags(r)
    cli.add_model_flags(r, size=512, device=dmap.DEVICE, seed_help="random seed (+ image index)")
    r.add_argument("--cse", help="a trained CSE, for the methods cse and NAME+cse (or "
                   "OP=PATH,... one per operator)")
    for q in (s, r):
        q.add_argument("--metrics", default=",".join(METRICS), help="comma list of "
                       f"{', '.join(KNOWN)} (miou: run, with an operator that segments)")
        q.add_argument("--metric-weights", help="folder of the LPIPS and FID weight files "
                       "(default: $TORCH_HOME/hub/checkpoints, downloaded there if missing)")
        q.add_argument("--kid-subset", type=int, default=1000, help="KID subset size")
    s.add_argument("--device", default=dmap.DEVICE, help="torch device")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return command_line().parse_args(argv)


def listed(text: str) -> tuple:
    """A comma list as a tuple of its stripped, non-empty items."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def score_command(args) -> str:
    if args.json and os.path.exists(args.json) and not args.force:
        raise ValueError(f"{args.json} exists; pass --force to overwrite it")
    report = score(args.ref, args.pred, metrics=listed(args.metrics),
                   metric_weights=args.metric_weights, kid_subset=args.kid_subset,
                   device=args.device)
    print(score_markdown(report, listed(args.metrics), args.kid_subset))
    if args.json:
        cli.write_json(args.json, report)
    return f"scored {report['n']} pairs"


def run_command(args) -> str:
    ops = listed(args.op)
    cse_paths = {} if not args.cse else cli.parse_map(args.cse, "--cse") if "=" in args.cse \
        else dict.fromkeys(ops, args.cse)
    result = run(args.images, args.out, ops=ops, methods=listed(args.methods), n=args.n,
                 steps=args.steps, eta=args.eta, sigma_y=args.sigma_y, batch=args.batch,
                 grid=args.grid,
                 checkpointing=args.checkpointing, compile=args.compile,
                 zeta=cli.parse_map(args.zeta, "--zeta", float), cse=cse_paths,
                 operator={k: getattr(args, k) for k in dmap.OPERATOR_FLAGS
                           if getattr(args, k) is not None},
                 model=args.model, prediction=args.prediction, size=args.size, seed=args.seed,
                 dtype=args.dtype, metrics=listed(args.metrics),
                 metric_weights=args.metric_weights, kid_subset=args.kid_subset,
                 device=args.device)
    if "markdown" not in result:  # another rank of torchrun
        return f"{result['restored']} batches restored"
    print(result["markdown"])
    return f"{result['restored']} batches restored, table of {result['settings']['n']} images " \
        f"in {os.path.join(args.out, 'table.md')}"


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    body = {"score": score_command, "run": run_command, "observe": observations.command,
            "speed": speed.command}[args.command]

    def timed():
        try:
            done = body(args)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return f"{done} in {time.perf_counter() - start:.0f} s"

    interrupted = {"score": "while scoring; nothing written",
                   "speed": "during the benchmark; nothing written",
                   "run": f"before the end; {RESUMES}",
                   "observe": observations.INTERRUPTED}[args.command]
    return cli.run(timed, interrupted=interrupted, to_stderr=True)


if __name__ == "__main__":
    sys.exit(main())
