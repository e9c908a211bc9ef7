"""controlnet.py against diffusers' ControlNetModel: tiny random weights, SD 2 structure.

The original single-file layout is checked through diffusers' own converter
(single_file_utils.convert_controlnet_checkpoint), never through original_controlnet_key;
the CSE denoiser against ControlNetModel + UNet2DConditionModel + EulerAncestralDiscreteScheduler.
"""

import copy
import json
import os
import re

import pytest
import torch
from conftest import assert_close, copy_folder, randomize, to_ldm
from diffusers import ControlNetModel, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file
from test_unet import OTHER_PARTS, SD2_DIFFUSERS, diffusers_config

import dmap
import unet
from controlnet import (
    COPIED,
    SD2_CONTROLNET,
    TINY_CONTROLNET,
    ControlNet,
    ControlNetConfig,
    controlnet_from_single_file,
    from_unet,
    load_controlnet,
    original_controlnet_key,
)

# ControlNetModel.from_unet(stable-diffusion-2-base UNet).config, as save_pretrained writes it
# (docs/sd2_formats.md §3.1; the authors' checkpoint-N/controlnet/config.json)
SD2_CONTROLNET_DIFFUSERS = dict(
    _class_name="ControlNetModel", act_fn="silu", addition_embed_type=None,
    addition_embed_type_num_heads=64, addition_time_embed_dim=None,
    attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    class_embed_type=None, conditioning_channels=3,
    conditioning_embedding_out_channels=[16, 32, 96, 256],
    controlnet_conditioning_channel_order="rgb", cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    global_pool_conditions=False, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
    num_attention_heads=None, num_class_embeds=None, only_cross_attention=False,
    projection_class_embeddings_input_dim=None, resnet_time_scale_shift="default",
    transformer_layers_per_block=1, upcast_attention=False, use_linear_projection=True,
)
# The scheduler config of stabilityai/stable-diffusion-2-base (docs/sd2_formats.md §1.3).
SD2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                     clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


def controlnet_config(cfg: unet.UNetConfig) -> dict:
    """SD2_CONTROLNET_DIFFUSERS at the width of `cfg` (same block types and hint embedding)."""
    return {**SD2_CONTROLNET_DIFFUSERS, "block_out_channels": list(cfg.block_out_channels),
            "attention_head_dim": list(cfg.num_heads), "norm_num_groups": cfg.norm_num_groups,
            "cross_attention_dim": cfg.cross_attention_dim}


def kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny diffusers UNet and ControlNet (trained-like: no zero convs at 0), and their
    save_pretrained folders."""
    d_unet = randomize(UNet2DConditionModel(**kwargs(diffusers_config(unet.TINY))), seed=0)
    d_cn = randomize(ControlNetModel(**kwargs(controlnet_config(unet.TINY))), seed=1)
    folders = {}
    for name, model in (("unet", d_unet), ("controlnet", d_cn)):
        folders[name] = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folders[name], safe_serialization=True)
    return d_unet, d_cn, folders


def inputs(B=2, h=8, w=8, seed=1):
    """Latents, a hint at 8x their size in [-1, 1], a context."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, h, w, generator=g),
            torch.rand(B, 3, 8 * h, 8 * w, generator=g) * 2 - 1,
            torch.randn(B, 7, unet.TINY.cross_attention_dim, generator=g))


# ---------------------------------------------------------------------------------------------
# config


def test_config_from_diffusers():
    assert ControlNetConfig.from_diffusers(SD2_CONTROLNET_DIFFUSERS) == SD2_CONTROLNET
    assert ControlNetConfig.from_diffusers(controlnet_config(unet.TINY)) == TINY_CONTROLNET
    # what diffusers itself writes for a ControlNet made from the SD 2 UNet
    with torch.device("meta"):
        made = ControlNetModel.from_unet(UNet2DConditionModel(**kwargs(SD2_DIFFUSERS)))
    assert ControlNetConfig.from_diffusers(dict(made.config)) == SD2_CONTROLNET
    hint = {**SD2_CONTROLNET_DIFFUSERS, "conditioning_channels": 1,
            "conditioning_embedding_out_channels": [8, 16]}
    assert ControlNetConfig.from_diffusers(hint) == ControlNetConfig(
        conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))


@pytest.mark.parametrize("change,key", [
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
    ({"controlnet_conditioning_channel_order": "bgr"}, "controlnet_conditioning_channel_order"),
    ({"global_pool_conditions": True}, "global_pool_conditions"),
    ({"conditioning_embedding_out_channels": None}, "conditioning_embedding_out_channels"),
    ({"conditioning_channels": 0}, "conditioning_channels"),
    ({"only_cross_attention": True}, "only_cross_attention"),
    ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
])
def test_config_rejects(change, key):
    with pytest.raises(ValueError, match=key):
        ControlNetConfig.from_diffusers({**SD2_CONTROLNET_DIFFUSERS, **change})


# ---------------------------------------------------------------------------------------------
# parity with diffusers (diffusers folder)


# (B,) fractional timesteps at 8x8; one float timestep at 10x6 latents (80x48 hint), a size
# not divisible by 8; conditioning_scale 1 (the authors') and 0.7
@pytest.mark.parametrize("t,size,scale", [(torch.tensor([3.5, 700.25]), (8, 8), 1.0),
                                          (421.75, (10, 6), 0.7)],
                         ids=["t(B,)-8x8", "t-float-10x6-scale0.7"])
def test_parity_diffusers(reference, t, size, scale):
    d_unet, d_cn, folders = reference
    ours_cn, ours_unet = load_controlnet(folders["controlnet"]), unet.load_unet(folders["unet"])
    assert ours_cn.cfg == TINY_CONTROLNET
    x, hint, context = inputs(2, *size)
    with torch.no_grad():
        down_ref, mid_ref = d_cn(x, t, context, controlnet_cond=hint, conditioning_scale=scale,
                                 return_dict=False)
        down, mid = ours_cn(x, t, context, hint, scale)
        assert len(down) == len(down_ref) == 12
        for i, (a, b) in enumerate(zip(down, down_ref, strict=True)):
            assert_close(a, b, 1e-5, what=f"down residual {i}")
        assert_close(mid, mid_ref, 1e-5, what="mid residual")
        expected = d_unet(x, t, context, down_block_additional_residuals=down_ref,
                          mid_block_additional_residual=mid_ref).sample
        actual = ours_unet(x, t, context, (down, mid))
        assert_close(actual, expected, 1e-5, what=f"UNet with residuals {size}")
        # the residuals matter, and the hint matters
        assert (actual - ours_unet(x, t, context)).abs().max() > 0.01 * expected.abs().max()
        other, _ = ours_cn(x, t, context, -hint, scale)
        assert (other[0] - down[0]).abs().max() > 1e-3 * down[0].abs().max()


def test_fp16_folder(reference, tmp_path):
    """diffusion_pytorch_model.fp16.safetensors: dtype None keeps fp16, dtype fp32 upcasts."""
    _, d_cn, _ = reference
    half = copy.deepcopy(d_cn).half()
    half.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(tmp_path)
    assert {p.dtype for p in load_controlnet(str(tmp_path)).parameters()} == {torch.float16}
    ours = load_controlnet(str(tmp_path), dtype=torch.float32)
    x, hint, context = inputs()
    t = torch.tensor([12.5, 980.0])
    with torch.no_grad():
        down_ref, mid_ref = half.float()(x, t, context, hint, return_dict=False)
        down, mid = ours(x, t, context, hint)
    assert_close(torch.cat([r.flatten() for r in [*down, mid]]),
                 torch.cat([r.flatten() for r in [*down_ref, mid_ref]]), 1e-5,
                 what="fp16 file -> fp32, all 13 residuals")


# ---------------------------------------------------------------------------------------------
# from_unet: what is copied, what is zero


def test_from_unet_equals_diffusers(reference):
    d_unet, _, folders = reference
    ours_unet = unet.load_unet(folders["unet"])
    ours = from_unet(ours_unet).state_dict()
    theirs = ControlNetModel.from_unet(d_unet).state_dict()
    unet_state = ours_unet.state_dict()
    assert ours.keys() == theirs.keys()

    def split(state):  # (copied from the UNet, zero, other) key sets
        copied = {k for k, v in state.items() if k in unet_state and torch.equal(v, unet_state[k])}
        zero = {k for k, v in state.items() if k not in copied and not v.any()}
        return copied, zero, state.keys() - copied - zero

    (copied, zero, other), reference_split = split(ours), split(theirs)
    assert (copied, zero, other) == reference_split
    # all of conv_in, time_embedding, down_blocks, mid_block: 296 tensors here (SD 2: 298, one
    # conv_shortcut more, test_full_size_names_and_shapes); 28 zero-conv and 14 hint-conv tensors
    assert copied == {k for k in ours if k.startswith(COPIED)}
    assert len(copied) == 296 and len(zero) == 28 and len(other) == 14
    assert all(k.startswith("controlnet_cond_embedding.") for k in other)  # default init
    # the copies are copies: own storage, trainable, and editing one leaves the UNet alone
    controlnet = from_unet(ours_unet)
    params = dict(controlnet.named_parameters())
    assert all(params[k].data_ptr() != unet_state[k].data_ptr() for k in copied)
    assert all(p.requires_grad for p in controlnet.parameters())
    before = unet_state["conv_in.weight"].clone()
    with torch.no_grad():
        params["conv_in.weight"].add_(1.0)
    assert torch.equal(ours_unet.conv_in.weight, before)


def test_fresh_controlnet_leaves_unet_unchanged(reference):
    """All 13 residuals of a from_unet ControlNet are exactly 0: the UNet's output is bit-equal,
    and so is the CSE denoiser's x0_hat to the plain SDDenoiser's."""
    _, _, folders = reference
    ours_unet = unet.load_unet(folders["unet"])
    controlnet = from_unet(ours_unet)
    x, hint, context = inputs()
    t = torch.tensor([250.5, 3.0])
    with torch.no_grad():
        down, mid = controlnet(x, t, context, hint)
        assert not any(r.any() for r in [*down, mid])
        assert torch.equal(ours_unet(x, t, context, (down, mid)), ours_unet(x, t, context))
        abar = dmap.sd_abar()
        plain = dmap.SDDenoiser(ours_unet, context[:1], abar)(x, 2.5)
        with_cse = dmap.CSEDenoiser(ours_unet, controlnet, context[:1], abar, hint[:1])(x, 2.5)
    assert torch.equal(with_cse, plain)


# ---------------------------------------------------------------------------------------------
# full size, on the meta device


def test_full_size_names_and_shapes():
    with torch.device("meta"):
        ours = ControlNet(SD2_CONTROLNET)
        ref = ControlNetModel(**kwargs(SD2_CONTROLNET_DIFFUSERS))
        sd2_unet = unet.UNet(unet.SD2_UNET)
        made = from_unet(sd2_unet)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in made.state_dict().items()} == shapes
    assert len(shapes) == 340
    assert sum(p.numel() for p in ours.parameters()) == 364_228_240
    # from_unet copies 298 tensors: exactly the names the ControlNet shares with the UNet
    shared = shapes.keys() & sd2_unet.state_dict().keys()
    assert shared == {k for k in shapes if k.startswith(COPIED)} and len(shared) == 298
    # the 13 residuals at 512 px (docs/sd2_formats.md §3.1)
    meta = dict(device="meta")
    down, mid = ours(torch.zeros(1, 4, 64, 64, **meta), 500.5, torch.zeros(1, 77, 1024, **meta),
                     torch.zeros(1, 3, 512, 512, **meta))
    want = [(320, 64)] * 3 + [(320, 32)] + [(640, 32)] * 2 + [(640, 16)] + [(1280, 16)] * 2 \
        + [(1280, 8)] * 3
    assert [(r.shape[1], r.shape[2]) for r in down] == want
    assert all(r.shape[2] == r.shape[3] for r in down) and mid.shape == (1, 1280, 8, 8)
    # original names: diffusers' converter on {name: name} gives {our name: original name}
    original = original_state({k: k for k in shapes})
    truth = convert_controlnet_checkpoint({k: k for k in original}, {"layers_per_block": 2})
    mapped = {original_controlnet_key(k): k for k in original}
    assert mapped == truth
    assert len(mapped) == len(original) == 340 and set(mapped) == set(shapes)  # a bijection


# ---------------------------------------------------------------------------------------------
# the original single-file layout, proven through diffusers' converter


def to_original(key: str, keys) -> str:
    """Inverse of diffusers' convert_controlnet_checkpoint (cldm.py ControlNet names, with the
    ControlLDM prefix `control_model.`), for 4 hint-embedding levels and layers_per_block 2."""
    stem, kind = key.rsplit(".", 1)
    hint = re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))", stem)
    zero = re.fullmatch(r"controlnet_down_blocks\.(\d+)", stem)
    if hint:
        i = {"conv_in": 0, "conv_out": 14}.get(hint[1]) if hint[2] is None else 2 * int(hint[2]) + 2
        return f"control_model.input_hint_block.{i}.{kind}"
    if zero:
        return f"control_model.zero_convs.{zero[1]}.0.{kind}"
    if stem == "controlnet_mid_block":
        return f"control_model.middle_block_out.0.{kind}"
    return to_ldm(key, keys).replace("model.diffusion_model.", "control_model.")  # the encoder


def original_state(state: dict) -> dict:
    """An original-named copy of a diffusers ControlNet state dict, checked against diffusers'
    converter (every tensor comes back under its own name)."""
    original = {to_original(k, state): v for k, v in state.items()}
    assert len(original) == len(state)
    back = convert_controlnet_checkpoint(original, {"layers_per_block": 2})
    assert back.keys() == state.keys() and all(back[k] is v for k, v in state.items())
    return original


# A ControlLDM file also holds the UNet, the VAE, the text encoder and schedule buffers.
OTHER_CONTROL_LDM_PARTS = {**OTHER_PARTS,
                           "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}


@pytest.mark.parametrize("dtype,prefix", [(torch.float32, "control_model."),
                                          (torch.float16, "control_model."),
                                          (torch.bfloat16, "control_model."),
                                          (torch.float32, "")],
                         ids=["fp32", "fp16", "bf16", "standalone-fp32"])
def test_single_file(reference, tmp_path, dtype, prefix):
    _, d_cn, _ = reference
    state = original_state({k: v.to(dtype) for k, v in d_cn.state_dict().items()})
    if prefix:
        state |= OTHER_CONTROL_LDM_PARTS
    else:  # a standalone file (thibaud/controlnet-sd21): the keys without the prefix
        state = {k.removeprefix("control_model."): v for k, v in state.items()}
    path = str(tmp_path / "tiny-controlnet.safetensors")
    save_file(state, path)
    # the reference: diffusers' converter on the file, loaded strictly into diffusers
    expected_model = copy.deepcopy(d_cn)
    expected_model.load_state_dict(convert_controlnet_checkpoint(
        {k: v.float() for k, v in load_file(path).items()}, {"layers_per_block": 2}))
    loaded = controlnet_from_single_file(path, TINY_CONTROLNET)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    ours = controlnet_from_single_file(path, TINY_CONTROLNET, dtype=torch.float32)
    x, hint, context = inputs()
    t = torch.tensor([0.5, 999.0])
    with torch.no_grad():
        down_ref, mid_ref = expected_model(x, t, context, hint, return_dict=False)
        down, mid = ours(x, t, context, hint)
    assert_close(torch.cat([r.flatten() for r in [*down, mid]]),
                 torch.cat([r.flatten() for r in [*down_ref, mid_ref]]), 1e-5,
                 what=f"single file {dtype} {prefix!r}, all 13 residuals")


def test_original_key_other_parts():
    for key in OTHER_CONTROL_LDM_PARTS:
        assert original_controlnet_key(key) is None
    # a SiLU has no weight: the key goes to load_state under a name no ControlNet has
    unknown = "control_model.input_hint_block.1.weight"
    assert original_controlnet_key(unknown) == "model.diffusion_model.input_hint_block.1.weight"


# ---------------------------------------------------------------------------------------------
# a ControlNet that does not fit the UNet, a hint that does not fit the ControlNet


@pytest.mark.parametrize("change,key", [
    (dict(block_out_channels=(32, 64, 64, 128), num_heads=(2, 4, 4, 8)), "block_out_channels"),
    (dict(cross_attention_dim=32), "cross_attention_dim"),
    (dict(layers_per_block=1), "layers_per_block"),
    (dict(in_channels=8), "in_channels"),
])
def test_mismatched_controlnet_refused(change, key):
    tiny_unet = unet.UNet(unet.TINY)
    controlnet = ControlNet(ControlNetConfig(**{**vars(TINY_CONTROLNET), **change}))
    context, hint = torch.zeros(1, 7, 48), torch.zeros(1, 3, 128, 128)
    with pytest.raises(ValueError, match=f"ControlNet {key} .* \\(UNet: "):
        dmap.CSEDenoiser(tiny_unet, controlnet, context, dmap.sd_abar(), hint)


def test_bad_hint_refused():
    tiny_unet = unet.UNet(unet.TINY)
    controlnet = ControlNet(TINY_CONTROLNET)
    context, abar = torch.zeros(1, 7, 48), dmap.sd_abar()
    with pytest.raises(ValueError, match=r"takes \(1 or B, 3, H, W\)"):  # a grey hint
        dmap.CSEDenoiser(tiny_unet, controlnet, context, abar, torch.zeros(1, 1, 128, 128))
    one_channel = ControlNet(ControlNetConfig(**vars(unet.TINY), conditioning_channels=1))
    with pytest.raises(ValueError, match=r"takes \(1 or B, 1, H, W\)"):  # RGB for a 1-channel one
        dmap.CSEDenoiser(tiny_unet, one_channel, context, abar, torch.zeros(1, 3, 128, 128))
    # y of SR x8 at the latent size instead of op.hint(y): refused at the first call
    denoiser = dmap.CSEDenoiser(tiny_unet, controlnet, context, abar, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"8x the latent size; pass op.hint\(y\)"):
        denoiser(torch.zeros(1, 4, 16, 16), 1.0)


# ---------------------------------------------------------------------------------------------
# bad input: one ValueError naming the file and the key


def test_bad_folders(reference, tmp_path):
    _, _, folders = reference
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        load_controlnet(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_controlnet(str(tmp_path / "empty"))
    bad = copy_folder(folders["controlnet"], tmp_path / "noweights")
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors"):
        load_controlnet(bad)
    with pytest.raises(ValueError, match="'UNet2DConditionModel' is not ControlNetModel"):
        load_controlnet(folders["unet"])  # the unet/ folder by mistake
    config = json.load(open(os.path.join(folders["controlnet"], "config.json")))
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**config, "global_pool_conditions": True}, f)
    with pytest.raises(ValueError, match=f"{re.escape(bad)}.*config.json.*global_pool"):
        load_controlnet(bad)


def test_bad_files(reference, tmp_path):
    _, _, folders = reference
    folder, name = folders["controlnet"], "diffusion_pytorch_model.safetensors"
    state = load_file(os.path.join(folder, name))
    pickle = copy_folder(folder, tmp_path / "pickle")
    torch.save(state, os.path.join(pickle, name))
    truncated = copy_folder(folder, tmp_path / "truncated")
    data = open(os.path.join(folder, name), "rb").read()
    open(os.path.join(truncated, name), "wb").write(data[: len(data) // 2])
    for bad in (pickle, truncated):
        with pytest.raises(ValueError, match=re.escape(os.path.join(bad, name))
                           + ": not a readable safetensors file"):
            load_controlnet(bad)
    missing = {k: v for k, v in state.items() if k != "controlnet_mid_block.bias"}
    extra = {**state, "up_blocks.0.resnets.0.conv1.weight": torch.zeros(3)}
    misshaped = {**state, "controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 1, 3, 3)}
    for what, bad_state, key in (("missing", missing, "controlnet_mid_block.bias"),
                                 ("unexpected", extra, "up_blocks.0.resnets.0.conv1"),
                                 ("misshaped", misshaped, "controlnet_cond_embedding.conv_in")):
        bad = copy_folder(folder, tmp_path / what, bad_state)
        with pytest.raises(ValueError, match=f"{re.escape(bad)}.*{what} keys for ControlNet.*"
                                             f"{re.escape(key)}"):
            load_controlnet(bad)


def test_bad_single_files(reference, tmp_path):
    _, d_cn, _ = reference
    with pytest.raises(ValueError, match="nowhere.safetensors: no such file"):
        controlnet_from_single_file(str(tmp_path / "nowhere.safetensors"), TINY_CONTROLNET)
    path = str(tmp_path / "sd2-without-controlnet.safetensors")  # an SD checkpoint, no control
    save_file(OTHER_CONTROL_LDM_PARTS, path)
    with pytest.raises(ValueError, match=f"{re.escape(path)}: 340 missing keys for ControlNet"):
        controlnet_from_single_file(path, SD2_CONTROLNET, device="meta")
    state = original_state(dict(d_cn.state_dict()))
    wrong = {**state, "control_model.output_blocks.0.0.in_layers.0.weight": torch.zeros(3)}
    save_file(wrong, path)
    with pytest.raises(ValueError, match="1 unexpected keys for ControlNet, first: "
                                         "control_model.output_blocks.0.0.in_layers.0.weight"):
        controlnet_from_single_file(path, TINY_CONTROLNET)


# ---------------------------------------------------------------------------------------------
# the CSE denoiser against the official composition written with diffusers


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_cse_denoiser_equals_diffusers(reference, prediction):
    """x0_hat and its gradient w.r.t. x: ControlNetModel and UNet2DConditionModel on
    scale_model_input(x) at the scheduler's fractional timestep (pipe.py:1687-1718), x0_hat the
    scheduler's pred_original_sample, against dmap.CSEDenoiser on our loaded copies."""
    d_unet, d_cn, folders = reference
    ours_unet, ours_cn = unet.load_unet(folders["unet"]), load_controlnet(folders["controlnet"])
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        {**SD2_SCHEDULER, "prediction_type": prediction})
    scheduler.set_timesteps(50)
    _, hint, context = inputs(B=1)
    abar = dmap.sd_abar()
    denoiser = dmap.CSEDenoiser(ours_unet, ours_cn, context, abar, hint,
                               prediction={"epsilon": "eps", "v_prediction": "v"}[prediction])
    plain = dmap.SDDenoiser(ours_unet, context, abar, denoiser.prediction)
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for i in (0, 23, 49):  # the first step, one in the middle, the last
        sigma, t = scheduler.sigmas[i], scheduler.timesteps[i]
        x = (sigma * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
             ).requires_grad_(True)
        scheduler._step_index = i
        x_in = scheduler.scale_model_input(x, t)
        down, mid = d_cn(x_in, t, context.expand(2, -1, -1), hint.expand(2, -1, -1, -1),
                         return_dict=False)
        out = d_unet(x_in, t, context.expand(2, -1, -1), down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample
        expected = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0))
        expected = expected.pred_original_sample
        (grad_ref,) = torch.autograd.grad((expected * w).sum(), x)
        actual = denoiser(x, sigma.item())
        (grad,) = torch.autograd.grad((actual * w).sum(), x)
        assert_close(actual, expected, 1e-5, what=f"x0_hat step {i} {prediction}")
        assert_close(grad, grad_ref, 1e-5, what=f"d x0_hat / dx step {i} {prediction}")
        # the gradient is finite, nonzero, and goes through the ControlNet
        (grad_plain,) = torch.autograd.grad((plain(x, sigma.item()) * w).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
        assert (grad - grad_plain).abs().max() > 0.01 * grad.abs().max()
