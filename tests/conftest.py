"""Shared test helpers, imported by the tests (pytest puts tests/ on sys.path): error checks,
random weights, LDM single-file states for the three SD 2.0 networks, a linear operator."""

import json
import os
import re
import shutil

# One torch thread (before torch is imported; OMP_NUM_THREADS, when set, wins): the tests' tiny
# workloads ran 8-29x slower with a thread per core on a busy machine, and barely faster on an
# idle one (README.md, "Threads"). Subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file

import clip
from clip import TextConfig
from vae import VAEConfig


def assert_close(actual, expected, tol: float, *, rel: bool = True, what: str = ""):
    """Assert max|actual - expected| <= tol (times max|expected| when rel); print the errors."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-12) if rel else torch.tensor(1.0)
    print(f"{what}: max abs err {err.max():.3e}, mean {err.mean():.3e}, scale {scale:.3e}")
    assert err.max() <= tol * scale, f"{what}: max err {err.max():.3e} > {tol:g} x {scale:.3e}"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (reference inits leave some at exactly 0 or 1), so a swapped or
    skipped weight shows in the outputs: weights ~ N(0, 1/fan_in), biases ~ 0.2 N(0, 1), norm
    scales ~ 1 + 0.2 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def community_weights(folder) -> str:
    """The three metric weight files in the community packages' layouts (LPIPS's AlexNet and
    its linear heads, pytorch-fid's Inception), random, written into `folder`; its path."""
    from metrics_reference import randomize as randomize_with_batchnorm

    import metrics

    lp = randomize_with_batchnorm(metrics.LPIPS(), 0)
    torch.save({f"features.{k}": v for k, v in lp.features.state_dict().items()},
               os.path.join(folder, "alexnet-owt-7be5be79.pth"))
    torch.save({f"lin{i}.model.1.weight": m.weight.abs() for i, m in enumerate(lp.lin)},
               os.path.join(folder, "alex.pth"))
    torch.save(randomize_with_batchnorm(metrics.FIDInception(), 1).state_dict(),
               os.path.join(folder, "pt_inception-2015-12-05-6726825d.pth"))
    return str(folder)


def linear_operator(M: torch.Tensor):
    """A(x0) = x0 M^T on rows of x0 (N, d), and the parts PSLD takes beyond A (dmap.model_parts):
    H = A, its adjoint v M, decode = encode = identity (the denoiser works in pixel space)."""
    def A(x0):
        return x0 @ M.T

    def identity(v):
        return v

    return A, dict(H=A, adjoint=lambda v: v @ M, decode=identity, encode=identity)


def copy_folder(folder, dst, state=None):
    """A copy of a diffusers model folder's config.json, with `state` as its weights if given."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(folder, "config.json"), dst)
    if state is not None:
        save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return str(dst)


# --- single-file (LDM) states: the UNet's, the VAE's, the OpenCLIP text tower's ----------

# An inverse of diffusers' convert_ldm_unet_checkpoint (LDM openaimodel.UNetModel names) for
# layers_per_block = 2, i.e. 3 LDM input/output blocks per level.
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection"}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0",
               "conv_out": "out.2"}
# Every name an SD 2 LDM UNet checkpoint has (openaimodel.py ResBlock, SpatialTransformer, ...).
_LDM_NAME = re.compile(
    r"model\.diffusion_model\.("
    r"time_embed\.[02]|input_blocks\.0\.0|out\.[02]"
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv"
    r"|(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)"
    r"\.(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)"
    r"|(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.(norm|proj_in|proj_out"
    r"|transformer_blocks\.0\.(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))))"
    r"\.(weight|bias)")


def to_ldm(key: str, keys) -> str:
    stem, kind = key.rsplit(".", 1)
    if stem in _TOP_TO_LDM:
        return f"model.diffusion_model.{_TOP_TO_LDM[stem]}.{kind}"
    part, level, sub, j, leaf = re.fullmatch(
        r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(\w+)\.(\d+)\.(.+)", stem).groups()
    level, j = int(level or 0), int(j)
    leaf = _RESNET_TO_LDM.get(leaf, leaf) if sub == "resnets" else leaf
    if part == "down_blocks":
        name = (f"input_blocks.{3 * level + 3}.0.op" if sub == "downsamplers" else
                f"input_blocks.{3 * level + j + 1}.{int(sub == 'attentions')}.{leaf}")
    elif part == "mid_block":
        name = f"middle_block.{1 if sub == 'attentions' else 2 * j}.{leaf}"
    elif sub == "upsamplers":  # Upsample comes after the SpatialTransformer, if there is one
        has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in keys)
        name = f"output_blocks.{3 * level + 2}.{1 + has_attention}.conv"
    else:
        name = f"output_blocks.{3 * level + j}.{int(sub == 'attentions')}.{leaf}"
    return f"model.diffusion_model.{name}.{kind}"


def ldm_state(state: dict) -> dict:
    """An LDM-named copy of a diffusers state dict, checked against diffusers' converter."""
    ldm = {to_ldm(k, state): v for k, v in state.items()}
    assert len(ldm) == len(state)
    bad = [k for k in ldm if not _LDM_NAME.fullmatch(k)]
    assert not bad, f"not LDM names: {bad[:3]}"
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    back = convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2})
    assert back.keys() == state.keys() and all(back[k] is v for k, v in state.items())
    return ldm


def ldm_vae_state(cfg: VAEConfig, make) -> dict:
    """LDM AutoencoderKL names and shapes (ldm/modules/diffusionmodules/model.py Encoder,
    Decoder, written out here, not taken from vae.py); `make(shape, bias)` makes each tensor."""
    state = {}

    def conv(name, cout, cin, k):  # attention q/k/v/proj_out too: 1x1 convs in LDM
        state[f"{name}.weight"], state[f"{name}.bias"] = make((cout, cin, k, k)), make((cout,), 0)

    def norm(name, c):
        state[f"{name}.weight"], state[f"{name}.bias"] = make((c,), 1), make((c,), 0)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(name, c):
        resnet(f"{name}.mid.block_1", c, c)
        norm(f"{name}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{name}.mid.block_2", c, c)

    ch, z, levels = cfg.block_out_channels, cfg.latent_channels, len(cfg.block_out_channels)
    conv("encoder.conv_in", ch[0], cfg.channels, 3)
    c = ch[0]
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            resnet(f"encoder.down.{i}.block.{j}", c, ch[i])
            c = ch[i]
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", 2 * z, c, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", c, z, 3)
    mid("decoder", c)
    for i in reversed(range(levels)):  # LDM builds up[i] from the lowest resolution, up[0] last
        for j in range(cfg.layers_per_block + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch[i])
            c = ch[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", cfg.channels, c, 3)
    return state


def random_ldm_state(cfg: VAEConfig, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def make(shape, base=None):
        if base is None:  # weight
            return torch.randn(shape, generator=gen) / torch.Size(shape[1:]).numel() ** 0.5
        return base + 0.2 * torch.randn(shape, generator=gen)

    return ldm_vae_state(cfg, make)


def openclip_state(cfg: TextConfig, generator: torch.Generator) -> dict:
    """An LDM single file in SD2's layout: OpenCLIP text tower with one block more than SD2 uses."""
    W, M = cfg.width, cfg.mlp_width
    shapes = {"token_embedding.weight": (cfg.vocab_size, W),
              "positional_embedding": (cfg.context, W), "ln_final.weight": (W,),
              "ln_final.bias": (W,), "text_projection": (W, 16), "logit_scale": ()}
    block = {"ln_1.weight": (W,), "ln_1.bias": (W,), "attn.in_proj_weight": (3 * W, W),
             "attn.in_proj_bias": (3 * W,), "attn.out_proj.weight": (W, W),
             "attn.out_proj.bias": (W,), "ln_2.weight": (W,), "ln_2.bias": (W,),
             "mlp.c_fc.weight": (M, W), "mlp.c_fc.bias": (M,), "mlp.c_proj.weight": (W, M),
             "mlp.c_proj.bias": (W,)}
    for i in range(cfg.layers + 1):
        shapes |= {f"transformer.resblocks.{i}.{k}": s for k, s in block.items()}
    state = {f"cond_stage_model.model.{k}": 0.3 * torch.randn(s, generator=generator)
             for k, s in shapes.items()}
    state["model.diffusion_model.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=generator)
    state["first_stage_model.encoder.conv_in.bias"] = torch.randn(8, generator=generator)
    return state


SD2_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", num_train_timesteps=1000,
                     prediction_type="epsilon", steps_offset=1, clip_sample=False,
                     set_alpha_to_one=False, skip_prk_steps=True)
WIDTH = 32  # text width = cross-attention width of the tiny model


def tiny_pipeline(root):
    """A tiny SD 2.0-structured pipeline saved by diffusers/transformers in the Hub layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        cross_attention_dim=WIDTH, norm_num_groups=8, use_linear_projection=True)
    autoencoder = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
        layers_per_block=1)  # 4 levels: latents are 8x smaller, as in SD
    # the tokenizer: bytes and bytes+</w> plus the two special tokens, no merges (514 ids)
    symbols = list(clip.bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu"))
    for name, model, seed in (("unet", unet, 0), ("vae", autoencoder, 1),
                              ("text_encoder", text, 2)):
        randomize(model, seed).save_pretrained(os.path.join(root, name), safe_serialization=True)
    os.makedirs(os.path.join(root, "tokenizer"))
    with open(os.path.join(root, "tokenizer", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(root, "tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    os.makedirs(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD2_SCHEDULER, f)
    return unet, autoencoder, text
