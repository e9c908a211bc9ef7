"""The ControlNet of the conditional score estimator (CSE; Xu et al., ICLR 2025, Sec. 4.2).

A ControlNet (Zhang et al., ICCV 2023, arXiv 2302.05543) is a trainable copy of the UNet's
encoder half whose input is the noisy latent plus a hint image, here the degraded image y at
full resolution; its 13 residuals are added to the frozen UNet (docs/official_code.md §4.7,
§7). This module is the network and its loaders only: dmap.py restores with it
(dmap.CSEDenoiser), cse.py trains it.

Reading order: (1) the config; (2) the ControlNet: the hint embedding, the copied UNet encoder,
the zero convs, and `from_unet`; (3) loading a diffusers folder (the authors' checkpoints) and
the original lllyasviel single-file layout; (4) the UNet with the residuals, and a trained CSE
with what it was trained for. Parameter names are diffusers' ControlNetModel's own
(`diffusers/models/controlnets/controlnet.py`), so a diffusers folder loads without renaming.
"""

import functools
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import load_state, read_config
from unet import (
    TINY,
    UNet,
    UNetConfig,
    UNetEncoder,
    layout,
    ldm_unet_key,
    load_unet,
    single_file_config,
)

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
            raise ValueError(f"{path}: {what}; only Stable Diffusion 1.x / 2.x ControlNets "
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
    """diffusers ControlNetModel for Stable Diffusion 1.x / 2.x (original cldm.py ControlNet).

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

    unet.load_unet's loader with the ControlNet's config and network.
    """
    return load_unet(folder, device, dtype, config=ControlNetConfig, network=ControlNet)


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


def controlnet_from_single_file(path: str, config: ControlNetConfig | None = None,
                                device=None, dtype=None) -> ControlNet:
    """The ControlNet of an original single-file checkpoint (a ControlLDM file, `control_model.`
    keys, or a standalone one; fp32/fp16/bf16). config None: the encoder of SD 1.x or 2.x, read
    from the file (unet.single_file_config), and the default hint embedding. dtype None keeps
    the file's dtype."""
    if config is None:
        config = ControlNetConfig(**vars(single_file_config(path, ("control_model.", ""))))
    with torch.device("meta"):
        model = ControlNet(config)
    rename = functools.partial(original_controlnet_key, config=config)
    return load_state(model, path, rename, device, dtype)


# ---------------------------------------------------------------------------------------------
# (4) The UNet with a ControlNet's residuals for a fixed hint (dmap.CSEDenoiser wraps it), and
#     a trained CSE with what it was trained for
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
