"""The paper's experiment in miniature: a prior learnt here from real photographs, every method,
the CSE and the three observations, on a 2-core CPU in under an hour, with nothing downloaded.

    python mini.py                  # every stage into results/mini; a rerun skips each stage
                                    # whose output exists
    python mini.py --quick          # the same at toy sizes in about a minute, into
                                    # results/mini-quick; numbers not meaningful (the tests run it)

No Stable Diffusion weights reach this project, so the paper's claims about a *learnt* prior on
*real* images are checked here on a small one: 32 x 32 crops of the photographs that ship with
scikit-image, a pixel-space UNet (unet.py at a small width, no VAE: a dmap.Pipeline whose vae
is None) trained from scratch by cse.py's training loop (`--train unet`), ControlNet CSEs on it
(cse.py), every method of the paper's Table 4 through `eval.py run`, and the observations of
Sec. 3 through `eval.py observe`. Nothing is copied: this file only chooses settings, makes
the data and writes the report.

Stages, in order; each writes its folder under --out and is skipped when its output exists
(the training and evaluation inside a stage resume where they stopped):
  (1) data     random crops of the photographs, split by photograph (test crops never trained on)
  (2) prior    the pixel-space UNet, trained from scratch; its held-out loss against the
               untrained one's
  (3) cse      ControlNets on the prior: 100 training crops per operator, 25 and 1000 for SR
  (4) tune     zeta per method and operator: a sweep on a few training crops, the best PSNR
  (5) eval     every method and operator on the held-out crops: Table 4's layout
  (6) table6   SR with the CSEs of 25, 100 and 1000 crops (the paper's Table 6 question)
  (7) observe  Fig. 1, Table 2 and Fig. 3 with the SR CSE as the reference conditional score
  (8) report   report.md and report.json (the tables, and the paper's claims as paired
               differences on the same crops and seeds), the figures; redone on every run
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import safetensors.torch
import torch
from PIL import Image

import ablations
import cse
import dmap
import eval as evaluation
import metrics
import observations
import plot
from checkpoint import read_config
from unet import UNet, UNetConfig

# ---------------------------------------------------------------------------------------------
# (1) The settings: the full run and the quick one
# ---------------------------------------------------------------------------------------------

# The colour photographs bundled with scikit-image that load without a download (checked on
# scikit-image 0.26; colorwheel and logo are drawings, the rest are grey or need pooch), split
# by photograph. The two test photographs are natural scenes like most of the training ones.
PHOTOS = {"train": ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field",
                    "immunohistochemistry", "retina"),
          "test": ("chelsea", "coffee")}
METHODS = ("ddpm", "dps", "dsg", "dmap", "dmap-same", "freedom", "resample", "psld", "cse",
           "dps+cse", "dmap+cse")
TUNED = ("dps", "dsg", "dmap", "dmap-same", "freedom", "resample", "psld")  # +cse: their base's


@dataclass(frozen=True)
class Settings:
    size: int = 32  # crop side in pixels
    crop: tuple[float, float] = (0.15, 0.4)  # crop side / the photograph's short side, uniform
    train_crops: int = 4000
    test_crops: int = 100
    tune_crops: int = 8
    # the prior: 32 -> 16 -> 8 px levels, self-attention only at 8 x 8 (and in the mid block)
    unet: UNetConfig = UNetConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                                  layers_per_block=1, num_heads=(1, 1, 2),
                                  attention=(False, False, True), cross_attention_dim=32,
                                  norm_num_groups=8)
    prior_steps: int = 600  # 8 min here
    prior_batch: int = 64
    prior_lr: float = 1e-3  # cosine decay to 0 (cse.py --lr-schedule cosine)
    cse_steps: int = 300  # 1.8 min each here
    cse_batch: int = 32
    cse_lr: float = 2e-4
    cse_images: tuple[int, ...] = (25, 100, 1000)  # SR; the other operators: 100
    # operators at 32 px: SR x4 (8 x 8 measurements), Gaussian blur of std 1 px (a 3 px blur
    # at 512 seen through the crops' 2.4 - 6.4x downscaling), the centre box of a quarter side
    ops: dict = field(default_factory=lambda: {"sr": {"sr_factor": 4}, "blur": {"blur_std": 1.0},
                                               "inpaint": {}})
    steps: int = 25  # sampling steps (DMAP same: half); 500 in the paper
    batch: int = 100  # images restored at once
    # the zeta sweep: the values tried per method (the guidance rate for dsg), found by hand to
    # hold each method's best inside them on this prior
    grid: dict = field(default_factory=lambda: {
        "dsg": (0.05, 0.1, 0.2, 0.5, 1.0), "default": (2.0, 4.0, 8.0, 16.0, 32.0)})
    trajectories: int = 8  # observation I
    k_mean: int = 250  # observation II (the paper: 1000)
    repeats: int = 4  # noise draws per point of the DSG and DMAP implied scores
    k: int = 50  # observation III
    seed: int = 0


QUICK = Settings(size=16, train_crops=64, test_crops=6, tune_crops=2,
                 unet=UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, num_heads=(1, 2), attention=(False, True),
                                 cross_attention_dim=8, norm_num_groups=8),
                 prior_steps=60, prior_batch=16, prior_lr=2e-3, cse_steps=4, cse_batch=4,
                 cse_images=(4, 8, 16), steps=16, batch=6,
                 grid={"dsg": (0.5, 1.0), "default": (32.0, 128.0)}, trajectories=2, k_mean=16,
                 repeats=2, k=4)
QUICK_NOTE = "QUICK run (--quick): toy sizes, numbers not meaningful"  # its report and figures


# ---------------------------------------------------------------------------------------------
# (2) The data: crops of the photographs, split by photograph
# ---------------------------------------------------------------------------------------------


def photograph(name: str) -> Image.Image:
    import skimage.data  # here: only the data stage needs scikit-image

    image = getattr(skimage.data, name)()
    return Image.fromarray(image[0] if isinstance(image, tuple) else image)  # stereo: left


def write_crops(folder: str, names, n: int, s: Settings, seed: int) -> None:
    """n crops, the k-th from photograph names[k % len(names)]: a square of side U(s.crop)
    times the short side at a uniform position, Lanczos-resized to s.size; k_name.png."""
    rng = random.Random(seed)
    os.makedirs(folder)
    photos = {name: photograph(name) for name in names}
    for k in range(n):
        name = names[k % len(names)]
        image = photos[name]
        side = round(rng.uniform(*s.crop) * min(image.size))
        left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
        crop = image.crop((left, top, left + side, top + side)).resize((s.size, s.size),
                                                                       Image.LANCZOS)
        crop.save(os.path.join(folder, f"{k:05d}_{name}.png"))


def make_data(out: str, s: Settings) -> dict:
    """data/train (the prior's and the CSEs'), data/tune (the zeta sweep's, from the training
    photographs), data/test (the evaluation's, from the test photographs only)."""
    tmp, final = os.path.join(out, ".data"), os.path.join(out, "data")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's
    split = dict(PHOTOS, crops=dict(train=s.train_crops, tune=s.tune_crops, test=s.test_crops),
                 size=s.size, crop_side=s.crop)
    if os.path.isdir(final):  # renamed into place, whole, by a run killed before recording it
        return split
    for part, names, n, seed in (("train", PHOTOS["train"], s.train_crops, s.seed),
                                 ("tune", PHOTOS["train"], s.tune_crops, s.seed + 1),
                                 ("test", PHOTOS["test"], s.test_crops, s.seed + 2)):
        write_crops(os.path.join(tmp, part), names, n, s, seed)
    with open(os.path.join(tmp, "split.json"), "w") as f:
        json.dump(split, f, indent=2)
    os.replace(tmp, final)  # whole or absent
    return split


# ---------------------------------------------------------------------------------------------
# (3) The prior and the CSEs: cse.py's training loop
# ---------------------------------------------------------------------------------------------

# SD 2.0's DDPM schedule (scaled_linear 0.00085 .. 0.012, 1000 steps, epsilon): the samplers'
# sigmas (dmap.sd_sigmas) and the paper's parameterisation carry over unchanged
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon"}


def init_prior(folder: str, s: Settings) -> None:
    """A pixel-space model folder (dmap.is_pixel_model): the UNet at PyTorch's default init,
    seeded, and the scheduler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = UNet(s.unet)
    os.makedirs(os.path.join(folder, "unet"))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "unet", "config.json"), "w") as f:
        json.dump(s.unet.to_diffusers(), f, indent=2)
    safetensors.torch.save_file(net.state_dict(), os.path.join(
        folder, "unet", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)


def held_out_loss(model: str, images: list[str], s: Settings) -> float:
    """The epsilon-MSE of a pixel-space model on the given images, on fixed draws of t and
    noise (the training loss, cse.batch_losses, on samples no run trains on)."""
    sd = dmap.load_sd2(model)
    context = dmap.encode_prompt(sd, "")
    ks = range(10**9, 10**9 + 4 * len(images))
    with torch.no_grad():
        return cse.batch_losses(sd.unet, sd, context, images, None, None, ks, s.size, s.seed,
                                contextlib.nullcontext).mean().item()


def train(what: str, model: str, images: str, out: str, s: Settings, **settings) -> str:
    """cse.train (resumed where it stopped): the prior (`what` unet, every training crop) or
    a CSE (`what` controlnet; settings: op, n and the operator's). Returns the last
    checkpoint."""
    unet_run = what == "unet"
    if unet_run:
        settings["n"] = s.train_crops
    return cse.train(train=what, model=model, images=images, out=out, size=s.size, seed=s.seed,
                     device="cpu", resume=True,
                     steps=s.prior_steps if unet_run else s.cse_steps,
                     batch=s.prior_batch if unet_run else s.cse_batch,
                     micro_batch=s.prior_batch if unet_run else s.cse_batch,
                     lr=s.prior_lr if unet_run else s.cse_lr, lr_schedule="cosine",
                     checkpoint_every=100 if unet_run else max(1, s.cse_steps // 4),
                     validate_every=0, **settings)  # a CSE's quarters: Table 7


def train_prior(out: str, s: Settings) -> dict:
    """prior/init (the untrained model folder), prior/checkpoint-N (the trained one, itself a
    model folder), and the held-out loss of both on the test crops."""
    init = os.path.join(out, "prior", "init")
    if not os.path.isdir(init):
        shutil.rmtree(init + ".tmp", ignore_errors=True)  # a killed run's
        init_prior(init + ".tmp", s)
        os.replace(init + ".tmp", init)
    model = train("unet", init, os.path.join(out, "data", "train"), os.path.join(out, "prior"), s)
    test = sorted(os.path.join(out, "data", "test", f)
                  for f in os.listdir(os.path.join(out, "data", "test")))
    return dict(model=model, losses=read_config(model, "prior.json")["losses"],
                held_out=dict(untrained=held_out_loss(init, test, s),
                              trained=held_out_loss(model, test, s)))


def cse_runs(s: Settings) -> list[tuple[str, int]]:
    """(operator, training crops) of every CSE: 100 per operator; for SR also the other sizes."""
    return [(op, n) for op in s.ops for n in (s.cse_images if op == "sr" else
                                                s.cse_images[1:2])]


def train_cses(out: str, s: Settings, prior: str) -> dict:
    """cse/OP-N/checkpoint-M for every cse_runs entry; {OP-N: checkpoint}."""
    done = {}
    for op, n in cse_runs(s):
        print(f"CSE for {op} on {n} training crops", file=sys.stderr)
        done[f"{op}-{n}"] = train("controlnet", prior, os.path.join(out, "data", "train"),
                                  os.path.join(out, "cse", f"{op}-{n}"), s, op=op, n=n,
                                  **s.ops[op])
    return done


# ---------------------------------------------------------------------------------------------
# (4) Tuning zeta, evaluating, the observations: eval.py
# ---------------------------------------------------------------------------------------------


def restore(images: str, out: str, s: Settings, prior: str, ops, methods, zeta: dict,
            cses: dict | None = None, scoring: dict | None = None, quiet=False) -> dict:
    """eval.run (resumed where it stopped) -> its table (quiet: without printing it); scoring:
    its metrics and metric_weights (default: PSNR only)."""
    result = evaluation.run(images, out, methods=tuple(methods), grid=6, cse=cses or {},
                            **run_settings(s, prior, ops, zeta, scoring))
    if not quiet:
        print(result["markdown"])
    return result["table"]


def run_settings(s: Settings, prior: str, ops, zeta: dict, scoring: dict | None) -> dict:
    """What every eval.run of the experiment shares: the prior, its size, steps, batch and seed,
    the operators' settings, the tuned zeta, the metrics (default: PSNR only)."""
    return dict(ops=tuple(ops), model=prior, size=s.size, steps=s.steps, batch=s.batch,
                seed=s.seed, device="cpu", zeta=zeta or {},
                operator={k: v for op in ops for k, v in s.ops[op].items()},
                **(scoring or dict(metrics=("psnr",))))


def tune(out: str, s: Settings, prior: str) -> dict:
    """For each operator and method of TUNED, the zeta of s.grid with the best mean PSNR on the
    tune crops (training photographs); -> {"zeta": {op/method: zeta}, "sweep": {..: PSNR}}."""
    zeta, sweep = {}, {}
    for op in s.ops:
        for method in TUNED:
            psnr = {}
            for z in s.grid.get(method, s.grid["default"]):
                folder = os.path.join(out, "tune", op, method, f"zeta{z:g}")
                table = restore(os.path.join(out, "data", "tune"), folder, s, prior, [op],
                                [method], {method: z}, quiet=True)
                psnr[z] = table[f"{op}/{method}"]["psnr"]["mean"]
            sweep[f"{op}/{method}"] = {f"{z:g}": v for z, v in psnr.items()}
            zeta[f"{op}/{method}"] = max(psnr, key=psnr.get)
    return dict(zeta=zeta, sweep=sweep)


def table_metrics(folder: str | None, size: int) -> dict:
    """eval.run's metrics for the tables: PSNR, SSIM and SW, and LPIPS (from 31 px), FID and KID
    when the three community weight files are in `folder` (all must be there) or in torch.hub's
    checkpoints folder; nothing is downloaded. -> {metrics, metric_weights}."""
    names = ("psnr", "ssim", "sw") + (("lpips",) if size >= metrics.LPIPS.MIN_SIZE else ()) + \
        ("fid", "kid")
    if folder:
        missing = [n for n in metrics.WEIGHTS if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise ValueError(f"--metric-weights {folder}: no {missing[0]} there; it needs all "
                             f"of {', '.join(metrics.WEIGHTS)}")
        return dict(metrics=names, metric_weights=folder)
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if all(os.path.isfile(os.path.join(hub, n)) for n in metrics.WEIGHTS):
        return dict(metrics=names)
    return dict(metrics=("psnr", "ssim", "sw"))


def evaluate(out: str, s: Settings, prior: str, cses: dict, zeta: dict, scoring: dict) -> dict:
    """Every method and operator on the test crops, with the tuned zetas and the 100-crop CSEs."""
    n = s.cse_images[1]
    return restore(os.path.join(out, "data", "test"), os.path.join(out, "eval"), s, prior,
                   list(s.ops), METHODS, zeta, {op: cses[f"{op}-{n}"] for op in s.ops},
                   scoring)


def table6(out: str, s: Settings, prior: str, cses: dict, zeta: dict, scoring: dict) -> dict:
    """SR by the CSE methods with the CSEs of the other training-set sizes (the 100-crop one is
    in the eval stage's table); {crops: {method: summary}}."""
    rows = {}
    for n in s.cse_images:
        if n == s.cse_images[1]:
            continue
        table = restore(os.path.join(out, "data", "test"), os.path.join(out, "table6", str(n)),
                        s, prior, ["sr"], ("cse", "dps+cse", "dmap+cse"), zeta,
                        {"sr": cses[f"sr-{n}"]}, scoring)
        rows[str(n)] = {key.split("/")[1]: v for key, v in table.items()}
    return rows


def ablation(name: str, out: str, s: Settings, prior: str, cells: dict, zeta: dict,
             scoring: dict) -> dict:
    """One of the paper's ablations (ablations.py) on SR over the test crops; {cell: summary}."""
    return ablations.ablation(os.path.join(out, "data", "test"), os.path.join(out, name), cells,
                              title=ablations.TITLES[name],
                              **run_settings(s, prior, ["sr"], zeta, scoring))["rows"]


def table5(out: str, s: Settings, prior: str, zeta: dict, scoring: dict) -> dict:
    """Table 5 at the budget of s.steps (rounded down to a multiple of 4) guided calls."""
    return ablation("table5", out, s, prior, ablations.table5_cells(s.steps - s.steps % 4), zeta,
                    scoring)


def table7(out: str, s: Settings, prior: str, cses: dict, zeta: dict, scoring: dict) -> dict:
    """Table 7: DPS + CSE with the 100-crop SR CSE after a quarter, half and all its steps (the
    checkpoints there; a run trained before the quarters were kept: every one it has)."""
    run = os.path.dirname(cses[f"sr-{s.cse_images[1]}"])
    quarters = [max(1, s.cse_steps // 4), max(1, s.cse_steps // 2), s.cse_steps]
    have = all(os.path.isdir(os.path.join(run, f"checkpoint-{n}")) for n in quarters)
    return ablation("table7", out, s, prior, ablations.table7_cells(
        run, "sr", quarters if have else None), zeta, scoring)


def table9(out: str, s: Settings, prior: str, zeta: dict, scoring: dict) -> dict:
    """Table 9 (right): DPS, DSG and DMAP with ancestral steps and with the PF-ODE."""
    return ablation("table9", out, s, prior, ablations.table9_cells(("dps", "dsg", "dmap")), zeta,
                    scoring)


def observe(out: str, s: Settings, prior: str, cses: dict, zeta: dict) -> dict:
    """eval.py observe on the first test crop, SR, the 100-crop CSE as the reference."""
    first = sorted(os.listdir(os.path.join(out, "data", "test")))[0]
    given = {m: zeta[f"sr/{m}"] for m in ("dps", "dsg", "dmap")}
    folder = os.path.join(out, "observe")
    image = os.path.abspath(os.path.join(out, "data", "test", first))  # as eval.py's table.md:
    reference = os.path.abspath(cses[f"sr-{s.cse_images[1]}"])  # report.md makes them relative
    observations.observe(image, folder, cse=reference, model=prior, op="sr", size=s.size,
                         steps=s.steps, zeta=given, trajectories=s.trajectories,
                         k_mean=s.k_mean, k=s.k, repeats=s.repeats,
                         batch=max(s.k, s.trajectories), seed=s.seed, device="cpu",
                         **s.ops["sr"])
    done = {}
    for name in ("observation_1", "observation_2"):
        with open(os.path.join(folder, name + ".json")) as f:
            done[name] = json.load(f)
    done["observation_3"] = {f.removeprefix("observation_3_").removesuffix(".npy").replace(
        "_", " "): float(np.load(os.path.join(folder, f)).mean())
        for f in sorted(os.listdir(folder)) if f.endswith(".npy")}
    return done


# ---------------------------------------------------------------------------------------------
# (5) The report
# ---------------------------------------------------------------------------------------------


def moving_average(values, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, mean of the `width` losses up to that step), steps counted from 1."""
    v = np.asarray(values, float)
    width = max(1, min(width, len(v)))
    return np.arange(width, len(v) + 1), np.convolve(v, np.ones(width) / width, mode="valid")


# The paper's claims as paired comparisons: both methods restore the same test crops from the
# same seeds, so the per-crop difference is far less noisy than the two means' intervals say.
CLAIMS = (("dmap", "dps"), ("dmap-same", "dps"), ("dsg", "dps"), ("cse", "ddpm"),
          ("dps+cse", "dps"), ("dmap+cse", "dmap"))


def paired(out: str, s: Settings) -> dict:
    """{'op/a-b': the per-crop PSNR of a minus b (eval stage): mean, 95% half-width, n, and in
    how many crops a is the higher}."""
    def psnr(op, m):
        folder = os.path.join(out, "eval", op, m)
        return np.array([read_config(folder, f)["psnr"] for f in sorted(os.listdir(folder))
                         if f.endswith(".json")])

    result = {}
    for op in s.ops:
        for a, b in CLAIMS:
            d = psnr(op, a) - psnr(op, b)
            result[f"{op}/{a}-{b}"] = dict(metrics.mean_interval(d), wins=int((d > 0).sum()))
    return result


def figures(out: str, s: Settings, r: dict) -> dict:
    """prior_loss.png: the training losses (moving averages of 50 steps); prior_samples.png:
    unconditional samples of the prior beside held-out test crops."""
    curves = {"prior": r["prior"]["losses"]}
    for name, model in r["cse"].items():
        curves[f"CSE {name}"] = read_config(os.path.join(out, model), "cse.json")["losses"]
    quick = f"\n{QUICK_NOTE}" if s == QUICK else ""
    loss = plot.line_plot({k: moving_average(v, 50) for k, v in curves.items()}, logy=True,
                          xlabel="optimizer step", ylabel="epsilon MSE",
                          title="training loss (moving average of 50 steps)" + quick)
    sd = dmap.load_sd2(os.path.join(out, r["prior"]["model"]))
    denoiser = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar, sd.prediction)
    g = torch.Generator().manual_seed(s.seed)
    sigmas = dmap.sd_sigmas(s.steps, sd.abar)
    x = sigmas[0].item() * torch.randn(16, *sd.latent(s.size), generator=g)
    samples = dmap.ddpm(denoiser, x, None, None, sigmas, generator=g)
    test = sorted(os.listdir(os.path.join(out, "data", "test")))[:16]
    real = [np.asarray(Image.open(os.path.join(out, "data", "test", f)).convert("RGB"))
            for f in test]
    big = 4 if s.size <= 32 else 1  # 32 px panels drawn at 128

    def grow(a):
        return Image.fromarray(a).resize((a.shape[1] * big, a.shape[0] * big), Image.NEAREST)

    rows = [[grow(dmap.to_uint8(samples[i:i + 1])) for i in range(k, k + 8)] for k in (0, 8)]
    rows += [[grow(a) for a in real[k:k + 8]] for k in (0, 8)]
    titles = [["sample"] * 8] * 2 + [["test crop"] * 8] * 2
    grid = plot.image_grid(rows, titles, title=f"The prior's samples ({s.steps} DDPM steps) and "
                           "held-out test crops" + quick)
    return {"prior_loss.png": loss, "prior_samples.png": grid}


def markdown(s: Settings, r: dict, seconds: dict, out: str) -> str:
    """report.md: the machine, every stage's time, then each stage's numbers and the figures;
    the files it names relative to out, its folder."""
    def included(name):  # eval.py's texts name the files under out by their absolute paths
        with open(os.path.join(out, name)) as f:
            return f.read().replace(os.path.join(os.path.abspath(out), ""), "")

    lines = [f"**{QUICK_NOTE}**", ""] if s == QUICK else []
    lines += ["# The paper's experiment in miniature (mini.py)", "",
             f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"code {cli.code_version()}", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    lines += [f"| all | {sum(seconds.values()):.0f} |", "",
              "## Data", "",
              f"{s.size} x {s.size} crops, side U{s.crop} of the short side, Lanczos; "
              f"train ({s.train_crops} crops) and tune ({s.tune_crops}): "
              f"{', '.join(PHOTOS['train'])}; test ({s.test_crops}): "
              f"{', '.join(PHOTOS['test'])}", "", "## Prior", "",
              f"UNet {s.unet.block_out_channels}, {s.prior_steps} steps of {s.prior_batch}, "
              f"AdamW lr {s.prior_lr:g}; epsilon MSE on the test crops (fixed t and noise): "
              f"untrained {r['prior']['held_out']['untrained']:.4f}, trained "
              f"{r['prior']['held_out']['trained']:.4f}", "", "## zeta sweep (mean PSNR on the "
              f"{s.tune_crops} tune crops; chosen in bold)", "",
              "| operator/method | " + " | ".join(f"zeta {i + 1}" for i in range(len(
                  s.grid["default"]))) + " |", "|---|" + "---|" * len(s.grid["default"])]
    for key, psnr in r["tune"]["sweep"].items():
        best = f"{r['tune']['zeta'][key]:g}"
        lines.append(f"| {key} | " + " | ".join(
            (f"**{z}: {v:.2f}**" if z == best else f"{z}: {v:.2f}") for z, v in psnr.items())
            + " |")
    lines += ["", "## Table 4 in miniature", "", included(os.path.join("eval", "table.md"))]
    lines += ["## The claims, paired: PSNR of A minus B on the same test crops and seeds", "",
              "mean ± 95% half-width (dB), and in how many crops A is the higher", "",
              "| A - B | " + " | ".join(s.ops) + " |", "|---|" + "---|" * len(s.ops)]
    for a, b in CLAIMS:
        lines.append(f"| {a} - {b} | " + " | ".join(
            f"{d['mean']:+.2f}" + (f" ± {d['ci95']:.2f}" if d["ci95"] is not None else "")
            + f" ({d['wins']}/{d['n']})"
            for d in (r["paired"][f"{op}/{a}-{b}"] for op in s.ops)) + " |")
    lines.append("")
    lines += [f"## Table 6 in miniature: SR, CSEs trained on "
              f"{', '.join(map(str, s.cse_images))} crops", "",
              "| crops | method | PSNR | SSIM | SW x1e2 | y RMSE |", "|---|---|---|---|---|---|"]
    n = str(s.cse_images[1])
    with open(os.path.join(out, "eval", "table.json")) as f:
        main = json.load(f)["table"]
    by_size = dict(r["table6"], **{n: {m: main[f"sr/{m}"] for m in ("cse", "dps+cse",
                                                                    "dmap+cse")}})
    for crops in sorted(by_size, key=int):
        for m, summary in by_size[crops].items():
            lines.append(f"| {crops} | {m} | " + " | ".join(
                metrics.cell(summary, k) for k in ("psnr", "ssim", "sw", "y_rmse")) + " |")
    lines += [""] + ablation_lines(r, included)
    lines += ["", included(os.path.join("observe", "observations.md")), "## Figures", ""]
    observed = sorted(f for f in os.listdir(os.path.join(out, "observe")) if f.endswith(".png"))
    lines += [f"![{path}]({path})" for path in ("prior_loss.png", "prior_samples.png",
                                               *(f"eval/{op}/grid.png" for op in s.ops),
                                               *(f"observe/{f}" for f in observed))]
    return "\n".join(lines) + "\n"


def ablation_lines(r: dict, included) -> list[str]:
    """Tables 5, 7 and 9 in miniature, each with what it shows in one plain sentence (mean PSNR
    over the test crops; the paper's own numbers are at 512 px on ImageNet)."""
    def psnr(table, cell):
        return r[table][cell]["psnr"]["mean"]

    t5 = r["table5"]
    best = max((c for c in t5 if c.startswith("DMAP")), key=lambda c: psnr("table5", c))
    dps = next(c for c in t5 if c.startswith("DPS"))
    first, last = list(r["table7"])[0], list(r["table7"])[-1]
    a, b = psnr("table5", best), psnr("table5", dps)
    c, d = psnr("table7", first), psnr("table7", last)
    said = {
        "table5": f"At one budget, DMAP's best split is {best} ({a:.2f} dB) against {dps}'s "
                  f"{b:.2f} dB: the paper's claim that DMAP beats DPS at the same cost "
                  + ("holds here." if a > b else "does not hold here."),
        "table7": f"DPS + CSE goes from {c:.2f} dB ({first}) to {d:.2f} dB ({last}): more "
                  "training of the CSE " + ("helps, as in the paper." if d > c else
                                            "does not help here, unlike the paper."),
        "table9": "Ancestral minus PF-ODE: " + ", ".join(
            f"{m} {psnr('table9', m + ' ancestral') - psnr('table9', m + ' PF-ODE'):+.2f} dB"
            for m in ("dps", "dsg", "dmap")) + "."}
    lines = []
    for name in ("table5", "table7", "table9"):
        lines += [f"## {ablations.TITLES[name]} (in miniature, SR)", "", said[name], "",
                  included(os.path.join(name, "table.md")).split("\n", 2)[2]]
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "unknown CPU"


# ---------------------------------------------------------------------------------------------
# (6) The prior as a model folder that dmap.py restores with (models/mini-prior)
# ---------------------------------------------------------------------------------------------

EXAMPLE = ("chelsea", 128)  # a test photograph (never trained on), centre crop at this side


def export_prior(out: str, r: dict, folder: str, s: Settings) -> str:
    """The trained prior of run `out` (results r of its data, prior and tune stages) as a
    pixel-space model folder: unet/ in float16, scheduler/, defaults.json (dmap.py's defaults
    for it: size, steps, operator settings and the tuned zeta per operator and method),
    README.md (how it was made, its losses, the sweep) and example.png. Returns the folder."""
    if os.path.exists(folder):
        raise ValueError(f"{folder} exists; choose another folder or move it away")
    model = os.path.join(out, r["prior"]["model"])
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's
    os.makedirs(os.path.join(tmp, "unet"))
    shutil.copy(os.path.join(model, "unet", "config.json"), os.path.join(tmp, "unet"))
    shutil.copytree(os.path.join(model, "scheduler"), os.path.join(tmp, "scheduler"))
    weights = "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(os.path.join(model, "unet", weights))
    safetensors.torch.save_file({k: v.half() for k, v in state.items()},
                                os.path.join(tmp, "unet", weights), metadata={"format": "pt"})
    operators = {op: {dmap.OPERATOR_FLAGS[k][1]: v for k, v in given.items()}  # {"factor": 4}
                 for op, given in s.ops.items() if given}
    zeta = {}
    for key, value in r["tune"]["zeta"].items():  # "sr/dps" -> zeta["sr"]["dps"]
        op, method = key.split("/")
        zeta.setdefault(op, {})[method] = value
    cli.write_json(os.path.join(tmp, dmap.MODEL_DEFAULTS), dict(
        about="mini.py's prior: dmap.py's defaults for it (zeta tuned by mini.py's tune stage)",
        size=s.size, steps=s.steps, operators=operators, zeta=zeta))
    photo = photograph(EXAMPLE[0])
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo.crop((left, top, left + side, top + side)).resize(
        (EXAMPLE[1], EXAMPLE[1]), Image.LANCZOS).save(os.path.join(tmp, "example.png"))
    cli.write_text(os.path.join(tmp, "README.md"), prior_card(r, s, operators, zeta))
    os.replace(tmp, folder)
    return folder


def prior_card(r: dict, s: Settings, operators: dict, zeta: dict) -> str:
    """README.md of the exported prior: what it is, how it was made, its losses and zetas."""
    losses, held = r["prior"]["losses"], r["prior"]["held_out"]
    ops = ", ".join(f"{op} ({', '.join(f'{k} {v}' for k, v in operators.get(op, {}).items())})"
                    if operators.get(op) else op for op in zeta)
    rows = [f"| {op}/{method} | {z:g} | " + ", ".join(
        f"{k}: {v:.2f}" for k, v in r["tune"]["sweep"][f"{op}/{method}"].items()) + " |"
        for op in zeta for method, z in zeta[op].items()]
    return "\n".join([
        "# mini-prior: a 32 px pixel-space prior trained by this repository",
        "",
        f"A `unet.py` UNet (widths {s.unet.block_out_channels}, {s.unet.layers_per_block} layer "
        "per block, self-attention at 8 x 8; weights stored in float16) trained from scratch on "
        f"{s.train_crops} crops of {s.size} px of the photographs that ship with scikit-image "
        f"({', '.join(PHOTOS['train'])}; the test photographs {', '.join(PHOTOS['test'])} "
        "were never trained on), with SD 2.0's DDPM schedule (epsilon prediction). Made with",
        "",
        "    python mini.py --export-prior models/mini-prior",
        "",
        "which runs mini.py's stages data, prior and tune (its full settings) and writes this "
        f"folder. Training: {s.prior_steps} AdamW steps of {s.prior_batch} crops, lr "
        f"{s.prior_lr:g} with cosine decay (`cse.py train --train unet`); the last training "
        f"loss {losses[-1]:.4f}; held-out epsilon MSE {held['untrained']:.3f} untrained -> "
        f"{held['trained']:.3f} trained (on the test crops).",
        "",
        f"`defaults.json` gives dmap.py this prior's own defaults: {s.size} px, {s.steps} steps "
        f"(DMAP at the same cost: {s.steps // 2}), the operators {ops}, and zeta per operator "
        "and method, tuned by mini.py's sweep (mean PSNR on "
        f"{s.tune_crops} tuning crops of the training photographs):",
        "",
        "| operator/method | zeta | PSNR (dB) per zeta tried |",
        "|---|---|---|",
        *rows,
        "",
        "Another CPU or number of threads trains weights that differ by float rounding, which "
        "can move a zeta by one grid step.",
        "",
        "`example.png`: a centre crop of `chelsea` (a test photograph).",
        ""])


# ---------------------------------------------------------------------------------------------
# (7) The command line
# ---------------------------------------------------------------------------------------------

STAGES = ("data", "prior", "cse", "tune", "eval", "table6", "table5", "table7", "table9",
          "observe")


def stage(name: str, out: str, s: Settings, r: dict, scoring: dict):
    """Run one stage; its result (JSON-able, paths relative to out)."""
    prior = os.path.join(out, r["prior"]["model"]) if "prior" in r else None
    cses = {k: os.path.join(out, v) for k, v in r.get("cse", {}).items()}
    zeta = r.get("tune", {}).get("zeta", {})
    if name == "data":
        return make_data(out, s)
    if name == "prior":
        result = train_prior(out, s)
        return dict(result, model=os.path.relpath(result["model"], out))
    if name == "cse":
        return {k: os.path.relpath(v, out) for k, v in train_cses(out, s, prior).items()}
    if name == "tune":
        return tune(out, s, prior)
    if name == "eval":
        return evaluate(out, s, prior, cses, zeta, scoring)
    if name == "table6":
        return table6(out, s, prior, cses, zeta, scoring)
    if name == "table5":
        return table5(out, s, prior, zeta, scoring)
    if name == "table7":
        return table7(out, s, prior, cses, zeta, scoring)
    if name == "table9":
        return table9(out, s, prior, zeta, scoring)
    return observe(out, s, prior, cses, zeta)


@contextlib.contextmanager
def rerun_continues(where: str):
    """Ctrl-C inside: one line, where it stopped, the inner code's detail without its advice
    (after "; ", for its own command: --resume, ...) and that a rerun continues."""
    try:
        yield
    except KeyboardInterrupt as e:
        detail = f", {str(e.args[0]).split('; ')[0]}" if e.args else ""
        raise KeyboardInterrupt(f"{where}{detail}; rerun the same command to continue") \
            from None


def run(args) -> str:
    s = QUICK if args.quick else Settings()
    out = args.out or ("results/mini-quick" if args.quick else "results/mini")
    scoring = table_metrics(args.metric_weights, s.size)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    os.makedirs(out, exist_ok=True)
    settings = json.loads(json.dumps(asdict(s)))
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != settings:
                raise ValueError(f"{out} holds a run with other settings (--quick differs?); "
                                 "use another --out")
    else:
        cli.write_json(path, settings)
    r, seconds = {}, {}
    os.makedirs(os.path.join(out, "stages"), exist_ok=True)
    timing = os.path.join(out, "stages", "seconds.json")
    if os.path.exists(timing):
        with open(timing) as f:
            seconds = json.load(f)
    stages = ("data", "prior", "tune") if args.export_prior else STAGES
    for k, name in enumerate(stages):
        with rerun_continues(f"in stage {k + 1} of {len(stages)} ({name})"):
            result = os.path.join(out, "stages", f"{name}.json")  # the stage's result: done
            if os.path.exists(result):
                with open(result) as f:
                    r[name] = json.load(f)
                print(f"[{k + 1}/{len(stages)}] {name}: done before, skipped", file=sys.stderr)
                continue
            print(f"[{k + 1}/{len(stages)}] {name}", file=sys.stderr)
            t0 = time.perf_counter()
            r[name] = stage(name, out, s, r, scoring)
            cli.write_json(result, r[name])
            seconds[name] = round(time.perf_counter() - t0, 1)
            cli.write_json(timing, seconds)
    if args.export_prior:
        return f"wrote {export_prior(out, r, args.export_prior, s)}"
    with rerun_continues("while writing the report, every stage done"):
        r["paired"] = paired(out, s)
        for name, image in figures(out, s, r).items():
            cli.write_atomic(os.path.join(out, name), image.save)
        text = markdown(s, r, seconds, out)
        cli.write_text(os.path.join(out, "report.md"), text)
        cli.write_json(os.path.join(out, "report.json"), dict(settings=settings,
                                                              seconds=seconds, **r))
        print(text)
    return f"wrote {os.path.join(out, 'report.md')} in {sum(seconds.values()):.0f} s of stages"


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (a rerun resumes it; default: results/mini, "
                   "with --quick results/mini-quick)")
    p.add_argument("--quick", action="store_true", help="toy sizes, about a minute; numbers not "
                   "meaningful (the tests run it)")
    p.add_argument("--metric-weights", help="folder of the LPIPS and FID weight files; with all "
                   "three there (or in $TORCH_HOME/hub/checkpoints) the tables add LPIPS, FID "
                   "and KID (default: without them)")
    p.add_argument("--export-prior", metavar="FOLDER", help="run only the stages data, prior "
                   "and tune, then write the prior as a model folder that dmap.py --model "
                   "takes, with its defaults and tuned zetas (models/mini-prior was made so; "
                   "default: no export)")
    args = p.parse_args(argv)
    return cli.run(lambda: run(args), interrupted="before the first stage; rerun the same "
                   "command to continue", to_stderr=True)


if __name__ == "__main__":
    sys.exit(main())
