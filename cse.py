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

Reading order: (1) the config; (2) the ControlNet: the hint embedding, the copied UNet encoder,
the zero convs, and `from_unet`; (3) loading a diffusers folder (the authors' checkpoints), the
original lllyasviel single-file layout, and a trained CSE with what it was trained for; (4) the
CSE denoiser, x0_hat(x, sigma; y); (5) training; (6) the self-generated data set; (7) the
command line. Parameter names are diffusers' ControlNetModel's own
(`diffusers/models/controlnets/controlnet.py`), so a diffusers folder loads without renaming.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
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
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn
from tqdm import tqdm

import dmap
import operators
import plot
import vae
from checkpoint import find_weights, load_state, read_config
from unet import TINY, UNet, UNetConfig, UNetEncoder, layout, ldm_unet_key, load_unet

# ---------------------------------------------------------------------------------------------
# (1) The config: the UNet's encoder half plus the hint embedding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """UNetConfig (out_channels unused: a ControlNet has no up path) plus the hint."""

    conditioning_channels: int = 3  # hint channels (RGB)
    # widths of the hint embedding's levels; each level after the first halves the resolution
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    @classmethod
    def from_diffusers(cls, cfg: dict, path: str = "controlnet config.json") -> "ControlNetConfig":
        """Read a diffusers ControlNetModel config.json (`path`, named in errors); reject what
        this ControlNet cannot build."""
        def fail(what):
            raise ValueError(f"{path}: {what}; only Stable Diffusion 2.x ControlNets "
                             "(ControlNetModel) are supported")

        if cfg.get("_class_name") not in (None, "ControlNetModel"):
            fail(f"_class_name {cfg['_class_name']!r} is not ControlNetModel (load the "
                 "controlnet/ folder of a checkpoint, not its unet/)")
        encoder = UNetConfig.from_diffusers(cfg, path)  # the same keys as the UNet's
        # Missing keys take diffusers' ControlNetModel defaults.
        if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
            fail("controlnet_conditioning_channel_order is not 'rgb'")
        if cfg.get("global_pool_conditions", False):
            fail("global_pool_conditions is true")
        chans = cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if not chans or not all(isinstance(c, int) and c > 0 for c in chans):
            fail(f"conditioning_embedding_out_channels {chans!r} is not a list of widths")
        hint = cfg.get("conditioning_channels", 3)
        if not (isinstance(hint, int) and hint > 0):
            fail(f"conditioning_channels {hint!r} is not a positive integer")
        return cls(**vars(encoder), conditioning_channels=hint,
                   conditioning_embedding_out_channels=tuple(chans))

    def to_diffusers(self) -> dict:
        """The config.json that diffusers' ControlNetModel (and from_diffusers) reads back: the
        UNet's keys without its up path, plus the hint's."""
        cfg = {k: v for k, v in super().to_diffusers().items()
               if k not in ("out_channels", "up_block_types")}
        return dict(cfg, _class_name="ControlNetModel",
                    conditioning_channels=self.conditioning_channels,
                    conditioning_embedding_out_channels=list(
                        self.conditioning_embedding_out_channels))


SD2_CONTROLNET = ControlNetConfig()  # the authors' CSE: ControlNetModel.from_unet(SD2-base UNet)
TINY_CONTROLNET = ControlNetConfig(**vars(TINY))  # for tests: TINY's encoder


# ---------------------------------------------------------------------------------------------
# (2) The ControlNet
# ---------------------------------------------------------------------------------------------


def zero_module(module: nn.Module) -> nn.Module:
    """diffusers controlnet.py zero_module (ControlNet's "zero convolution"): all parameters 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ConditioningEmbedding(nn.Module):
    """diffusers ControlNetConditioningEmbedding (original cldm.py input_hint_block): conv_in,
    then per level a 3x3 conv and a stride-2 3x3 conv, SiLU after each; conv_out zero-init."""

    def __init__(self, channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = zero_module(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, hint):
        e = F.silu(self.conv_in(hint))
        for block in self.blocks:
            e = F.silu(block(e))
        return self.conv_out(e)


class ControlNet(UNetEncoder):
    """diffusers ControlNetModel for Stable Diffusion 2.x (original cldm.py ControlNet).

    conv_in, time_embedding, down_blocks and mid_block are the UNet's encoder (UNetEncoder,
    the same code); controlnet_cond_embedding embeds the hint, added to the conv_in output;
    controlnet_down_blocks (one zero-initialised 1x1 conv per skip) and controlnet_mid_block
    map the 12 skips and the mid block output to the residuals.
    """

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg)
        chans, L = cfg.block_out_channels, cfg.layers_per_block
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, chans[0])
        # the widths of the skips in UNetEncoder.encode's order: conv_in's, then per level L
        # resnets and (all levels but the last) the downsampler
        widths = [chans[0]] + [c for i, c in enumerate(chans)
                               for _ in range(L + (i < len(chans) - 1))]
        self.controlnet_down_blocks = nn.ModuleList(
            zero_module(nn.Conv2d(c, c, 1)) for c in widths)
        self.controlnet_mid_block = zero_module(nn.Conv2d(chans[-1], chans[-1], 1))

    def forward(self, x, t, context, hint, conditioning_scale: float = 1.0):
        """x (B, 4, h, w) latents as the UNet sees them, t timesteps (scalar or (B,), int or
        fractional), context (B, 77, 1024), hint (B, 3, 8h, 8w) -> (down, mid): the 12 skip
        residuals (a list) and the mid residual, each times conditioning_scale (diffusers
        ControlNetModel.forward, guess_mode False). At 512 px (h = w = 64) for SD 2: (320, 64)
        x3, (320, 32), (640, 32) x2, (640, 16), (1280, 16) x2, (1280, 8) x3; mid (1280, 8).

        The hint enters the embedding as given; diffusers does not normalise it inside the
        model (its pipelines feed [0, 1]). The authors feed the degraded image in [-1, 1]
        (prepare_image overridden, docs/official_code.md §3.1 and §4.7) and trained on it
        (§7), so pass `operators.OPERATORS[op](...).hint(y)` unchanged.
        """
        temb = self.embed_time(t, x)
        h = self.conv_in(x)
        e = self.controlnet_cond_embedding(hint)
        if e.shape[-2:] != h.shape[-2:]:
            f = 2 ** (len(self.cfg.conditioning_embedding_out_channels) - 1)
            raise ValueError(f"hint {tuple(hint.shape[-2:])} for latents {tuple(x.shape[-2:])}:"
                             f" the hint is the degraded image at full resolution, {f}x the "
                             "latent size; pass op.hint(y), not y")
        h, skips = self.encode(h + e, temb, context)
        h = self.run(self.mid_block, h, temb, context)
        down = [conv(s) * conditioning_scale
                for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(h) * conditioning_scale


# What diffusers ControlNetModel.from_unet copies from the UNet (with time_proj, which has no
# parameters); the hint embedding keeps PyTorch's default init, the zero convs stay 0.
COPIED = ("conv_in", "time_embedding", "down_blocks", "mid_block")


def from_unet(unet: UNet, conditioning_channels: int = 3,
              conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
              ) -> ControlNet:
    """A new ControlNet for `unet`: diffusers ControlNetModel.from_unet, as the authors
    create the CSE (train_controlnet.py:634, docs/official_code.md §7).

    Built on the UNet's device in torch's default dtype (diffusers: the trainable copy is float32
    even from an fp16 UNet); the encoder's tensors are copies, not shared with the UNet, and
    trainable (requires_grad) whatever the UNet's flags.
    """
    cfg = ControlNetConfig(**vars(unet.cfg), conditioning_channels=conditioning_channels,
                           conditioning_embedding_out_channels=conditioning_embedding_out_channels)
    with torch.device(unet.conv_in.weight.device):
        controlnet = ControlNet(cfg)
    for name in COPIED:
        getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
    return layout(controlnet)


# ---------------------------------------------------------------------------------------------
# (3) Loading: a diffusers folder, or an original (lllyasviel) single-file checkpoint
# ---------------------------------------------------------------------------------------------


def load_controlnet(folder: str, device=None, dtype=None) -> ControlNet:
    """The ControlNet of a diffusers folder (config.json + diffusion_pytorch_model[.fp16]
    .safetensors): the authors' `checkpoint-N/controlnet/` and `xutongda/control_e_sd2.0_srx8`.

    Built on the meta device and filled tensor by tensor; dtype None keeps the file's dtype.
    """
    cfg = ControlNetConfig.from_diffusers(read_config(folder), os.path.join(folder, "config.json"))
    path = find_weights(folder, "diffusion_pytorch_model")
    with torch.device("meta"):
        model = ControlNet(cfg)
    return layout(load_state(model, path, lambda key: key, device, dtype))


# Original ControlNet names (cldm.py ControlNet; docs/sd2_formats.md §3.2, diffusers
# single_file_utils.py convert_controlnet_checkpoint) -> ours, for what a ControlNet adds to the
# UNet encoder; the encoder's own names (time_embed, input_blocks, middle_block) are the LDM
# UNet's, mapped by ldm_unet_key. input_hint_block.{i}: convs at even i, SiLU at odd i;
# {k} = i / 2 - 1; {last} = 4 n - 2, n = len(conditioning_embedding_out_channels).
_ORIGINAL_CONTROLNET = [
    (r"input_hint_block\.0", "controlnet_cond_embedding.conv_in"),
    (r"input_hint_block\.{last}", "controlnet_cond_embedding.conv_out"),
    (r"input_hint_block\.(\d*[02468])", "controlnet_cond_embedding.blocks.{k}"),
    (r"zero_convs\.(\d+)\.0", "controlnet_down_blocks.{i}"),
    (r"middle_block_out\.0", "controlnet_mid_block"),
]
# The ControlNet's modules in a standalone file without the `control_model.` prefix
# (thibaud/controlnet-sd21; diffusers recognises those by `time_embed.0.weight`).
_ORIGINAL_MODULES = ("time_embed.", "input_blocks.", "middle_block.", "input_hint_block.",
                     "zero_convs.", "middle_block_out.")


def original_controlnet_key(key: str, config: ControlNetConfig = SD2_CONTROLNET) -> str | None:
    """Our name for a key `control_model.*` of a ControlLDM checkpoint (or of a standalone file
    without the prefix); None for the other parts (model.diffusion_model., first_stage_model.,
    cond_stage_model., schedule buffers); an unknown ControlNet key comes back in the LDM UNet
    namespace, so that load_state reports it."""
    rest = key.removeprefix("control_model.")
    if rest == key and not rest.startswith(_ORIGINAL_MODULES):
        return None
    last = 4 * len(config.conditioning_embedding_out_channels) - 2
    for pattern, template in _ORIGINAL_CONTROLNET:
        m = re.fullmatch(pattern.format(last=last) + r"\.(weight|bias)", rest)
        if m is not None:
            *index, kind = m.groups()
            i = int(index[0]) if index else 0
            return f"{template.format(i=i, k=i // 2 - 1)}.{kind}"
    return ldm_unet_key("model.diffusion_model." + rest, config.layers_per_block)


def controlnet_from_single_file(path: str, config: ControlNetConfig = SD2_CONTROLNET,
                                device=None, dtype=None) -> ControlNet:
    """The ControlNet of an original single-file checkpoint (a ControlLDM file, `control_model.`
    keys, or a standalone one; fp32/fp16/bf16). dtype None keeps the file's dtype."""
    with torch.device("meta"):
        model = ControlNet(config)
    rename = functools.partial(original_controlnet_key, config=config)
    return load_state(model, path, rename, device, dtype)


# ---------------------------------------------------------------------------------------------
# (4) The CSE denoiser: dmap.SDDenoiser with the ControlNet's residuals in the UNet
# ---------------------------------------------------------------------------------------------

# What the residuals' shapes depend on: these must agree between the ControlNet and the UNet.
_MUST_MATCH = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def check_matches(controlnet: ControlNet, unet: UNet) -> None:
    """Refuse a ControlNet whose residuals cannot be added to this UNet, naming the mismatch."""
    bad = [f"{k} {getattr(controlnet.cfg, k)} (UNet: {getattr(unet.cfg, k)})"
           for k in _MUST_MATCH if getattr(controlnet.cfg, k) != getattr(unet.cfg, k)]
    if bad:
        raise ValueError(f"the ControlNet does not fit the UNet: ControlNet {', '.join(bad)}; "
                         "use the ControlNet trained for this UNet (or make one: from_unet)")


class ControlledUNet(nn.Module):
    """(x, t, context) -> eps_hat (or v) of the UNet with the ControlNet's residuals for a fixed
    hint: the official conditional denoiser (pipe.py:1687-1718, docs/official_code.md §4.7)."""

    def __init__(self, unet: UNet, controlnet: ControlNet, hint: torch.Tensor,
                 scale: float = 1.0):
        super().__init__()
        check_matches(controlnet, unet)
        want = controlnet.cfg.conditioning_channels
        if hint.ndim != 4 or hint.shape[1] != want:
            raise ValueError(f"hint of shape {tuple(hint.shape)}: this ControlNet takes "
                             f"(1 or B, {want}, H, W) images; pass op.hint(y)")
        self.unet, self.controlnet, self.hint, self.scale = unet, controlnet, hint, scale

    def forward(self, x, t, context):
        # (B, 3, 8h, 8w), one y for the batch, in the network's dtype as x (SDDenoiser casts x)
        hint = self.hint.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        residuals = self.controlnet(x, t, context, hint, self.scale)
        return self.unet(x, t, context, residuals)


class CSEDenoiser(dmap.SDDenoiser):
    """denoiser(x, sigma) -> x0_hat = E[x0 | x, y] with the CSE (Xu et al., §4; Tweedie, Eq. 4).

    dmap.SDDenoiser (scaling, fractional timestep, eps / v) whose network, `self.unet`, is the
    ControlledUNet (`.unet`, `.controlnet`, `.hint` inside); scale: conditioning_scale (1.0 in
    the official runs, docs/official_code.md §4.7). Gradients flow through the ControlNet and
    the UNet, as in DPS+CSE (pipe.py:1732-1737).
    """

    def __init__(self, unet: UNet, controlnet: ControlNet, context: torch.Tensor,
                 abar: torch.Tensor, hint: torch.Tensor, prediction: str = "eps",
                 scale: float = 1.0):
        super().__init__(ControlledUNet(unet, controlnet, hint, scale), context, abar,
                         prediction)


def load_cse(path: str, op: str, size: int, device=None, dtype=None) -> tuple[ControlNet, dict]:
    """A trained CSE and what it was trained for: a `checkpoint-N/` folder of `cse.py train`
    (controlnet/ + cse.json), a diffusers ControlNet folder (the authors' checkpoint-N/controlnet/,
    xutongda/control_e_sd2.0_srx8), or an original single file. Where a cse.json says which
    operator and image size the CSE learnt, a CSE for another one is refused."""
    if not os.path.exists(path):
        raise ValueError(f"--cse {path}: no such file or folder (a checkpoint-N folder of "
                         "`python cse.py train`, or a diffusers ControlNet folder)")
    if os.path.isfile(path):
        return controlnet_from_single_file(path, device=device, dtype=dtype), {}
    sub = os.path.join(path, "controlnet")
    folder = sub if os.path.isdir(sub) else path
    info = {}
    for place in (path, os.path.dirname(os.path.abspath(folder))):
        if os.path.isfile(os.path.join(place, "cse.json")):
            info = read_config(place, "cse.json")
            break
    trained = (info.get("op", op), info.get("size", size))
    if trained != (op, size):
        raise ValueError(f"--cse {path} was trained for --op {trained[0]} at --size {trained[1]}"
                         f"; this run is --op {op} at --size {size}: pass a CSE trained for it "
                         f"(python cse.py train --op {op} --size {size} ...)")
    return load_controlnet(folder, device, dtype), info


# ---------------------------------------------------------------------------------------------
# (5) Training (Sec. 4.2, Appendix B.2; the authors' train_controlnet.py, docs/official_code.md
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
    z_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
    target = eps if sd.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * z
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


def resume(path: str, info: dict, net: nn.Module, optimizer, device) -> dict:
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


def validation_panel(sd: dmap.Pipeline, controlnet, context, op, paths, size, steps, seed,
                     autocast) -> Image.Image:
    """Held-out images as rows after `steps` sampling steps: for a CSE the hint, the CSE alone
    (DDPM), DPS+CSE (the paper's zeta) and the reference; for a prior (controlnet None) an
    unconditional sample and the image."""
    sigmas = dmap.sd_sigmas(steps, sd.abar)
    zeta = dmap.ZETA["dps"][0 if isinstance(op, operators.SR) else 1]
    device, rows = context.device, []
    for r, path in enumerate(paths):
        x = dmap.read_image(path, size).to(device)
        if controlnet is None:  # a prior: an unconditional sample
            y, row, runs = None, [], [("ddpm", {})]
            denoiser = dmap.SDDenoiser(sd.unet, context, sd.abar, sd.prediction)
        else:
            y = op(x)
            denoiser = CSEDenoiser(sd.unet, controlnet, context, sd.abar, op.hint(y),
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


# The widths of the diffusers hint embedding (ControlNetModel's default); a pixel-space model
# takes as many levels as halve its side to the latent's: the first one alone
HINT_WIDTHS = (16, 32, 96, 256)


def train(args) -> str:
    """`python cse.py train`: the ControlNet from the SD 2.0 UNet (or --resume), trained on
    --n images of --images for --steps steps of --batch samples; with --train unet the UNet of a
    pixel-space model itself (a prior). Returns the last checkpoint."""
    rank, world, device = distributed(torch.device(args.device))
    B, m = args.batch, args.micro_batch
    checks = [(B >= 1 and m >= 1, f"--batch and --micro-batch must be >= 1, got {B}, {m}"),
              (B % world == 0, f"--batch {B} must be a multiple of the {world} processes"),
              (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
              (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
              (args.size >= 8 and args.size % 8 == 0, f"--size must be a multiple of 8, got "
               f"{args.size}"),
              (args.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
              (args.n is None or args.n >= 1, f"--n must be >= 1, got {args.n}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    found, last = checkpoints(args.out), last_checkpoint(args.out)
    if found and not args.resume:
        raise ValueError(f"{found[-1]} exists; pass --resume to continue it, or another --out")
    if found and found[-1] != last:  # (--resume into an empty or missing --out starts afresh)
        raise ValueError(
            f"--resume: {found[-1]} has no state.pt (the optimizer state); move the checkpoints "
            f"after {os.path.basename(last)} out of {args.out} to resume from {last}" if last else
            f"--resume: {args.out} holds {', '.join(map(os.path.basename, found))}, but none "
            "keeps its state.pt (the optimizer state, which only the two newest keep): put it "
            "back, or start a new run with another --out")
    prior = args.train == "unet"
    if prior and not dmap.is_pixel_model(args.model):
        raise ValueError(f"--train unet trains a pixel-space model (unet/ with 3 input channels "
                         f"and scheduler/, no vae/; mini.py makes one); {args.model} is not one")
    images, held = choose_images(args.images, args.n, args.data_seed)
    small = sum(min_side(path) < args.size for path in images)
    if small and rank == 0:
        print(f"note: {small} of {len(images)} images are smaller than {args.size} px; the "
              "random crop upscales them (blurrier training targets)", file=sys.stderr)
    op, op_args = (None, None) if prior else dmap.build_operator(args)
    if op is not None:
        op = op.to(device)
    # a trained UNet keeps float32 master weights; --bf16 then only autocasts
    sd = dmap.load_sd2(args.model, args.prediction, device,
                       torch.bfloat16 if args.bf16 and not prior else torch.float32)
    context = dmap.encode_prompt(sd, "").float()  # computed once; the text encoder is freed
    sd = sd._replace(text_encoder=None)
    for frozen in (sd.vae, None if prior else sd.unet):
        if frozen is not None:
            frozen.requires_grad_(False)
    sd.unet.gradient_checkpointing = args.grad_checkpoint
    if prior:
        net = sd.unet.requires_grad_(True)  # loaded frozen, as every network is
    else:
        halvings = round(math.log2(args.size // sd.latent(args.size)[-1]))
        with torch.random.fork_rng(devices=[]):  # the hint embedding's default init, seeded
            torch.manual_seed(args.seed)
            net = from_unet(sd.unet, conditioning_embedding_out_channels=HINT_WIDTHS[
                :halvings + 1]).float()  # fp32 master weights (diffusers: the same)
        net.gradient_checkpointing = args.grad_checkpoint
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)  # train_controlnet.py defaults
    info = dict(train=args.train, op=None if prior else args.op,
                operator=None if prior else {k: v for k, v in op_args.items() if k != "seed"},
                size=args.size, images=os.path.abspath(args.images), n=len(images),
                data_seed=args.data_seed, seed=args.seed, batch=B, lr=args.lr,
                lr_schedule=args.lr_schedule, steps=args.steps,
                prediction=sd.prediction, model=os.path.abspath(args.model),
                train_images=[os.path.relpath(p, args.images) for p in images])
    done = resume(last, info, net, optimizer, device) if args.resume and last else {}
    start, losses = done.get("step", 0), done.get("losses", [])[:done.get("step", 0)]
    model = net if world == 1 else torch.nn.parallel.DistributedDataParallel(net)

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)

    val = validation_images(held, images, args.size) if rank == 0 else []
    bar = tqdm(total=args.steps, initial=start, desc="prior" if prior else f"CSE {args.op}",
               unit="step", disable=rank != 0)
    step = start
    try:
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            ks = range(step * B + rank * B // world, step * B + (rank + 1) * B // world)
            chunks = [ks[i:i + m] for i in range(0, len(ks), m)]
            total = torch.zeros((), device=device)
            for c, chunk in enumerate(chunks):
                # DDP averages the gradients over processes: each scales its sum by world / B
                sync = model.no_sync() if world > 1 and c < len(chunks) - 1 else \
                    contextlib.nullcontext()
                with sync:
                    batch = batch_losses(model, sd, context, images, op, op_args, chunk,
                                         args.size, args.seed, autocast)
                    (batch.sum() * world / B).backward()
                total += batch.detach().sum()
            if world > 1:
                torch.distributed.all_reduce(total)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # max_grad_norm 1.0
            for group in optimizer.param_groups:  # constant: the authors'; cosine: to 0
                group["lr"] = args.lr if args.lr_schedule == "constant" else \
                    args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
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
            if rank == 0 and (finished % args.checkpoint_every == 0 or finished == args.steps):
                try:
                    last = save_checkpoint(args.out, finished, net, optimizer,
                                           dict(info, loss=loss, losses=losses))
                except (OSError, RuntimeError, safetensors.SafetensorError) as e:
                    why = e.strerror if isinstance(e, OSError) and e.strerror else \
                        str(e).strip().partition("\n")[0] or type(e).__name__
                    raise ValueError(
                        f"cannot write checkpoint-{finished} under {args.out} ({why}); " + (
                            f"{last} is intact: free space and continue with --resume" if last
                            else "no earlier checkpoint: free space and run again")) from None
            if rank == 0 and args.validate_every and finished % args.validate_every == 0 \
                    and val:
                panel = validation_panel(sd, None if prior else net, context, op, val,
                                         args.size, args.validation_steps, args.seed, autocast)
                cli.write_atomic(os.path.join(args.out, f"validation-{finished}.png"),
                                  panel.save)
            if world > 1:
                torch.distributed.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"at step {step + 1} of {args.steps}; " + (
            f"{last} is whole: continue with --resume" if last else "no checkpoint yet")) \
            from None
    finally:
        bar.close()
    return last


# ---------------------------------------------------------------------------------------------
# (6) The self-generated data set (the paper's "gen" CSE: unconditional SD 2.0 samples; the
# authors' data_gen.py: Euler ancestral, empty prompt, 50 steps)
# ---------------------------------------------------------------------------------------------


def generate(args) -> int:
    """`python cse.py generate`: --n unconditional samples out/000000.png, ...; image i from
    seed + i, so a stopped run continues with the images it lacks (each written atomically)
    and processes under torchrun share the work. Returns how many it wrote."""
    rank, world, device = distributed(torch.device(args.device))
    if args.n is None or args.n < 1 or args.steps < 1:
        raise ValueError(f"--n and --steps must be >= 1, got {args.n}, {args.steps}")
    todo = [i for i in range(rank, args.n, world)
            if not os.path.exists(os.path.join(args.out, f"{i:06d}.png"))]
    if not todo:
        return 0
    dtype = getattr(torch, args.dtype)
    sd = dmap.load_sd2(args.model, args.prediction, device, dtype)
    denoiser = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar, sd.prediction)
    sigmas = dmap.sd_sigmas(args.steps, sd.abar)
    latent = (1, sd.unet.cfg.in_channels, args.size // 8, args.size // 8)
    os.makedirs(args.out, exist_ok=True)
    written = 0
    try:
        for i in tqdm(todo, desc="generate", unit="image", disable=rank != 0):
            g = torch.Generator(device).manual_seed(args.seed + i)
            noise = dmap.noise_like(torch.empty(latent, device=device), g)  # float32 latents
            z0 = dmap.ddpm(denoiser, sigmas[0].item() * noise, None, None, sigmas, generator=g)
            with torch.no_grad():
                image = Image.fromarray(dmap.to_uint8(sd.decode(z0)))
            cli.write_atomic(os.path.join(args.out, f"{i:06d}.png"), image.save)
            written += 1
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"after {written} new image(s) in {args.out}; the same command "
                                "writes the rest") from None
    return written


# ---------------------------------------------------------------------------------------------
# (7) The command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a CSE on a folder of images")
    gen = commands.add_parser("generate", help="the self-generated training set (SD 2.0 "
                              "samples)")
    for q in (t, gen):
        q.add_argument("--model", default=os.environ.get("SD2_MODEL",
                                                         "./weights/stable-diffusion-2-base"),
                       help="SD 2.0 pipeline folder or single .safetensors file (default: "
                       "$SD2_MODEL or %(default)s)")
        q.add_argument("--prediction", choices=["eps", "v"],
                       help="eps (512-base) or v (768-v), for a single-file checkpoint (default: "
                       "the folder's scheduler config, eps for a single file)")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--size", type=int, default=512,
                       help="image size in pixels (default: %(default)s)")
        q.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: %(default)s; under torchrun: cuda:LOCAL_RANK)")
    t.add_argument("--train", default="controlnet", choices=list(INFO),
                   help="what learns: a CSE (a ControlNet on the frozen UNet), or the UNet of a "
                   "pixel-space model itself (a prior, as mini.py trains; --op unused) "
                   "(default: %(default)s)")
    t.add_argument("--op", default="sr", choices=list(operators.OPERATORS),
                   help="the degradation the CSE learns (default: %(default)s)")
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
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="model dtype (default: %(default)s; the authors: float16)")
    args = p.parse_args(argv)
    if args.command == "train":  # dmap.build_operator's flags
        try:
            dmap.check_operator_flags(args)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def body():
        try:
            done = f"trained to {train(args)}" if args.command == "train" else \
                f"wrote {generate(args)} new image(s) to {args.out}"
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return f"{done} in {time.perf_counter() - start:.0f} s"

    return cli.run(body, interrupted="while starting; nothing written")


if __name__ == "__main__":
    sys.exit(main())
