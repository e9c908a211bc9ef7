"""unet.py against diffusers' UNet2DConditionModel: tiny random weights, SD 2 structure.

The LDM single-file layout is checked through diffusers' own converter
(single_file_utils.convert_ldm_unet_checkpoint), never through unet.ldm_unet_key.
"""

import copy
import json
import os
import re

import pytest
import torch
from conftest import assert_close, copy_folder, ldm_state, randomize
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

import unet
from unet import SD2_UNET, TINY, UNetConfig, ldm_unet_key, load_unet, unet_from_single_file

# stabilityai/stable-diffusion-2-base unet/config.json (docs/sd2_formats.md §1.1)
SD2_DIFFUSERS = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05,
    norm_num_groups=32, num_class_embeds=None, only_cross_attention=False, out_channels=4,
    sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True, upcast_attention=False,
)


def diffusers_config(cfg: UNetConfig) -> dict:
    """SD2_DIFFUSERS at the width of `cfg` (same block types; head counts, not head dims)."""
    return {**SD2_DIFFUSERS, "block_out_channels": list(cfg.block_out_channels),
            "attention_head_dim": list(cfg.num_heads), "norm_num_groups": cfg.norm_num_groups,
            "cross_attention_dim": cfg.cross_attention_dim, "sample_size": 16}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny diffusers UNet and its save_pretrained folder."""
    model = randomize(UNet2DConditionModel(**{k: v for k, v in diffusers_config(TINY).items()
                                              if not k.startswith("_")}))
    folder = str(tmp_path_factory.mktemp("unet"))
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def inputs(cfg, B=2, H=16, W=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_channels, H, W, generator=g),
            torch.randn(B, 7, cfg.cross_attention_dim, generator=g))


def random_residuals(model, x, t, context, seed=2):
    """ControlNet-like residuals shaped like the 12 skips and the mid block output."""
    temb = model.embed_time(t, x)
    h, skips = model.encode(model.conv_in(x), temb, context)
    g = torch.Generator().manual_seed(seed)
    down = [torch.randn(s.shape, generator=g) for s in skips]
    return down, torch.randn(h.shape, generator=g)


# ---------------------------------------------------------------------------------------------
# config


def test_config_from_diffusers():
    assert UNetConfig.from_diffusers(SD2_DIFFUSERS) == SD2_UNET
    assert UNetConfig.from_diffusers(diffusers_config(TINY)) == TINY


@pytest.mark.parametrize("change,key", [
    ({"attention_type": "gated"}, "attention_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types"),
    ({"attention_head_dim": [3, 10, 20, 20]}, "attention_head_dim"),
    ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
    ({"layers_per_block": [2, 2, 2, 2]}, "layers_per_block"),
])
def test_config_rejects(change, key):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers({**SD2_DIFFUSERS, **change})


# ---------------------------------------------------------------------------------------------
# parity with diffusers (diffusers folder)


# (B,) fractional timesteps at 16x16; one float timestep at 20x12, a size not divisible by 8
# (diffusers then upsamples to the skips' sizes)
@pytest.mark.parametrize("t,size", [(torch.tensor([3.5, 700.25]), (16, 16)), (421.75, (20, 12))],
                         ids=["t(B,)-16x16", "t-float-20x12"])
@pytest.mark.parametrize("controlnet", [False, True], ids=["plain", "residuals"])
def test_parity_diffusers(reference, t, size, controlnet):
    ref, folder = reference
    ours = load_unet(folder)
    assert ours.cfg == TINY
    x, context = inputs(TINY, 2, *size)
    residuals = random_residuals(ours, x, t, context) if controlnet else None
    kw = dict(down_block_additional_residuals=tuple(residuals[0]),
              mid_block_additional_residual=residuals[1]) if controlnet else {}
    with torch.no_grad():
        expected = ref(x, t, context, **kw).sample
        actual = ours(x, t, context, residuals)
    assert_close(actual, expected, 1e-5, what=f"unet {size} residuals={controlnet}")
    if controlnet:  # the residuals matter
        assert (actual - ours(x, t, context)).abs().max() > 0.01 * expected.abs().max()


def test_fp16_folder(reference, tmp_path):
    """diffusion_pytorch_model.fp16.safetensors: dtype None keeps fp16, dtype fp32 upcasts."""
    ref, _ = reference
    half = copy.deepcopy(ref).half()
    half.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(tmp_path)
    assert {p.dtype for p in load_unet(str(tmp_path)).parameters()} == {torch.float16}
    ours = load_unet(str(tmp_path), dtype=torch.float32)
    x, context = inputs(TINY)
    t = torch.tensor([12.5, 980.0])
    with torch.no_grad():
        expected = half.float()(x, t, context).sample
        actual = ours(x, t, context)
    assert_close(actual, expected, 1e-5, what="fp16 file -> fp32")


# ---------------------------------------------------------------------------------------------
# LDM single-file layout, proven through diffusers' converter


# Keys of the other parts of a single-file checkpoint, which the UNet loader must skip.
OTHER_PARTS = {"first_stage_model.encoder.conv_in.weight": torch.randn(2, 3, 3, 3),
               "cond_stage_model.model.ln_final.weight": torch.randn(4),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
               "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_file(reference, tmp_path, dtype):
    ref, _ = reference
    state = {k: v.to(dtype) for k, v in ref.state_dict().items()}
    path = str(tmp_path / "tiny-ldm.safetensors")
    save_file({**ldm_state(state), **OTHER_PARTS}, path)
    # the reference: diffusers' converter on the LDM file, loaded strictly into diffusers
    expected_model = copy.deepcopy(ref)
    expected_model.load_state_dict(convert_ldm_unet_checkpoint(
        {k: v.float() for k, v in load_file(path).items()}, {"layers_per_block": 2}))
    assert {p.dtype for p in unet_from_single_file(path, TINY).parameters()} == {dtype}
    ours = unet_from_single_file(path, TINY, dtype=torch.float32)
    x, context = inputs(TINY)
    t = torch.tensor([0.5, 999.0])
    with torch.no_grad():
        expected = expected_model(x, t, context).sample
        actual = ours(x, t, context)
    assert_close(actual, expected, 1e-5, what=f"single file {dtype}")


def test_ldm_key_other_parts():
    for key in OTHER_PARTS:
        assert ldm_unet_key(key) is None
    unknown = "model.diffusion_model.label_emb.0.weight"  # reported by load_state, not dropped
    assert ldm_unet_key(unknown) == unknown


# ---------------------------------------------------------------------------------------------
# full size, on the meta device


def test_full_size_names_and_shapes():
    with torch.device("meta"):
        ours = unet.UNet(SD2_UNET)
        ref = UNet2DConditionModel(**{k: v for k, v in SD2_DIFFUSERS.items()
                                      if not k.startswith("_")})
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(shapes) == 686
    assert sum(p.numel() for p in ours.parameters()) == 865_910_724
    # LDM names: diffusers' converter run on {ldm name: ldm name} gives {our name: ldm name}
    ldm = ldm_state({k: k for k in shapes})
    truth = convert_ldm_unet_checkpoint({k: k for k in ldm}, {"layers_per_block": 2})
    mapped = {ldm_unet_key(k): k for k in ldm}
    assert mapped == truth
    assert len(mapped) == len(ldm) == 686 and set(mapped) == set(shapes)  # a bijection


# ---------------------------------------------------------------------------------------------
# bad input: one ValueError naming the file and the key


def test_bad_folders(reference, tmp_path):
    _, folder = reference
    with pytest.raises(ValueError, match="nowhere"):
        load_unet(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_unet(str(tmp_path / "empty"))
    bad = copy_folder(folder, tmp_path / "noweights")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_unet(bad)
    config = json.load(open(os.path.join(folder, "config.json")))
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**config, "time_embedding_type": "fourier"}, f)
    with pytest.raises(ValueError, match=f"{re.escape(bad)}.*config.json.*time_embedding_type"):
        load_unet(bad)


def test_bad_files(reference, tmp_path):
    _, folder = reference
    name = "diffusion_pytorch_model.safetensors"
    state = load_file(os.path.join(folder, name))
    pickle = copy_folder(folder, tmp_path / "pickle")
    torch.save(state, os.path.join(pickle, name))
    truncated = copy_folder(folder, tmp_path / "truncated")
    data = open(os.path.join(folder, name), "rb").read()
    open(os.path.join(truncated, name), "wb").write(data[: len(data) // 2])
    for bad in (pickle, truncated):
        with pytest.raises(ValueError, match=re.escape(os.path.join(bad, name))):
            load_unet(bad)
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    extra = {**state, "up_blocks.0.attentions.0.proj_in.weight": torch.zeros(3)}
    misshaped = {**state, "conv_in.weight": torch.zeros(5, 4, 3, 3)}
    for what, bad_state, key in (("missing", missing, "conv_out.bias"),
                                 ("unexpected", extra, "up_blocks.0.attentions.0.proj_in"),
                                 ("misshaped", misshaped, "conv_in.weight")):
        bad = copy_folder(folder, tmp_path / what, bad_state)
        with pytest.raises(ValueError, match=f"{re.escape(bad)}.*{what}.*{re.escape(key)}"):
            load_unet(bad)


@pytest.mark.parametrize("cin,size,stride,batch,dtype,gemm", [
    (1280, 8, 1, 1, torch.float32, True),  # SD 2's 8x8 level: im2col + one product
    (2560, 16, 1, 1, torch.float32, True),  # an up level's first resnet at 16x16
    (1280, 16, 2, 2, torch.float32, True),  # the downsampler to 8x8, two images
    (2560, 8, 1, 1, torch.bfloat16, True),
    (1280, 16, 1, 1, torch.bfloat16, False),  # 57,600 weights per position: oneDNN in 16 bits
    (640, 16, 1, 1, torch.float32, False),  # 640 -> 1280 at 16x16: oneDNN
    (1280, 8, 1, 4, torch.float32, True),  # 4 x 64 positions: still 57,600 per position
])
def test_conv3x3_is_the_convolution(cin, size, stride, batch, dtype, gemm):
    """Conv3x3 is F.conv2d up to rounding, its gradient w.r.t. the input too, on both sides of
    its rule; where the rule keeps oneDNN it is F.conv2d bit for bit."""
    torch.manual_seed(0)
    conv = unet.Conv3x3(cin, 1280, stride).to(dtype).requires_grad_(False)
    x = torch.randn(batch, cin, size, size, dtype=dtype, requires_grad=True)
    actual = conv(x)
    (grad,) = torch.autograd.grad(actual, x, actual.detach())
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1)
    (expected_grad,) = torch.autograd.grad(expected, x, expected.detach())
    assert actual.shape == expected.shape == (batch, 1280, size // stride, size // stride)
    # oneDNN's own numbers where the rule keeps it; another summation order where it does not
    assert torch.equal(actual, expected) == (not gemm)
    assert torch.equal(grad, expected_grad) == (not gemm)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(actual, expected, tol, what="Conv3x3 output")
    assert_close(grad, expected_grad, tol, what="Conv3x3 input gradient")


# ---------------------------------------------------------------------------------------------
# full size, random weights


@pytest.mark.slow
def test_full_size_parity():
    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(**{k: v for k, v in SD2_DIFFUSERS.items()
                                            if not k.startswith("_")}), seed=0)
    with torch.device("meta"):
        ours = unet.UNet(SD2_UNET)
    ours.load_state_dict(ref.state_dict(), assign=True)
    x, context = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 1024)
    t = torch.tensor([500.5])
    with torch.no_grad():
        expected = ref(x, t, context).sample
        del ref
        actual = ours(x, t, context)
    assert_close(actual, expected, 1e-5, what="full-size SD2 UNet 64x64")
