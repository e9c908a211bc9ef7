"""The conditional score estimator (CSE) of Xu et al., ICLR 2025 (arXiv 2501.18913): a ControlNet.

"Rethinking Diffusion Posterior Sampling: From Conditional Score Estimator to Maximizing a
Posterior" estimates the conditional score with a ControlNet (Zhang et al., ICCV 2023, arXiv
2302.05543) on Stable Diffusion 2.0, whose hint is the degraded image y at full resolution; its
13 residuals are added to the frozen UNet (docs/official_code.md §4.7, §7). Train one, make the
self-generated data set, restore with it:

    python cse.py train --op sr --images DIR --out runs/sr      # 5000 steps, batch 64
    torchrun --nproc_per_node 4 cse.py train --op sr --images DIR --out runs/sr  # 4 GPUs
    python cse.py generate --n 1000 --out gen/
    python dmap.py --method dmap --op sr --cse runs/sr/checkpoint-5000 img.png

The network and its loaders are controlnet.py's; the CSE denoiser, x0_hat(x, sigma; y), is
dmap.CSEDenoiser. Reading order: (1) training; (2) the self-generated data set; (3) the
command line.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import contextlib
import functools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time

import numpy as np
import safetensors.torch
import torch
from PIL import Image, ImageEnhance
from torch import nn
from tqdm import tqdm

import dmap
import operators
import plot
import vae
from checkpoint import read_config
from controlnet import ControlNet, from_unet, load_controlnet
from unet import load_unet

# ---------------------------------------------------------------------------------------------
# (1) Training (Sec. 4.2, Appendix B.2; the authors' train_controlnet.py, docs/official_code.md
# §7): the epsilon-MSE of the UNet with the ControlNet's residuals, only the ControlNet learns
# ---------------------------------------------------------------------------------------------

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def min_side(path: str) -> int:
    """The shorter side of the image at path in pixels; 0 when it cannot be read whole."""
    try:
        with Image.open(path) as image:
            image.load()
            return min(image.size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


def choose_images(folder: str, n: int | None, seed: int = 42) -> tuple[list[str], list[str]]:
    """(train, held_out): the images under `folder` (sorted, then shuffled by
    random.Random(seed)), the first n readable ones to train on, as the authors choose their
    shots (train_controlnet.py:769-781: random.seed(42), shuffle, keep SHOT); held_out: those
    after them, for the validation panel. n None: all. Unreadable files are skipped, counted."""
    if not os.path.isdir(folder):
        raise ValueError(f"--images {folder}: no such folder")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                   for f in files if f.lower().endswith(IMAGE_TYPES))
    random.Random(seed).shuffle(paths)
    chosen, bad, i = [], [], 0
    while i < len(paths) and (n is None or len(chosen) < n):
        (chosen if min_side(paths[i]) else bad).append(paths[i])
        i += 1
    if bad:
        print(f"note: skipped {len(bad)} unreadable file(s), e.g. {bad[0]}", file=sys.stderr)
    if not chosen:
        raise ValueError(f"--images {folder}: no readable image ({' '.join(IMAGE_TYPES)}); "
                         "nothing to train on")
    if n is not None and len(chosen) < n:
        raise ValueError(f"--n {n}, but {folder} holds {len(chosen)} readable images; pass "
                         f"--n {len(chosen)} or add images")
    return chosen, paths[i:]


def uniform(g: torch.Generator, a: float, b: float) -> float:
    return torch.empty(1).uniform_(a, b, generator=g).item()


def random_resized_crop(image: Image.Image, size: int, g: torch.Generator,
                        scale=(0.8, 2.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision RandomResizedCrop(size, scale=(0.8, 2.0)) (train_controlnet.py:745), the same
    draws in the same order: a box of U(scale) times the image's area and log-uniform aspect
    ratio, up to 10 tries, else the centre crop of the nearest allowed ratio (the common case
    for a scale above 1); resized bilinearly with antialiasing (Pillow)."""
    W, H = image.size
    for _ in range(10):
        area = W * H * uniform(g, *scale)
        aspect = math.exp(uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=g))
            left = int(torch.randint(0, W - w + 1, (1,), generator=g))
            break
    else:
        w, h = (W, round(W / ratio[0])) if W / H < ratio[0] else \
            (round(H * ratio[1]), H) if W / H > ratio[1] else (W, H)
        top, left = (H - h) // 2, (W - w) // 2
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def color_jitter(image: Image.Image, g: torch.Generator, strength: float = 0.1) -> Image.Image:
    """torchvision ColorJitter(0.1, 0.1, 0.1, 0.1) on a PIL image: brightness, contrast and
    saturation factors U(0.9, 1.1), a hue shift U(-0.1, 0.1) of the circle, in random order."""
    order = torch.randperm(4, generator=g).tolist()
    factors = [uniform(g, 1 - strength, 1 + strength) for _ in range(3)]
    hue = uniform(g, -strength, strength)
    for i in order:
        if i < 3:
            enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i]
            image = enhance(image).enhance(factors[i])
        else:  # torchvision adjust_hue: shift the HSV hue byte, wrapping around
            h, s, v = image.convert("HSV").split()
            h = (np.asarray(h).astype(np.int16) + int(hue * 255)) % 256
            image = Image.merge("HSV", (Image.fromarray(h.astype(np.uint8)), s, v)).convert("RGB")
    return image


def augment(path: str, size: int, g: torch.Generator) -> torch.Tensor:
    """One training image (train_controlnet.py:743-758): RandomResizedCrop, horizontal flip
    p = 0.5, ColorJitter 0.1, -> (3, size, size) in [-1, 1] (ToTensor, Normalize(0.5, 0.5))."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read training image {path}: {e}") from None
    image = random_resized_crop(image, size, g)
    if torch.rand(1, generator=g) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = color_jitter(image, g)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def sample_operator(op: operators.Operator, op_args: dict, g: torch.Generator):
    """The degradation of one training sample: `op`, or for a random operator (motion blur,
    nonlinear blur, random mask) a fresh draw, as the authors redraw the nonlinear-blur kernel
    for every image (§7). The KernelWizard is loaded once and shared."""
    if "seed" not in op_args:
        return op
    args = dict(op_args, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    if "weights" in args:
        args["weights"] = op.net
    return type(op)(**args)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n images in one epoch (a fresh permutation per epoch, like the authors'
    shuffling DataLoader; fewer images than a batch simply repeat, as their loader does)."""
    g = torch.Generator().manual_seed(seed * 2**32 + 2**31 + epoch)
    return torch.randperm(n, generator=g).tolist()


def sample_seed(seed: int, k: int) -> int:
    """The seed of training sample k (k = step * batch + position), whose image, augmentation,
    degradation, VAE sample, t and noise it draws: a run resumed at any step, or sharded over
    any number of processes, sees the same samples as one uninterrupted run."""
    return seed * 2**32 + k


def batch_losses(net, sd: dmap.Pipeline, context, images, op, op_args, ks, size, seed,
                 autocast) -> torch.Tensor:
    """The per-sample losses of training samples ks, (len(ks),): ||eps_hat - eps||^2 / n with
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPMScheduler.add_noise), t ~ U{0..999},
    z = 0.18215 * a VAE sample of the augmented image (in pixel space the image itself), and
    the hint op.hint(op(image)), without noise (train_controlnet.py:900-955). For a v-model the
    target is v = sqrt(abar) eps - sqrt(1 - abar) z (DDPMScheduler.get_velocity).
    net is what is trained: a ControlNet, whose residuals for the hint go into the frozen
    sd.unet (a CSE), or, with op None, the UNet itself (a prior: no hint)."""
    device = context.device
    latent = sd.latent(size)
    xs, hints, noise, ts, eps = [], [], [], [], []
    for k in ks:
        g = torch.Generator().manual_seed(sample_seed(seed, k))
        order = epoch_order(len(images), seed, k // len(images))
        x = augment(images[order[k % len(images)]], size, g)[None].to(device)
        if op is not None:
            A = sample_operator(op, op_args, g).to(device)
            with torch.no_grad():
                hints.append(A.hint(A(x)))
        xs.append(x)
        noise.append(torch.randn(latent, generator=g))
        ts.append(int(torch.randint(0, len(sd.abar), (1,), generator=g)))
        eps.append(torch.randn(latent, generator=g))
    t = torch.tensor(ts, device=device)
    eps = torch.stack(eps).to(device)
    if sd.vae is None:  # pixel space: the latent is the image
        z = torch.cat(xs)
    else:
        vae_dtype = next(sd.vae.parameters()).dtype
        with torch.no_grad():
            mean, logvar = sd.vae.encode(torch.cat(xs).to(vae_dtype))
            z = (mean.float() + (logvar.float() / 2).exp() * torch.stack(noise).to(device))
            z = z * vae.SCALING_FACTOR
    abar = sd.abar.to(device)[t][:, None, None, None]
    z_t = dmap.q_sample(z, abar, eps)
    target = eps if sd.prediction == "eps" else dmap.velocity(z, abar, eps)
    ctx = context.expand(len(ks), -1, -1)
    with autocast():
        out = net(z_t, t, ctx) if op is None else \
            sd.unet(z_t, t, ctx, net(z_t, t, ctx, torch.cat(hints)))
    return (out.float() - target).pow(2).mean((1, 2, 3))


CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # a checkpoint's folder name
TEMPORARY = re.compile(r"\.checkpoint-\d+")  # one being written (left behind by a kill)
# What `train` can train (--train), and the file that records how: a CSE (a ControlNet on the
# frozen UNet) or a pixel-space prior (the UNet itself, for mini.py)
INFO = {"controlnet": "cse.json", "unet": "prior.json"}
KEEP_STATE = 2  # the newest checkpoints that keep state.pt: the one before is a fallback


def save_checkpoint(out: str, step: int, net: nn.Module, optimizer, info: dict) -> str:
    """out/checkpoint-N/: controlnet/ or unet/ (config.json + diffusion_pytorch_model
    .safetensors, the diffusers layout the authors' checkpoints have; a unet/ comes with the
    model's scheduler/, so the checkpoint is a pixel-space model folder dmap.load_sd2 reads),
    cse.json or prior.json (what it was trained for, how far) and state.pt (optimizer and step,
    for --resume). Written in a temporary folder and renamed, so a killed run or a full disk
    never leaves a checkpoint that looks whole; a failed write removes the temporary folder, and
    the error propagates. Only the two newest checkpoints keep their state.pt (the optimizer is
    twice the network): one to resume from, and the one before should its state.pt be lost."""
    what = "controlnet" if isinstance(net, ControlNet) else "unet"
    final, tmp = os.path.join(out, f"checkpoint-{step}"), os.path.join(out, f".checkpoint-{step}")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a killed run's: free the space first
        if TEMPORARY.fullmatch(name):
            shutil.rmtree(os.path.join(out, name))
    try:
        os.makedirs(os.path.join(tmp, what))
        with open(os.path.join(tmp, what, "config.json"), "w") as f:
            json.dump(net.cfg.to_diffusers(), f, indent=2)
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        safetensors.torch.save_file(
            state, os.path.join(tmp, what, "diffusion_pytorch_model.safetensors"),
            metadata={"format": "pt"})
        if what == "unet":
            shutil.copytree(os.path.join(info["model"], "scheduler"),
                            os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, INFO[what]), "w") as f:
            json.dump(dict(info, step=step), f, indent=2)
        torch.save({"optimizer": optimizer.state_dict(), "step": step},
                   os.path.join(tmp, "state.pt"))
        os.replace(tmp, final)  # fails rather than replace a checkpoint-N (train prevents it)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in resumable(out)[:-KEEP_STATE]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(old, "state.pt"))
    return final


def checkpoints(out: str) -> list[str]:
    """The checkpoint folders under out, oldest first (with or without state.pt)."""
    if not os.path.isdir(out):
        return []
    steps = sorted(int(m.group(1)) for m in map(CHECKPOINT.fullmatch, os.listdir(out)) if m)
    return [os.path.join(out, f"checkpoint-{step}") for step in steps]


def resumable(out: str) -> list[str]:
    """The checkpoints under out that keep their state.pt, oldest first."""
    return [c for c in checkpoints(out) if os.path.isfile(os.path.join(c, "state.pt"))]


def last_checkpoint(out: str) -> str | None:
    """The newest checkpoint under out that --resume can continue (one with its state.pt)."""
    return (resumable(out) or [None])[-1]


# What a resumed run must share with the run it continues (--steps may grow, the micro-batch
# and precision may change: they only change rounding).
RESUME_MUST_MATCH = ("train", "op", "operator", "size", "images", "n", "data_seed", "seed",
                     "batch", "lr", "lr_schedule", "prediction")


def resume_checkpoint(path: str, info: dict, net: nn.Module, optimizer, device) -> dict:
    """Load checkpoint `path` into net (the ControlNet or the UNet) and optimizer, after
    checking that it was trained as this run asks; its record (step, losses)."""
    what = "controlnet" if isinstance(net, ControlNet) else "unet"
    if not os.path.isfile(os.path.join(path, INFO[what])):
        raise ValueError(f"--resume: {path} holds no {INFO[what]}: it did not train a {what}; "
                         "use another --out")
    old = read_config(path, INFO[what])
    defaults = {"train": "controlnet", "lr_schedule": "constant"}  # older records
    keys = RESUME_MUST_MATCH + (("steps",) if info["lr_schedule"] == "cosine" else ())
    bad = [f"{k} {old.get(k, defaults.get(k))!r} (now {info[k]!r})" for k in keys
           if old.get(k, defaults.get(k)) != info[k]]
    if bad:
        raise ValueError(f"--resume: {path} was trained with {'; '.join(bad)}; use the same "
                         "settings, or another --out for a new run")
    load = load_controlnet if what == "controlnet" else load_unet
    net.load_state_dict(load(os.path.join(path, what), device, torch.float32).state_dict())
    file = os.path.join(path, "state.pt")

    def unreadable(why: str) -> ValueError:
        out = os.path.dirname(path)
        earlier = [c for c in resumable(out) if c != path][-1:]
        advice = f"move {path} out of {out} to resume from {earlier[0]}" if earlier else \
            f"no earlier checkpoint in {out} keeps its state.pt: start a new run with another --out"
        return ValueError(f"{file} is unreadable ({why}); {advice}")

    try:
        state = torch.load(file, map_location=device)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise unreadable(e.strerror if isinstance(e, OSError) and e.strerror else
                         "not a whole PyTorch file: truncated, or a Git LFS pointer?") from None
    if not (isinstance(state, dict) and {"optimizer", "step"} <= state.keys()):
        raise unreadable("not the optimizer state that cse.py train writes")
    optimizer.load_state_dict(state["optimizer"])
    return dict(old, step=state["step"])


def validation_panel(sd: dmap.Pipeline, controlnet, context, op, paths, *, size: int,
                     steps: int, seed: int, zeta: float | None, autocast) -> Image.Image:
    """Held-out images as rows after `steps` sampling steps: for a CSE the hint, the CSE alone
    (DDPM), DPS+CSE (with `zeta`) and the reference; for a prior (controlnet None) an
    unconditional sample and the image."""
    sigmas = dmap.sd_sigmas(steps, sd.abar)
    device, rows = context.device, []
    for r, path in enumerate(paths):
        x = dmap.read_image(path, size).to(device)
        if controlnet is None:  # a prior: an unconditional sample
            y, row, runs = None, [], [("ddpm", {})]
            denoiser = dmap.SDDenoiser(sd.unet, context, sd.abar, sd.prediction)
        else:
            y = op(x)
            denoiser = dmap.CSEDenoiser(sd.unet, controlnet, context, sd.abar, op.hint(y),
                                   sd.prediction)
            runs, row = [("ddpm", {}), ("dps", {"zeta": zeta})], [dmap.to_uint8(op.hint(y))]
        for method, kwargs in runs:
            g = torch.Generator(device).manual_seed(seed + r)
            noise = dmap.noise_like(torch.empty(1, *sd.latent(size), device=device), g)
            with autocast():
                z0 = dmap.SAMPLERS[method](denoiser, sigmas[0].item() * noise, y,
                                           lambda z: op(sd.decode(z)), sigmas, generator=g,
                                           **kwargs)
                with torch.no_grad():
                    row.append(dmap.to_uint8(sd.decode(z0).float()))
        rows.append(row + [dmap.to_uint8(x)])
    titles = [[f"sample ({steps} steps)", "held-out image"] if controlnet is None else
              ["hint", f"CSE alone ({steps} steps)", "DPS+CSE", "reference"]] * len(rows)
    return plot.image_grid(rows, titles)


def distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (its RANK / WORLD_SIZE / LOCAL_RANK), the
    process group started (NCCL on GPUs, gloo on the CPU); (0, 1, device) without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def validation_images(held: list[str], train: list[str], size: int, n: int = 2) -> list[str]:
    """Up to n held-out images at least size x size (training images when none is left)."""
    return ([p for p in held[:8 * n] if min_side(p) >= size]
            or [p for p in train if min_side(p) >= size])[:n]


DEVICE = dmap.DEVICE  # train's and generate's default: cuda where there is one

# The widths of the diffusers hint embedding (ControlNetModel's default); a pixel-space model
# takes as many levels as halve its side to the latent's: the first one alone
HINT_WIDTHS = (16, 32, 96, 256)


def train(*, images: str, out: str, model: str = dmap.DEFAULT_MODEL, train: str = "controlnet",
          op: str = "sr", size: int = 512, n: int | None = 100, data_seed: int = 42,
          steps: int = 5000, batch: int = 64, micro_batch: int = 4, lr: float = 5e-6,
          lr_schedule: str = "constant", bf16: bool = False, grad_checkpoint: bool = False,
          checkpoint_every: int = 500, validate_every: int = 500, validation_steps: int = 25,
          resume: bool = False, seed: int = 0, prediction: str | None = None,
          device: str = DEVICE, sr_factor: int | None = None, blur_std: float | None = None,
          kernel_weights: str | None = None) -> str:
    """A CSE: the ControlNet from the UNet of `model` (or, resume, the newest checkpoint in
    `out`), trained for operator `op` on n images of the folder `images` (None: all) for `steps`
    steps of `batch` samples, `micro_batch` per forward pass; with train "unet" the UNet of a
    pixel-space model itself (a prior; op unused). Each keyword is `python cse.py train`'s flag
    of the same name (sr_factor, blur_std, kernel_weights: dmap.make_operator's). Returns the
    last checkpoint."""
    rank, world, device = distributed(torch.device(device))
    B, m = batch, micro_batch
    checks = [(B >= 1 and m >= 1, f"--batch and --micro-batch must be >= 1, got {B}, {m}"),
              (B % world == 0, f"--batch {B} must be a multiple of the {world} processes"),
              (steps >= 1, f"--steps must be >= 1, got {steps}"),
              (lr > 0, f"--lr must be > 0, got {lr}"),
              (size >= 8 and size % 8 == 0, f"--size must be a multiple of 8, got {size}"),
              (checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
              (n is None or n >= 1, f"--n must be >= 1, got {n}")]
    cli.check(checks)
    prior = train == "unet"
    operator, op_args = (None, None) if prior else dmap.make_operator(
        op, size, seed=seed, model=model, sr_factor=sr_factor, blur_std=blur_std,
        kernel_weights=kernel_weights)
    found, last = checkpoints(out), last_checkpoint(out)
    if found and not resume:
        raise ValueError(f"{found[-1]} exists; pass --resume to continue it, or another --out")
    if found and found[-1] != last:  # (--resume into an empty or missing --out starts afresh)
        raise ValueError(
            f"--resume: {found[-1]} has no state.pt (the optimizer state); move the checkpoints "
            f"after {os.path.basename(last)} out of {out} to resume from {last}" if last else
            f"--resume: {out} holds {', '.join(map(os.path.basename, found))}, but none "
            "keeps its state.pt (the optimizer state, which only the two newest keep): put it "
            "back, or start a new run with another --out")
    if prior and not dmap.is_pixel_model(model):
        raise ValueError(f"--train unet trains a pixel-space model (unet/ with 3 input channels "
                         f"and scheduler/, no vae/; mini.py makes one); {model} is not one")
    train_images, held = choose_images(images, n, data_seed)
    small = sum(min_side(path) < size for path in train_images)
    if small and rank == 0:
        print(f"note: {small} of {len(train_images)} images are smaller than {size} px; the "
              "random crop upscales them (blurrier training targets)", file=sys.stderr)
    if operator is not None:
        operator = operator.to(device)
    # a trained UNet keeps float32 master weights; --bf16 then only autocasts
    sd = dmap.load_sd2(model, prediction, device,
                       torch.bfloat16 if bf16 and not prior else torch.float32)
    context = dmap.encode_prompt(sd, "").float()  # computed once; the text encoder is freed
    sd = sd._replace(text_encoder=None)
    for frozen in (sd.vae, None if prior else sd.unet):
        if frozen is not None:
            frozen.requires_grad_(False)
    sd.unet.gradient_checkpointing = grad_checkpoint
    if prior:
        net = sd.unet.requires_grad_(True)  # loaded frozen, as every network is
    else:
        halvings = round(math.log2(size // sd.latent(size)[-1]))
        with torch.random.fork_rng(devices=[]):  # the hint embedding's default init, seeded
            torch.manual_seed(seed)
            net = from_unet(sd.unet, conditioning_embedding_out_channels=HINT_WIDTHS[
                :halvings + 1]).float()  # fp32 master weights (diffusers: the same)
        net.gradient_checkpointing = grad_checkpoint
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)  # train_controlnet.py defaults
    info = dict(train=train, op=None if prior else op,
                operator=None if prior else {k: v for k, v in op_args.items() if k != "seed"},
                size=size, images=os.path.abspath(images), n=len(train_images),
                data_seed=data_seed, seed=seed, batch=B, lr=lr, lr_schedule=lr_schedule,
                steps=steps, prediction=sd.prediction, model=os.path.abspath(model),
                train_images=[os.path.relpath(p, images) for p in train_images])
    done = resume_checkpoint(last, info, net, optimizer, device) if resume and last else {}
    start, losses = done.get("step", 0), done.get("losses", [])[:done.get("step", 0)]
    trained = net if world == 1 else torch.nn.parallel.DistributedDataParallel(net)

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    val = validation_images(held, train_images, size) if rank == 0 else []
    zeta = None if prior else dmap.sampler_settings("dps", op)[1]["zeta"]  # the paper's
    bar = tqdm(total=steps, initial=start, desc="prior" if prior else f"CSE {op}", unit="step",
               disable=rank != 0)
    step = start
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            ks = range(step * B + rank * B // world, step * B + (rank + 1) * B // world)
            chunks = [ks[i:i + m] for i in range(0, len(ks), m)]
            total = torch.zeros((), device=device)
            for c, chunk in enumerate(chunks):
                # DDP averages the gradients over processes: each scales its sum by world / B
                sync = trained.no_sync() if world > 1 and c < len(chunks) - 1 else \
                    contextlib.nullcontext()
                with sync:
                    chunk_losses = batch_losses(trained, sd, context, train_images, operator,
                                                op_args, chunk, size, seed, autocast)
                    (chunk_losses.sum() * world / B).backward()
                total += chunk_losses.detach().sum()
            if world > 1:
                torch.distributed.all_reduce(total)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # max_grad_norm 1.0
            for group in optimizer.param_groups:  # constant: the authors'; cosine: to 0
                group["lr"] = lr if lr_schedule == "constant" else \
                    lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = total.item() / B
            if not math.isfinite(loss):
                raise ValueError(f"the loss is {loss} at step {step + 1}; try a smaller --lr "
                                 f"(or resume {last} without --bf16)")
            losses.append(round(loss, 6))
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{B / (time.perf_counter() - t0):.2f}")
            bar.update(1)
            finished = step + 1
            if rank == 0 and (finished % checkpoint_every == 0 or finished == steps):
                try:
                    last = save_checkpoint(out, finished, net, optimizer,
                                           dict(info, loss=loss, losses=losses))
                except (OSError, RuntimeError, safetensors.SafetensorError) as e:
                    why = e.strerror if isinstance(e, OSError) and e.strerror else \
                        str(e).strip().partition("\n")[0] or type(e).__name__
                    raise ValueError(
                        f"cannot write checkpoint-{finished} under {out} ({why}); " + (
                            f"{last} is intact: free space and continue with --resume" if last
                            else "no earlier checkpoint: free space and run again")) from None
            if rank == 0 and validate_every and finished % validate_every == 0 and val:
                panel = validation_panel(sd, None if prior else net, context, operator, val,
                                         size=size, steps=validation_steps, seed=seed,
                                         zeta=zeta, autocast=autocast)
                cli.write_atomic(os.path.join(out, f"validation-{finished}.png"), panel.save)
            if world > 1:
                torch.distributed.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"at step {step + 1} of {steps}; " + (
            f"{last} is whole: continue with --resume" if last else "no checkpoint yet")) \
            from None
    finally:
        bar.close()
    return last


# ---------------------------------------------------------------------------------------------
# (2) The self-generated data set (the paper's "gen" CSE: unconditional SD 2.0 samples; the
# authors' data_gen.py: Euler ancestral, empty prompt, 50 steps)
# ---------------------------------------------------------------------------------------------


def generate(*, out: str, model: str = dmap.DEFAULT_MODEL, n: int = 1000, steps: int = 50,
             size: int = 512, seed: int = 0, prediction: str | None = None,
             device: str = DEVICE, dtype: str = "float32") -> int:
    """n unconditional samples of `model`, out/000000.png, ...; image i from seed + i, so a
    stopped run continues with the images it lacks (each written atomically) and processes
    under torchrun share the work. Each keyword is `python cse.py generate`'s flag. Returns
    how many it wrote."""
    rank, world, device = distributed(torch.device(device))
    if n is None or n < 1 or steps < 1:
        raise ValueError(f"--n and --steps must be >= 1, got {n}, {steps}")
    todo = [i for i in range(rank, n, world)
            if not os.path.exists(os.path.join(out, f"{i:06d}.png"))]
    if not todo:
        return 0
    sd = dmap.load_sd2(model, prediction, device, getattr(torch, dtype))
    denoiser = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar, sd.prediction)
    sigmas = dmap.sd_sigmas(steps, sd.abar)
    latent = (1, sd.unet.cfg.in_channels, size // 8, size // 8)
    os.makedirs(out, exist_ok=True)
    written = 0
    try:
        for i in tqdm(todo, desc="generate", unit="image", disable=rank != 0):
            g = torch.Generator(device).manual_seed(seed + i)
            noise = dmap.noise_like(torch.empty(latent, device=device), g)  # float32 latents
            z0 = dmap.ddpm(denoiser, sigmas[0].item() * noise, None, None, sigmas, generator=g)
            with torch.no_grad():
                image = Image.fromarray(dmap.to_uint8(sd.decode(z0)))
            cli.write_atomic(os.path.join(out, f"{i:06d}.png"), image.save)
            written += 1
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"after {written} new image(s) in {out}; the same command "
                                "writes the rest") from None
    return written


# ---------------------------------------------------------------------------------------------
# (3) The command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.DefaultsHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a CSE on a folder of images",
                            formatter_class=cli.DefaultsHelpFormatter)
    gen = commands.add_parser("generate", help="the self-generated training set (SD 2.0 "
                              "samples)", formatter_class=cli.DefaultsHelpFormatter)
    for q in (t, gen):
        q.add_argument("--out", required=True, help="output folder")
        cli.add_model_flags(q, size=512, device=DEVICE, dtype=q is gen)
    t.add_argument("--train", default="controlnet", choices=list(INFO),
                   help="what learns: a CSE (a ControlNet on the frozen UNet), or the UNet of a "
                   "pixel-space model itself (a prior, as mini.py trains; --op unused) "
                   "(default: %(default)s)")
    t.add_argument("--op", default="sr", help=f"the degradation the CSE learns: {dmap.OP_HELP} "
                   "(default: %(default)s)")
    t.add_argument("--images", required=True, help="folder of training images (recursive)")
    t.add_argument("--n", "--num-images", dest="n", type=int, default=100,
                   help="images chosen from the folder (the paper: 25, 50, 100, 1000); under "
                   "torchrun spell it --num-images (torchrun reads --n as its own) "
                   "(default: %(default)s)")
    t.add_argument("--data-seed", type=int, default=42, help="seed of that choice (default: "
                   "%(default)s, the authors' random.seed(42))")
    t.add_argument("--steps", type=int, default=5000,
                   help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch", type=int, default=64, help="effective batch, whatever the "
                   "number of processes (default: %(default)s)")
    t.add_argument("--micro-batch", type=int, default=4, help="samples per forward pass (per "
                   "process); the batch accumulates over them (default: %(default)s)")
    t.add_argument("--lr", type=float, default=5e-6,
                   help="AdamW learning rate (default: %(default)s)")
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant (the authors'), or cosine decay to 0 at --steps (a prior "
                   "trained from scratch: its last weights, not a noisy snapshot; a resumed "
                   "run must then keep --steps) (default: %(default)s)")
    t.add_argument("--bf16", action="store_true", help="frozen networks in bfloat16 and "
                   "bfloat16 autocast (fp32 master weights and optimizer)")
    t.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in "
                   "the backward pass (less memory, about 1.3x the time)")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between "
                   "checkpoints (default: %(default)s)")
    t.add_argument("--validate-every", type=int, default=500, help="steps between validation "
                   "panels, 0: none (default: %(default)s)")
    t.add_argument("--validation-steps", type=int, default=25, help="sampling steps of the "
                   "validation panel (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "newest checkpoint (an empty --out starts afresh)")
    dmap.add_operator_flags(t)
    gen.add_argument("--n", "--num-images", dest="n", type=int, default=1000,
                     help="number of images (under torchrun: --num-images) (default: "
                     "%(default)s)")
    gen.add_argument("--steps", type=int, default=50,
                     help="sampling steps, Euler ancestral (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    settings = vars(parse_args(argv))  # each flag is the keyword of the same name
    command = settings.pop("command")
    start = time.perf_counter()

    def body():
        try:
            done = f"trained to {train(**settings)}" if command == "train" else \
                f"wrote {generate(**settings)} new image(s) to {settings['out']}"
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return f"{done} in {time.perf_counter() - start:.0f} s"

    return cli.run(body, interrupted="while starting; nothing written")


if __name__ == "__main__":
    sys.exit(main())
