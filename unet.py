"""The Stable Diffusion 1.x / 2.x UNet (epsilon / v prediction), built by loops from a config.

Reading order: (1) the config; (2) the blocks; (3) the UNet; (4) loading the diffusers folder
and the LDM single-file layouts (checkpoint.py reads the files).
Parameter names are diffusers' own, so a diffusers folder loads without renaming.
"""

import functools
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from checkpoint import find_weights, load_state, open_checkpoint, read_config

# ---------------------------------------------------------------------------------------------
# (1) The config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # eps (or v) channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
    layers_per_block: int = 2  # resnets per down level; an up level has one more
    # Attention heads per level: diffusers' misnamed `attention_head_dim` list is this HEAD COUNT
    # (unet_2d_condition.py: num_attention_heads = attention_head_dim); head dim = width / heads,
    # 64 everywhere in SD 2; SD 1.x has 8 heads at every level (head dims 40, 80, 160, 160).
    # The mid block uses the last entry, the up levels the reversed list.
    num_heads: tuple[int, ...] = (5, 10, 20, 20)
    # Down levels with a transformer after each resnet (CrossAttnDownBlock2D); the up levels
    # mirror it and the mid block always has one.
    attention: tuple[bool, ...] = (True, True, True, False)
    cross_attention_dim: int = 1024  # width of the text context (OpenCLIP ViT-H/14)
    norm_num_groups: int = 32  # GroupNorm groups, resnets and transformers alike
    norm_eps: float = 1e-5  # resnet and output GroupNorm eps (transformer GN 1e-6, LN 1e-5: fixed)
    # diffusers' use_linear_projection: the transformers' proj_in/proj_out are Linear layers on
    # the tokens (SD 2.x, true) or 1x1 convs on the map (SD 1.x, false: diffusers' default)
    linear_projection: bool = True

    @classmethod
    def from_diffusers(cls, cfg: dict, path: str = "unet config.json") -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel config.json (`path`, named in errors); reject
        what this UNet cannot build."""
        def fail(what):
            raise ValueError(f"{path}: {what}; only Stable Diffusion 1.x / 2.x UNets "
                             "(UNet2DConditionModel) are supported")

        # A ControlNetModel config describes the same encoder half (a ControlNet copies it).
        if cfg.get("_class_name") not in (None, "UNet2DConditionModel", "ControlNetModel"):
            fail(f"_class_name {cfg['_class_name']!r} is not UNet2DConditionModel")
        # Missing keys take diffusers' defaults (unet_2d_condition.py, UNet2DConditionModel).
        down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        n = len(down)
        if any(b not in ("CrossAttnDownBlock2D", "DownBlock2D") for b in down):
            fail(f"down_block_types {down}")
        up = cfg.get("up_block_types")  # absent from ControlNet configs
        if up is not None and list(up) != [b.replace("Down", "Up") for b in reversed(down)]:
            fail(f"up_block_types {up} do not mirror down_block_types {down}")
        if not isinstance(cfg.get("layers_per_block", 2), int):
            fail("layers_per_block is a list")
        for key, want in _DIFFUSERS_FIXED.items():
            got = cfg.get(key, want)
            if got != want and got != [want] * n:
                fail(f"{key}={got!r} (only {want!r})")
        heads = cfg.get("attention_head_dim", 8)  # a head COUNT, see num_heads above
        heads = [heads] * n if isinstance(heads, int) else list(heads)
        if not isinstance(cfg.get("cross_attention_dim", 1280), int):
            fail("cross_attention_dim is a list")
        config = cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
            layers_per_block=cfg.get("layers_per_block", 2),
            num_heads=tuple(heads),
            attention=tuple(b == "CrossAttnDownBlock2D" for b in down),
            cross_attention_dim=cfg.get("cross_attention_dim", 1280),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            linear_projection=bool(cfg.get("use_linear_projection", False)),
        )
        chans = config.block_out_channels
        if len(chans) != n or len(heads) != n:
            fail(f"{len(chans)} block_out_channels, {len(heads)} attention_head_dim entries "
                 f"and {n} down_block_types")
        if any(c % h or c % config.norm_num_groups for c, h in zip(chans, heads, strict=True)):
            fail(f"block_out_channels {list(chans)} not divisible by attention_head_dim "
                 f"{heads} or norm_num_groups {config.norm_num_groups}")
        return config

    def to_diffusers(self) -> dict:
        """The config.json that diffusers' UNet2DConditionModel (and from_diffusers) reads back;
        the keys left out take the defaults from_diffusers accepts."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention]
        return {"_class_name": "UNet2DConditionModel", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "down_block_types": down,
                "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
                "block_out_channels": list(self.block_out_channels),
                "layers_per_block": self.layers_per_block,
                "attention_head_dim": list(self.num_heads),  # head counts, see num_heads
                "cross_attention_dim": self.cross_attention_dim,
                "use_linear_projection": self.linear_projection,
                "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps}


# diffusers UNet2DConditionModel options this UNet does not build: the one value accepted (their
# default). `upcast_attention` is accepted and ignored, as diffusers' SDPA processor ignores it.
_DIFFUSERS_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1,
    "downsample_padding": 1, "dropout": 0.0, "only_cross_attention": False,
    "dual_cross_attention": False, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
    "attention_type": "default", "cross_attention_norm": None,
    "mid_block_only_cross_attention": None, "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

SD2_UNET = UNetConfig()  # stable-diffusion-2-base and -2 (768-v): the same network
# stable-diffusion-v1-5 unet/config.json: attention_head_dim 8 (8 heads everywhere), cross-attention
# width 768 (CLIP ViT-L/14), use_linear_projection absent = false (docs/sd2_formats.md §8)
SD15_UNET = UNetConfig(num_heads=(8, 8, 8, 8), cross_attention_dim=768, linear_projection=False)
# Tiny SD2-shaped UNet for tests: same block types, 12 skips, head dim 16.
TINY = UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(2, 4, 4, 4),
                  cross_attention_dim=48, norm_num_groups=8)


# ---------------------------------------------------------------------------------------------
# (2) The blocks
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) as [cos, sin]; fractional t allowed.

    diffusers embeddings.py get_timestep_embedding with flip_sin_to_cos=True, shift 0 (= LDM
    util.py timestep_embedding); computed in float32 with diffusers' operation order.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t.float()[:, None] * torch.exp(exponent / half)[None]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2 (LDM time_embed.0 / .2)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb):
        return self.linear_2(F.silu(self.linear_1(emb)))


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(cin, cout, 3, stride, padding=1), computed on the CPU as im2col + one matrix
    product where the weights outweigh the map: a million weights or more, and >= 50,000 per
    output position in float32 (80,000 in 16 bits), i.e. SD's 1280-channel convolutions at
    16x16 and 8x8. oneDNN's direct convolution runs at a third to a half of this processor's
    rate there, the matrix product at full rate: forward and backward 0.45-0.89x the time, each
    shape measured on a 2-core AMD EPYC (README, Speed); elsewhere oneDNN wins and is kept.
    Same parameters; the outputs differ at rounding level (summation order, ~1e-6 relative)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x):
        B, _, H, W = x.shape
        s = self.stride[0]
        size = ((H - 1) // s + 1, (W - 1) // s + 1)  # output map (kernel 3, padding 1)
        per_position = 50_000 if x.dtype == torch.float32 else 80_000
        weights = max(1_000_000, per_position * B * math.prod(size))
        if x.device.type != "cpu" or self.weight.numel() < weights:
            return super().forward(x)
        cols = F.unfold(x, 3, padding=1, stride=s)  # (B, 9 C_in, H_out W_out), (c, i, j) order
        # bmm, not `@`: matmul would fold a weight that requires a gradient into one transposed
        # product with copies, 1.5x the time (measured)
        out = torch.bmm(self.weight.flatten(1).expand(B, -1, -1), cols)  # (B, C_out, H_out W_out)
        return (out + self.bias[:, None]).unflatten(-1, size)


class ResBlock(nn.Module):
    """diffusers ResnetBlock2D (LDM ResBlock): GN-SiLU-conv, + time, GN-SiLU-conv, + shortcut."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = Conv3x3(cin, cout)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = Conv3x3(cout, cout)  # dropout 0 before it
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """diffusers Attention (AttnProcessor2_0): multi-head attention, scale head_dim^-0.5."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.1 is a dropout(0)

    def forward(self, x, context):
        B, N, C = x.shape
        # (B, N, C) -> (B, heads, N, C / heads), and the same for the M context tokens
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.to_out[0](h.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """diffusers GEGLU: proj to 2x width, value * GELU(gate), exact (erf) GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers FeedForward: net.0 GEGLU (4x), net.1 dropout(0), net.2 Linear back."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock: pre-LN self-attention, cross-attention, feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers Transformer2DModel (LDM SpatialTransformer). proj_in/proj_out: Linear layers on
    the tokens (use_linear_projection, SD 2.x) or 1x1 convs on the map before / after the
    tokens (SD 1.x), as transformer_2d.py _operate_on_continuous_inputs orders them."""

    def __init__(self, dim: int, context_dim: int, heads: int, groups: int, linear: bool = True):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, context_dim, heads)])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        if self.linear:
            h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
            h = self.proj_in(h)
        else:
            h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))
        return x + h


class Downsample(nn.Module):
    """diffusers Downsample2D (LDM Downsample.op): 3x3 conv, stride 2, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels, stride=2)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """diffusers Upsample2D (LDM Upsample): nearest to `size` (2x, or the skip's size) + conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _transformer(cfg: UNetConfig, dim: int, heads: int) -> SpatialTransformer:
    return SpatialTransformer(dim, cfg.cross_attention_dim, heads, cfg.norm_num_groups,
                              cfg.linear_projection)


class DownBlock(nn.Module):
    """diffusers CrossAttnDownBlock2D (with attention) / DownBlock2D (without), level i."""

    def __init__(self, cfg: UNetConfig, i: int):
        super().__init__()
        chans, temb = cfg.block_out_channels, 4 * cfg.block_out_channels[0]
        cin, cout = chans[max(i - 1, 0)], chans[i]
        self.resnets = nn.ModuleList(
            ResBlock(cin if j == 0 else cout, cout, temb, cfg.norm_num_groups, cfg.norm_eps)
            for j in range(cfg.layers_per_block))
        self.attentions = nn.ModuleList(
            _transformer(cfg, cout, cfg.num_heads[i])
            for _ in range(cfg.layers_per_block if cfg.attention[i] else 0))
        last = i == len(chans) - 1
        self.downsamplers = nn.ModuleList([] if last else [Downsample(cout)])

    def forward(self, h, temb, context):
        """Returns h and the skips it leaves: one per resnet, one after the downsampler."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[j](h, context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn (LDM middle_block): resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, temb = cfg.block_out_channels[-1], 4 * cfg.block_out_channels[0]
        self.resnets = nn.ModuleList(
            ResBlock(c, c, temb, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList([_transformer(cfg, c, cfg.num_heads[-1])])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class UpBlock(nn.Module):
    """diffusers CrossAttnUpBlock2D (with attention) / UpBlock2D (without), up level i.

    Each of its layers_per_block + 1 resnets takes the concatenation [h, skip] (channel dim).
    """

    def __init__(self, cfg: UNetConfig, i: int):
        super().__init__()
        chans, temb = cfg.block_out_channels[::-1], 4 * cfg.block_out_channels[0]
        n, last = len(chans), i == len(chans) - 1
        cprev, cout, cskip_in = chans[max(i - 1, 0)], chans[i], chans[min(i + 1, n - 1)]
        L = cfg.layers_per_block
        # resnet j: input h (cprev for j = 0, else cout) + skip (the last one is the level's
        # input: cskip_in channels), diffusers unet_2d_blocks.py CrossAttnUpBlock2D
        self.resnets = nn.ModuleList(
            ResBlock((cprev if j == 0 else cout) + (cskip_in if j == L else cout), cout, temb,
                     cfg.norm_num_groups, cfg.norm_eps)
            for j in range(L + 1))
        self.attentions = nn.ModuleList(
            _transformer(cfg, cout, cfg.num_heads[::-1][i])
            for _ in range(L + 1 if cfg.attention[::-1][i] else 0))
        self.upsamplers = nn.ModuleList([] if last else [Upsample(cout)])

    def forward(self, h, skips, temb, context, size=None):
        """skips: this level's skips in down-path order (used last first); size: (H, W) to
        upsample to, the size of the next level's skips (diffusers' upsample_size)."""
        for j, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips), strict=True)):
            h = resnet(torch.cat([h, skip], dim=1), temb)  # (B, C_h + C_skip, H, W)
            if self.attentions:
                h = self.attentions[j](h, context)
        for up in self.upsamplers:
            h = up(h, size)
        return h


# ---------------------------------------------------------------------------------------------
# (3) The UNet
# ---------------------------------------------------------------------------------------------


class UNetEncoder(nn.Module):
    """conv_in, time embedding, down blocks and mid block: the half a ControlNet copies
    (diffusers ControlNetModel.from_unet copies exactly these modules, under these names)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.block_out_channels[0]
        assert c0 % 2 == 0, "the sinusoidal embedding needs an even width"
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)  # LDM input_blocks.0.0
        self.time_embedding = TimestepEmbedding(c0, 4 * c0)
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i) for i in range(len(cfg.block_out_channels)))
        self.mid_block = MidBlock(cfg)
        # Training memory (diffusers' switch of the same name): each block's activations are
        # recomputed in the backward pass instead of stored.
        self.gradient_checkpointing = False

    def run(self, block: nn.Module, *args):
        """block(*args), under torch.utils.checkpoint when gradient_checkpointing is on and
        gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_time(self, t, x: torch.Tensor) -> torch.Tensor:
        """Timestep t (scalar or (B,), int or fractional) -> embedding (B, 4 C0) in x's dtype."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = timestep_embedding(t, self.cfg.block_out_channels[0]).to(x.dtype)
        return self.time_embedding(emb)

    def encode(self, h, temb, context):
        """Down path from the conv_in output h: returns h and the skips (conv_in output first,
        1 + len(levels) * layers_per_block + len(levels) - 1 of them: 12 for SD 2)."""
        skips = [h]
        for block in self.down_blocks:
            h, level_skips = self.run(block, h, temb, context)
            skips += level_skips
        return h, skips


class UNet(UNetEncoder):
    """diffusers UNet2DConditionModel for Stable Diffusion 1.x / 2.x (LDM openaimodel.UNetModel)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        self.up_blocks = nn.ModuleList(UpBlock(cfg, i) for i in range(len(cfg.block_out_channels)))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, cfg.block_out_channels[0],
                                          eps=cfg.norm_eps)  # LDM out.0
        self.conv_out = nn.Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, t, context, residuals=None):
        """x (B, 4, h, w) latents, t timesteps, context (B, 77, 1024 (SD 1.x: 768)) -> eps (or v),
        x's shape.

        residuals: None or (down, mid), ControlNet residuals added as diffusers adds
        down_block_additional_residuals (to every skip, before the mid block) and
        mid_block_additional_residual (to the mid block output).
        """
        temb = self.embed_time(t, x)
        h, skips = self.encode(self.conv_in(x), temb, context)
        if residuals is not None:
            down, mid = residuals
            assert len(down) == len(skips), f"{len(down)} down residuals for {len(skips)} skips"
            skips = [s + r for s, r in zip(skips, down, strict=True)]
        h = self.run(self.mid_block, h, temb, context)
        if residuals is not None:
            h = h + mid
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            h = self.run(block, h, level_skips, temb, context,
                         skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ---------------------------------------------------------------------------------------------
# (4) Loading: a diffusers folder, or an LDM single-file checkpoint
# ---------------------------------------------------------------------------------------------


def layout(net: UNetEncoder) -> UNetEncoder:
    """A network on pixels (3 input channels: mini.py's small widths) runs on channels-last
    maps, oneDNN's native layout: 1.3x faster for a 32-64 channel UNet at 32 px (measured on
    a 2-core AMD EPYC); SD 2.0's latent UNet does not gain from it (README, Speed), so it keeps
    the plain layout. Saved weights are made contiguous either way."""
    return net.to(memory_format=torch.channels_last) if net.cfg.in_channels == 3 else net


def load_unet(folder: str, device=None, dtype=None, *, config=UNetConfig,
              network=UNet) -> UNet:
    """The UNet of a diffusers folder (config.json + diffusion_pytorch_model[.fp16].safetensors);
    with config and network ControlNetConfig and ControlNet, a ControlNet (controlnet.py).

    Built on the meta device and filled tensor by tensor; dtype None keeps the file's dtype.
    """
    cfg = config.from_diffusers(read_config(folder), os.path.join(folder, "config.json"))
    path = find_weights(folder, "diffusion_pytorch_model")
    with torch.device("meta"):
        model = network(cfg)
    return layout(load_state(model, path, lambda key: key, device, dtype))


# LDM single-file names -> ours (docs/sd2_formats.md §2.3, diffusers single_file_utils.py
# convert_ldm_unet_checkpoint). {b}: level, {j}: layer in the level; for input_blocks.i,
# (b, j) = divmod(i - 1, L + 1), for output_blocks.i, divmod(i, L + 1), L = layers_per_block.
_LDM_UNET = [
    (r"time_embed\.0", "time_embedding.linear_1"),
    (r"time_embed\.2", "time_embedding.linear_2"),
    (r"input_blocks\.0\.0", "conv_in"),
    (r"input_blocks\.(\d+)\.0\.op", "down_blocks.{b}.downsamplers.0.conv"),
    (r"input_blocks\.(\d+)\.0", "down_blocks.{b}.resnets.{j}"),
    (r"input_blocks\.(\d+)\.1", "down_blocks.{b}.attentions.{j}"),
    (r"middle_block\.0", "mid_block.resnets.0"),
    (r"middle_block\.1", "mid_block.attentions.0"),
    (r"middle_block\.2", "mid_block.resnets.1"),
    (r"output_blocks\.(\d+)\.0", "up_blocks.{b}.resnets.{j}"),
    (r"output_blocks\.(\d+)\.[12]\.conv", "up_blocks.{b}.upsamplers.0.conv"),
    (r"output_blocks\.(\d+)\.1", "up_blocks.{b}.attentions.{j}"),
    (r"out\.0", "conv_norm_out"),
    (r"out\.2", "conv_out"),
]
# LDM ResBlock leaves -> diffusers ResnetBlock2D (update_unet_resnet_ldm_to_diffusers)
_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_unet_key(key: str, layers_per_block: int = 2) -> str | None:
    """Our name for an LDM checkpoint key `model.diffusion_model.*`; None for the other parts
    (first_stage_model., cond_stage_model., model_ema., schedule buffers); an unknown UNet key
    comes back unchanged, so that load_state reports it."""
    prefix = "model.diffusion_model."
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    for pattern, template in _LDM_UNET:
        m = re.fullmatch(pattern + r"(\..+)?\.(weight|bias)", rest)  # (prefix)(.leaf).kind
        if m is None:
            continue
        *index, leaf, kind = m.groups()
        i = int(index[0]) if index else 0
        b, j = divmod(i - 1 if "input" in pattern else i, layers_per_block + 1)
        leaf = "." + _LDM_RESNET.get(leaf[1:], leaf[1:]) if leaf else ""
        return f"{template.format(b=b, j=j)}{leaf}.{kind}"
    return key


# The key whose width tells SD 1.x from 2.x: the context width of the first cross-attention, 768
# (CLIP ViT-L/14) or 1024 (OpenCLIP ViT-H/14); diffusers' infer_diffusers_model_type reads the
# same key (single_file_utils.py CHECKPOINT_KEY_NAMES["v2"]).
CROSS_ATTENTION_KEY = "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"


def single_file_config(path: str, prefixes=("model.diffusion_model.",)) -> UNetConfig:
    """SD15_UNET or SD2_UNET: the config whose cross-attention width the single file's UNet (or
    a ControlNet's copy of its encoder, under another prefix) has."""
    names = [prefix + CROSS_ATTENTION_KEY for prefix in prefixes]
    with open_checkpoint(path) as f:
        found = [name for name in names if name in f.keys()]
        width = f.get_slice(found[0]).get_shape()[-1] if found else None
    configs = {config.cross_attention_dim: config for config in (SD15_UNET, SD2_UNET)}
    if width not in configs:
        what = f"{found[0]} has width {width}" if found else f"{names[0]} is absent"
        raise ValueError(f"{path}: {what}; not a Stable Diffusion 1.x (768) or 2.x (1024) "
                         "single-file checkpoint")
    return configs[width]


def unet_from_single_file(path: str, config: UNetConfig | None = None, device=None,
                          dtype=None) -> UNet:
    """The UNet of a single-file LDM checkpoint (v1-5-pruned-emaonly.safetensors,
    512-base-ema.safetensors; fp32/fp16/bf16); config None: SD 1.x's or SD 2.x's, read from the
    file (single_file_config). The LDM names are the same for both; SD 1.x's proj_in/proj_out
    are 1x1-conv weights (C, C, 1, 1) where SD 2.x has Linear ones (C, C).

    The keys do not tell 512-base (eps) from 768 (v): same config, the caller knows which it
    loaded. dtype None keeps the file's dtype.
    """
    config = single_file_config(path) if config is None else config
    with torch.device("meta"):
        model = UNet(config)
    rename = functools.partial(ldm_unet_key, layers_per_block=config.layers_per_block)
    return load_state(model, path, rename, device, dtype)
