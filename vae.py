"""The Stable Diffusion 2.0 autoencoder (AutoencoderKL, f = 8), built by loops from a config.

Reading order: (1) the config and the latent scale; (2) the blocks; (3) the encoder, the decoder
and the VAE; (4) loading a diffusers folder and the LDM single-file layout.
This is LDM's `ldm/modules/diffusionmodules/model.py` Encoder/Decoder as diffusers writes it
(`diffusers/models/autoencoders/vae.py`, `autoencoder_kl.py`); parameter names are diffusers'
own, so a diffusers folder loads without renaming.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from checkpoint import find_weights, load_state, read_config

# ---------------------------------------------------------------------------------------------
# (1) Config
# ---------------------------------------------------------------------------------------------

# The SD latent scale: the UNet sees SCALING_FACTOR * z. Applied by the caller (dmap.py), never here
# (diffusers pipeline_stable_diffusion.py: `vae.decode(latents / vae.config.scaling_factor)`).
SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 3  # image channels in and out (RGB)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, top level first
    layers_per_block: int = 2  # resnets per encoder level; decoder levels have one more
    latent_channels: int = 4  # channels of z; the encoder outputs twice that (mean, logvar)
    norm_num_groups: int = 32  # GroupNorm groups everywhere (eps 1e-6, hard-coded as upstream)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """Read a diffusers AutoencoderKL config.json; refuse anything this file does not build."""
        blocks = cfg.get("block_out_channels", [64])
        n = len(blocks)
        expected = {  # key: (value we build, diffusers default when absent)
            "_class_name": ("AutoencoderKL", "AutoencoderKL"),
            "down_block_types": (["DownEncoderBlock2D"] * n, ["DownEncoderBlock2D"]),
            "up_block_types": (["UpDecoderBlock2D"] * n, ["UpDecoderBlock2D"]),
            "act_fn": ("silu", "silu"),
            "out_channels": (cfg.get("in_channels", 3), 3),
            "scaling_factor": (SCALING_FACTOR, SCALING_FACTOR),
            "shift_factor": (None, None),
            "latents_mean": (None, None),
            "latents_std": (None, None),
            "use_quant_conv": (True, True),
            "use_post_quant_conv": (True, True),
            "mid_block_add_attention": (True, True),
        }
        for key, (want, default) in expected.items():
            value = cfg.get(key, default)
            if (list(value) if isinstance(value, (list, tuple)) else value) != want:
                raise ValueError(f"VAE config {key}={value!r} is not supported (this is the SD 2.0 "
                                 f"AutoencoderKL, which has {want!r}); use the SD 2.0 vae folder")
        return cls(
            channels=cfg.get("in_channels", 3),
            block_out_channels=tuple(blocks),
            layers_per_block=cfg.get("layers_per_block", 1),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
        )


SD2_VAE = VAEConfig()  # stabilityai/stable-diffusion-2(-base) vae/config.json
TINY = VAEConfig(block_out_channels=(16, 32, 64, 64), norm_num_groups=8)  # SD2 structure, for tests

# ---------------------------------------------------------------------------------------------
# (2) Blocks
# ---------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without the time embedding (LDM `ResnetBlock`, temb_channels=0)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # LDM `nin_shortcut`: a 1x1 conv where the width changes
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout 0
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels with a residual (LDM `AttnBlock`; diffusers
    `Attention(_from_deprecated_attn_block=True)` with heads = 1, scale C^-0.5)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out.1 is a dropout

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # C^-0.5
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """LDM `Downsample`: asymmetric pad (0, 1, 0, 1), then a 3x3 stride-2 conv without padding."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """LDM `Upsample`: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D (LDM `mid`): resnet, attention, resnet at the lowest resolution."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)])

    def layers(self) -> list[nn.Module]:
        return [self.resnets[0], self.attentions[0], self.resnets[1]]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


class DownBlock(nn.Module):
    """diffusers DownEncoderBlock2D (LDM `down[i]`): resnets, then a downsampler except last."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(cout)] if down else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """diffusers UpDecoderBlock2D (LDM `up[levels-1-i]`): resnets, then an upsampler except last."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(cout)] if up else [])

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.upsamplers]


# ---------------------------------------------------------------------------------------------
# (3) Encoder, decoder, VAE
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2 * latent, H/8, W/8) (diffusers `Encoder`)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < n - 1)
            for i in range(n))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, 8h, 8w) (diffusers `Decoder`); levels bottom-up."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < n - 1)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.channels, 3, padding=1)

        # Memory of a guided step (DPS, DMAP): with gradient_checkpointing on, only each layer's
        # input is kept for the backward pass and the layer is recomputed there. At 512 px a
        # top-level resnet stores ~7 maps of 128 MB, the largest share of a DPS step's memory.
        self.gradient_checkpointing = False

    def head(self, x):
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, z):
        x = self.conv_in(z)
        for layer in [*self.mid_block.layers(), *(l for b in self.up_blocks for l in b.layers()),
                      self.head]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VAE(nn.Module):
    """The KL autoencoder of latent diffusion (Rombach et al., CVPR 2022, arXiv:2112.10752)."""

    def __init__(self, cfg: VAEConfig = SD2_VAE):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image x in [-1, 1] (B, 3, H, W) -> mean, logvar of q(z | x), each (B, 4, H/8, W/8).

        z is unscaled; a sample is mean + exp(logvar / 2) * noise (DiagonalGaussianDistribution).
        """
        x = x.contiguous(memory_format=torch.channels_last)  # see decode
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        # logvar clamped as DiagonalGaussianDistribution; both returned in the plain layout
        return mean.contiguous(), logvar.clamp(-30.0, 20.0).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent z (B, 4, h, w) (caller divides by SCALING_FACTOR) -> image, ~[-1, 1].

        The convolutions run on channels-last maps (oneDNN's native layout on CPU, cuDNN's for
        bf16 on GPU; 10-25% faster on CPU, benchmarks in README); the image comes back plain."""
        z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z)).contiguous()


# ---------------------------------------------------------------------------------------------
# (4) Loading: diffusers folder, LDM single file
# ---------------------------------------------------------------------------------------------

# diffusers <= 0.8 files (still on the Hub) name the attention projections differently; diffusers
# renames them at load time (ModelMixin._fix_state_dict_keys_on_load, modeling_utils.py).
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_vae_key(key: str) -> str:
    """Our name for a tensor of a diffusers VAE file: the same, or the legacy attention name."""
    module, _, param = key.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if ".attentions." in key and leaf in LEGACY_ATTENTION:
        return f"{parent}.{LEGACY_ATTENTION[leaf]}.{param}"
    return key


def load_vae(folder: str, device=None, dtype=None) -> VAE:
    """The VAE of a diffusers folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
    cfg = VAEConfig.from_diffusers(read_config(folder))
    path = find_weights(folder, "diffusion_pytorch_model")
    with torch.device("meta"):
        model = VAE(cfg)
    return load_state(model, path, diffusers_vae_key, device, dtype).to(
        memory_format=torch.channels_last)  # weights in the layout decode uses


# LDM module names -> diffusers, whole dotted names with level/resnet numbers as {}, applied in
# order (docs/sd2_formats.md §2.4; diffusers single_file_utils.convert_ldm_vae_checkpoint).
LDM_VAE_NAMES = [
    (".down.{}.block.{}.", ".down_blocks.{}.resnets.{}."),
    (".down.{}.downsample.", ".down_blocks.{}.downsamplers.0."),
    (".up.{}.block.{}.", ".up_blocks.{}.resnets.{}."),  # LDM up.{levels-1-i} = our up_blocks.{i}
    (".up.{}.upsample.", ".up_blocks.{}.upsamplers.0."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.", ".mid_block.attentions.0."),
    (".attentions.0.norm.", ".attentions.0.group_norm."),
    (".attentions.0.q.", ".attentions.0.to_q."),  # 1x1 convs in LDM; load_state reshapes
    (".attentions.0.k.", ".attentions.0.to_k."),
    (".attentions.0.v.", ".attentions.0.to_v."),
    (".attentions.0.proj_out.", ".attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
    (".norm_out.", ".conv_norm_out."),
]


def ldm_vae_key(key: str, levels: int = 4) -> str | None:
    """Our name for a tensor of an LDM single-file checkpoint; None for the other parts (UNet,
    text encoder, EMA copies, schedule buffers). `levels` = len(block_out_channels)."""
    if not key.startswith("first_stage_model."):
        return None
    name = "." + key.removeprefix("first_stage_model.")
    numbers = [int(s) for s in re.findall(r"\.(\d+)(?=\.)", name)]
    name = re.sub(r"\.\d+(?=\.)", ".{}", name)
    for ldm, ours in LDM_VAE_NAMES:
        name = name.replace(ldm, ours)
    if name.startswith(".decoder.up_blocks."):
        numbers[0] = levels - 1 - numbers[0]  # LDM numbers decoder levels from the top resolution
    return name[1:].format(*numbers)


def vae_from_single_file(path: str, config: VAEConfig = SD2_VAE, device=None, dtype=None) -> VAE:
    """The VAE of an LDM single-file checkpoint (`512-base-ema.safetensors` layout)."""
    with torch.device("meta"):
        model = VAE(config)
    levels = len(config.block_out_channels)
    return load_state(model, path, lambda key: ldm_vae_key(key, levels), device, dtype).to(
        memory_format=torch.channels_last)  # weights in the layout decode uses
