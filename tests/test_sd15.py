"""Stable Diffusion 1.5 as a base model (the paper's Table 9): unet.py, clip.py, controlnet.py and
dmap.load_sd2 against diffusers / transformers on tiny SD 1.5-shaped models with random weights,
in the diffusers folder layout and the LDM single-file layout; the full-size configs on the meta
device; bad input as one ValueError.

What SD 1.5 changes (docs/sd2_formats.md §8): 1x1-conv proj_in/proj_out, 8 heads at every level,
cross-attention width 768, CLIP ViT-L/14 text (12 layers, quick GELU, last layer + final
LayerNorm), a tokenizer that pads with eos, text keys `cond_stage_model.transformer.*`.
"""

import copy
import functools
import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_close, ldm_state, random_ldm_state, randomize
from diffusers import ControlNetModel, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from test_clip import varied_prompts
from test_unet import OTHER_PARTS
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import clip
import controlnet
import dmap
import unet
import vae
from clip import SD15_TEXT, TextConfig, TextEncoder
from unet import SD2_UNET, SD15_UNET, UNetConfig

# ---------------------------------------------------------------------------------------------
# The configs of stable-diffusion-v1-5/stable-diffusion-v1-5 (hub; docs/sd2_formats.md §8)

SD15_UNET_DIFFUSERS = dict(  # unet/config.json; use_linear_projection absent (= false)
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4,
    sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD15_TEXT_DIFFUSERS = dict(  # text_encoder/config.json: openai/clip-vit-large-patch14's text model
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0,
    eos_token_id=2, hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0,
    initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05,
    max_position_embeddings=77, model_type="clip_text_model", num_attention_heads=12,
    num_hidden_layers=12, pad_token_id=1, projection_dim=768, vocab_size=49408,
)
SD15_SCHEDULER = dict(  # scheduler/scheduler_config.json: no prediction_type (= epsilon)
    _class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear",
    beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
    steps_offset=1, trained_betas=None, clip_sample=False)
# tokenizer/special_tokens_map.json (openai/clip-vit-large-patch14's): pad = eos
_TOKEN = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)
SD15_SPECIAL = dict(bos_token=_TOKEN | dict(content="<|startoftext|>"),
                    eos_token=_TOKEN | dict(content="<|endoftext|>"),
                    pad_token="<|endoftext|>", unk_token=_TOKEN | dict(content="<|endoftext|>"))
SD2_SPECIAL = SD15_SPECIAL | dict(pad_token="!")  # docs/sd2_formats.md §1.5

WIDTH = 32  # text width = cross-attention width of the tiny models
# A tiny SD 1.5-shaped UNet (2 levels, 2 heads everywhere: head dims 16 and 32, conv projections;
# layers_per_block 2, the LDM layout conftest.ldm_state writes); `TINY15_DIFFUSERS`, diffusers'.
TINY15_DIFFUSERS = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
    cross_attention_dim=WIDTH, norm_num_groups=8)
TINY15 = UNetConfig(block_out_channels=(32, 64), num_heads=(2, 2), attention=(True, False),
                    cross_attention_dim=WIDTH, norm_num_groups=8, linear_projection=False)
TINY15_TEXT = TextConfig(width=WIDTH, heads=4, layers=2, mlp_width=64, act="quick_gelu")


def hf_text_config(cfg: TextConfig, vocab_size: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size or cfg.vocab_size, hidden_size=cfg.width,
                          intermediate_size=cfg.mlp_width, num_attention_heads=cfg.heads,
                          num_hidden_layers=cfg.layers, max_position_embeddings=cfg.context,
                          hidden_act=cfg.act, layer_norm_eps=cfg.eps)


def unet_inputs(B=2, size=(16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, *size, generator=g), torch.randn(B, 7, WIDTH, generator=g)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny SD 1.5-shaped diffusers UNet and its save_pretrained folder."""
    model = randomize(UNet2DConditionModel(**TINY15_DIFFUSERS), seed=0)
    folder = str(tmp_path_factory.mktemp("unet15"))
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


# ---------------------------------------------------------------------------------------------
# (1) the UNet: diffusers folder, LDM single file


def test_unet_config():
    assert UNetConfig.from_diffusers(SD15_UNET_DIFFUSERS) == SD15_UNET
    assert UNetConfig.from_diffusers(SD15_UNET.to_diffusers()) == SD15_UNET
    assert UNetConfig.from_diffusers(SD15_UNET_DIFFUSERS | dict(use_linear_projection=True)) \
        == replace(SD15_UNET, linear_projection=True)


@pytest.mark.parametrize("controlled", [False, True], ids=["plain", "residuals"])
@pytest.mark.parametrize("t,size", [(torch.tensor([3.5, 700.25]), (16, 16)), (421.75, (20, 12))],
                         ids=["t(B,)-16x16", "t-float-20x12"])
def test_unet_folder_parity(reference, t, size, controlled):
    ref, folder = reference
    ours = unet.load_unet(folder)
    assert ours.cfg == TINY15
    proj = ours.down_blocks[0].attentions[0].proj_in
    assert isinstance(proj, torch.nn.Conv2d) and proj.weight.shape == (32, 32, 1, 1)
    x, context = unet_inputs(size=size)
    residuals = None
    if controlled:  # ControlNet-like residuals shaped like the skips and the mid block output
        temb = ours.embed_time(t, x)
        h, skips = ours.encode(ours.conv_in(x), temb, context)
        g = torch.Generator().manual_seed(2)
        residuals = ([torch.randn(s.shape, generator=g) for s in skips],
                     torch.randn(h.shape, generator=g))
    kw = dict(down_block_additional_residuals=tuple(residuals[0]),
              mid_block_additional_residual=residuals[1]) if controlled else {}
    with torch.no_grad():
        expected = ref(x, t, context, **kw).sample
        actual = ours(x, t, context, residuals)
    assert_close(actual, expected, 1e-5, what=f"SD1.5 unet folder {size} residuals={controlled}")


def test_unet_single_file_parity(reference, tmp_path):
    """The LDM layout, written by conftest.ldm_state (checked against diffusers' converter)."""
    ref, _ = reference
    path = str(tmp_path / "tiny-v1-5.safetensors")
    save_file({**ldm_state(dict(ref.state_dict())), **OTHER_PARTS}, path)
    assert load_file(path)["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4
    expected_model = copy.deepcopy(ref)  # diffusers' converter on the file, loaded strictly
    expected_model.load_state_dict(convert_ldm_unet_checkpoint(load_file(path),
                                                               {"layers_per_block": 2}))
    ours = unet.unet_from_single_file(path, TINY15)
    x, context = unet_inputs()
    t = torch.tensor([0.5, 999.0])
    with torch.no_grad():
        assert_close(ours(x, t, context), expected_model(x, t, context).sample, 1e-5,
                     what="SD1.5 unet single file")


def test_single_file_config_detection(tmp_path):
    """config None: SD 1.x or 2.x from the width of the first cross-attention's keys."""
    key = "model.diffusion_model." + unet.CROSS_ATTENTION_KEY
    for width, want in ((768, SD15_UNET), (1024, SD2_UNET)):
        path = str(tmp_path / f"{width}.safetensors")
        save_file({key: torch.zeros(320, width, dtype=torch.float16)}, path)
        assert unet.single_file_config(path) == want
    # a ControlNet's copy of the encoder: ControlLDM (control_model.) or standalone keys
    standalone = str(tmp_path / "control.safetensors")
    save_file({unet.CROSS_ATTENTION_KEY: torch.zeros(320, 768, dtype=torch.float16)}, standalone)
    assert unet.single_file_config(standalone, ("control_model.", "")) == SD15_UNET
    odd = str(tmp_path / "512.safetensors")
    save_file({key: torch.zeros(320, 512, dtype=torch.float16)}, odd)
    with pytest.raises(ValueError, match="has width 512; not a Stable Diffusion 1.x"):
        unet.unet_from_single_file(odd)
    with pytest.raises(ValueError, match="attn2.to_k.weight is absent"):
        unet.unet_from_single_file(standalone)


def test_unet_bad_single_files(reference, tmp_path):
    """An SD 2-layout file (Linear projections) forced as SD 1.x; a half-downloaded file."""
    ref, _ = reference
    with torch.device("meta"):
        linear = unet.UNet(replace(TINY15, linear_projection=True))
    state = {k: torch.randn(v.shape) for k, v in linear.state_dict().items()}
    sd2_layout = str(tmp_path / "sd2-layout.safetensors")
    save_file(ldm_state(state), sd2_layout)
    with pytest.raises(ValueError, match=re.escape(sd2_layout) + r": \d+ misshaped keys for UNet"
                       r", first: model\.diffusion_model\.input_blocks\.1\.1\.proj_in\.weight "
                       r"\(32, 32\) \(expected \(32, 32, 1, 1\)\)"):
        unet.unet_from_single_file(sd2_layout, TINY15)
    good = str(tmp_path / "good.safetensors")
    save_file(ldm_state(dict(ref.state_dict())), good)
    data = open(good, "rb").read()
    for cut in (len(data) - 1, len(data) // 2, 5):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        for config in (TINY15, None):
            with pytest.raises(ValueError, match=re.escape(str(truncated))
                               + ": not a readable safetensors file"):
                unet.unet_from_single_file(str(truncated), config)


# ---------------------------------------------------------------------------------------------
# (2) the text encoder and the tokenizer


def test_text_config():
    assert TextConfig.from_diffusers(SD15_TEXT_DIFFUSERS) == SD15_TEXT


def test_text_encoder_parity(tmp_path):
    """transformers' CLIPTextModel (quick GELU): its last_hidden_state (last layer + final LN)
    from the diffusers folder and from the LDM single-file layout of SD 1.x."""
    torch.manual_seed(0)
    ref = CLIPTextModel(hf_text_config(TINY15_TEXT)).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref.save_pretrained(tmp_path / "text_encoder")
    ids = torch.randint(0, TINY15_TEXT.vocab_size, (2, 77), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        folder = clip.load_text_encoder(str(tmp_path / "text_encoder"))
        assert folder.cfg == TINY15_TEXT
        assert_close(folder(ids), expected, 1e-4, what="SD1.5 text encoder folder")
    # FrozenCLIPEmbedder.transformer is a CLIPTextModel: its keys under the LDM prefix, with the
    # position_ids buffer transformers 4.x saved, beside the other parts of the file
    state = {f"cond_stage_model.transformer.{k}": v for k, v in ref.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77)[None]
    back = convert_ldm_clip_checkpoint(state)  # diffusers' converter gives the same keys back
    assert set(back) - {"text_model.embeddings.position_ids"} == set(ref.state_dict())
    path = str(tmp_path / "v1-5.safetensors")
    save_file(state | OTHER_PARTS, path)
    assert clip.single_file_family(path) == "sd1"
    with torch.no_grad():
        single = clip.text_encoder_from_single_file(path, TINY15_TEXT)
        assert_close(single(ids), expected, 1e-4, what="SD1.5 text encoder single file")
    with pytest.raises(ValueError, match=r"misshaped keys for TextEncoder"):  # full size on tiny
        clip.text_encoder_from_single_file(path, device="meta")


def tokenizer_folder(path, special: dict | None) -> str:
    """A tokenizer/ folder: the byte alphabet, a few merges, bos/eos; `special` as its
    special_tokens_map.json (and pad in tokenizer_config.json as SD's say "<|endoftext|>")."""
    symbols = list(clip.bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>"),
              ("h", "o"), ("s", "e</w>"), ("ho", "r"), ("hor", "se</w>"), ("!", "!</w>")]
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    os.makedirs(path)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if special is not None:
        with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
            json.dump(special, f)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(dict(SD15_SPECIAL, model_max_length=77, do_lower_case=True,
                           tokenizer_class="CLIPTokenizer"), f)
    return str(path)


def test_tokenizer_pads_as_transformers(tmp_path):
    """SD 1.5's tokenizer pads with eos and "!" is an ordinary token; SD 2's pads with "!" (id 0),
    a special token: each as transformers' CLIPTokenizer on the folder."""
    prompts = varied_prompts() + ["a horse and the moon!", "!!", "x!y", "<|ENDOFTEXT|>(",
                                  "<|StartOfText|>!"]
    for name, special, pad in (("sd15", SD15_SPECIAL, "<|endoftext|>"), ("sd2", SD2_SPECIAL, "!")):
        folder = tokenizer_folder(tmp_path / name, special)
        ref, ours = CLIPTokenizer.from_pretrained(folder), clip.Tokenizer.from_folder(folder)
        assert ref.pad_token == ours.pad == pad
        expected = ref(prompts, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
        got = ours(prompts)
        bad = [p for p, a, b in zip(prompts, got, expected, strict=True) if not torch.equal(a, b)]
        assert not bad, f"{name}: {len(bad)} of {len(prompts)} prompts differ, first: {bad[0]!r}"
        empty = ours([""])[0].tolist()
        assert empty == [ours.vocab["<|startoftext|>"], ours.vocab["<|endoftext|>"]] \
            + [ours.vocab[pad]] * 75
    # the real ids of the fallback without a folder (dmap.encode_prompt)
    assert clip.PAD_ID == {"sd1": 49407, "sd2": 0}


def _token(content, normalized):
    return dict(content=content, lstrip=False, normalized=normalized, rstrip=False,
                single_word=False)


@pytest.mark.parametrize("special", [
    SD15_SPECIAL, SD2_SPECIAL,
    dict(bos_token=_token("<|startoftext|>", True), eos_token="<|endoftext|>",
         pad_token=_token("<|endoftext|>", True), unk_token=_token("<|endoftext|>", True)),
    dict(bos_token=_token("<|startoftext|>", True), eos_token=_token("<|endoftext|>", True),
         pad_token=_token("<|endoftext|>", True), unk_token="<|endoftext|>"),
    dict(eos_token=_token("<|endoftext|>", False), pad_token=_token("<|endoftext|>", True),
         unk_token=_token("<|endoftext|>", True)),
    dict(bos_token="<|startoftext|>", pad_token=_token("!", True)),
], ids=["sd15", "sd2", "eos-str", "unk-str", "eos-unnormalized", "bos-str-pad-dict"])
def test_special_tokens_as_transformers(tmp_path, special):
    """Which text is the pad, and which special tokens match in the lowercased text."""
    folder = tokenizer_folder(tmp_path / "t", None)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    ref = CLIPTokenizer.from_pretrained(folder)
    expected = {t.content: t.normalized for t in ref.added_tokens_decoder.values()}
    assert clip.special_tokens(folder) == (ref.pad_token, expected)


def test_tokenizer_bad_special_token(tmp_path):
    folder = tokenizer_folder(tmp_path / "t", SD15_SPECIAL | dict(pad_token="<|pad|>"))
    with pytest.raises(ValueError, match=re.escape(folder) + ": special token '<|pad|>' is not "
                       "in vocab.json"):
        clip.Tokenizer.from_folder(folder)


# ---------------------------------------------------------------------------------------------
# (3) a whole tiny SD 1.5 pipeline: folder and single file through dmap


def tiny_sd15_pipeline(root):
    """A tiny SD 1.5-structured pipeline saved by diffusers/transformers in the Hub layout."""
    from diffusers import AutoencoderKL

    d_unet = randomize(UNet2DConditionModel(**TINY15_DIFFUSERS), seed=0)
    autoencoder = randomize(AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
        layers_per_block=1), seed=1)
    folder = tokenizer_folder(os.path.join(root, "tokenizer"), SD15_SPECIAL)
    vocab_size = len(json.load(open(os.path.join(folder, "vocab.json"))))
    text = randomize(CLIPTextModel(hf_text_config(TINY15_TEXT, vocab_size)), seed=2)
    for name, model in (("unet", d_unet), ("vae", autoencoder), ("text_encoder", text)):
        model.save_pretrained(os.path.join(root, name), safe_serialization=True)
    os.makedirs(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f)
    return d_unet, text


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd15"))
    return root, tiny_sd15_pipeline(root)


def test_load_folder(pipeline):
    root, (_, text) = pipeline
    sd = dmap.load_sd2(root)
    assert (sd.family, sd.prediction, sd.unet.cfg) == ("sd1", "eps", TINY15)
    assert torch.equal(sd.abar, dmap.sd_abar())  # the same DDPM schedule as SD 2
    ids = sd.tokenizer([""])
    eos = sd.tokenizer.vocab["<|endoftext|>"]
    assert ids[0].tolist() == [eos - 1] + [eos] * 76  # bos, eos, then eos as the pad
    with torch.no_grad():
        assert_close(dmap.encode_prompt(sd, ""), text(ids).last_hidden_state, 1e-5,
                     what="SD1.5 empty context")
    with pytest.raises(ValueError, match="prediction_type"):
        dmap.load_sd2(root, prediction="v")


@pytest.mark.parametrize("method", ["dps", "dmap"])
def test_restore(pipeline, tmp_path, method):
    root, _ = pipeline
    image = tmp_path / "x.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(image)
    result = dmap.restore(str(image), model=root, method=method, op="sr", size=64, steps=3)
    assert result["restored"].shape == (64, 64, 3) and result["measurement"].shape == (8, 8, 3)
    record = result["record"]
    assert record["method"] == method and record["prediction"] == "eps"
    assert record["model"] == os.path.abspath(root) and np.isfinite(record["psnr"])
    assert record["sampler"]["steps"] == 3


def test_train_evaluate_and_time_on_sd15(pipeline, tmp_path):
    """cse.py train, eval.py run (with the CSE) and the speed benchmark take the SD 1.5 model
    as they take SD 2.0's: the CSE is a ControlNet of its UNet (1x1-conv projections, width
    768 made small), the run's table has its rows, the benchmark counts its calls."""
    import cse
    import eval as evaluation
    import speed

    root, _ = pipeline
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(
            photos / f"{k}.png")
    checkpoint = cse.train(model=root, images=str(photos), n=None, out=str(tmp_path / "cse"),
                           size=64, steps=1, batch=2, micro_batch=2, lr=1e-4, validate_every=0,
                           device="cpu")
    trained = controlnet.load_controlnet(os.path.join(checkpoint, "controlnet"))
    assert not trained.cfg.linear_projection
    assert trained.cfg.cross_attention_dim == TINY15.cross_attention_dim
    result = evaluation.run(str(photos), str(tmp_path / "run"), methods=("dps", "dps+cse"),
                            cse={"sr": checkpoint}, model=root, size=64, steps=2,
                            metrics=("psnr",), device="cpu")
    assert set(result["table"]) == {"sr/dps", "sr/dps+cse"}
    report = speed.benchmark(methods=("dps",), model=root, size=64, steps=1, diffusers=False,
                             device="cpu")
    row = report["rows"][0]
    assert "error" not in row and row["calls"] and row["s_per_step"] > 0, row


def test_controlnet_from_unet_equals_diffusers(pipeline, tmp_path):
    """controlnet.from_unet on the SD 1.5 UNet is diffusers' ControlNetModel.from_unet (names,
    shapes, what is copied, what is zero); a trained-like one, saved and loaded back, makes
    dmap.CSEDenoiser equal to ControlNetModel + UNet2DConditionModel + the official scheduler."""
    root, (d_unet, _) = pipeline
    ours_unet = unet.load_unet(os.path.join(root, "unet"))
    made, theirs = controlnet.from_unet(ours_unet), ControlNetModel.from_unet(d_unet)
    assert made.cfg == controlnet.ControlNetConfig.from_diffusers(dict(theirs.config))
    assert not made.cfg.linear_projection
    ours_state, theirs_state = made.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in ours_state.items()} == \
        {k: v.shape for k, v in theirs_state.items()}
    unet_state = ours_unet.state_dict()
    for k, v in theirs_state.items():  # the copies are the UNet's, the zero convs 0 in both
        if k.startswith(controlnet.COPIED):
            assert torch.equal(ours_state[k], unet_state[k]) and torch.equal(v, unet_state[k])
        elif not k.startswith("controlnet_cond_embedding."):
            assert not ours_state[k].any() and not v.any()

    d_cn = randomize(theirs, seed=3)  # trained-like: no zero conv at 0
    d_cn.save_pretrained(tmp_path / "controlnet", safe_serialization=True)
    ours_cn = controlnet.load_controlnet(str(tmp_path / "controlnet"))
    assert ours_cn.cfg == made.cfg
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(4)
    hint = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    context = torch.randn(1, 7, WIDTH, generator=g)
    denoiser = dmap.CSEDenoiser(ours_unet, ours_cn, context, dmap.sd_abar(), hint)
    w = torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 23, 49):
        sigma, t = scheduler.sigmas[i], scheduler.timesteps[i]
        x = (sigma * torch.randn(2, 4, 8, 8, generator=g)).requires_grad_(True)
        scheduler._step_index = i
        x_in = scheduler.scale_model_input(x, t)
        down, mid = d_cn(x_in, t, context.expand(2, -1, -1), hint.expand(2, -1, -1, -1),
                         return_dict=False)
        eps = d_unet(x_in, t, context.expand(2, -1, -1), down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample
        expected = scheduler.step(eps, t, x).pred_original_sample
        (grad_ref,) = torch.autograd.grad((expected * w).sum(), x)
        actual = denoiser(x, sigma.item())
        (grad,) = torch.autograd.grad((actual * w).sum(), x)
        assert_close(actual, expected, 1e-5, what=f"SD1.5 CSE x0_hat step {i}")
        assert_close(grad, grad_ref, 1e-5, what=f"SD1.5 CSE d x0_hat / dx step {i}")


def test_sd2_cse_refused_for_sd15():
    """The authors' SD 2 CSE given with SD 1.5: one ValueError naming the mismatch."""
    with torch.device("meta"):
        sd15 = unet.UNet(SD15_UNET)
        cse = controlnet.ControlNet(controlnet.SD2_CONTROLNET)
        context, hint = torch.zeros(1, 77, 768), torch.zeros(1, 3, 512, 512)
    with pytest.raises(ValueError, match=r"ControlNet cross_attention_dim 1024 \(UNet: 768\)"):
        dmap.CSEDenoiser(sd15, cse, context, dmap.sd_abar(), hint)


def single_file(path, text_state: dict, unet_config: UNetConfig = TINY15) -> str:
    """A tiny LDM single file: UNet, VAE and `text_state`, random."""
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = unet.UNet(unet_config).state_dict()
    state = ldm_state({k: torch.randn(v.shape) for k, v in shapes.items()})
    state |= {f"first_stage_model.{k}": v for k, v in random_ldm_state(vae.TINY).items()}
    save_file({k: v.contiguous() for k, v in (state | text_state).items()}, path)
    return str(path)


def sd1_text_state(cfg: TextConfig = TINY15_TEXT) -> dict:
    torch.manual_seed(1)
    ref = CLIPTextModel(hf_text_config(cfg))
    return {f"cond_stage_model.transformer.{k}": v for k, v in ref.state_dict().items()}


@pytest.fixture
def tiny_loaders(monkeypatch):
    """The single-file loaders with the tiny configs (the full-size ones are SD 1.5's)."""
    for module, name, config in ((unet, "unet_from_single_file", TINY15),
                                 (vae, "vae_from_single_file", vae.TINY),
                                 (clip, "text_encoder_from_single_file", TINY15_TEXT)):
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), config=config))


def test_load_single_file(tmp_path, tiny_loaders):
    path = single_file(tmp_path / "v1-5-pruned-emaonly.safetensors", sd1_text_state())
    sd = dmap.load_sd2(path)
    assert (sd.family, sd.prediction, sd.tokenizer) == ("sd1", "eps", None)
    ids = torch.tensor([[49406, 49407] + [49407] * 75])  # CLIP-L pads with eos
    with torch.no_grad():
        context = dmap.encode_prompt(sd, "")
        assert torch.equal(context, sd.text_encoder(ids))
        padded_with_0 = sd.text_encoder(torch.tensor([[49406, 49407] + [0] * 75]))
    assert context.shape == (1, 77, WIDTH) and not torch.equal(context, padded_with_0)
    with pytest.raises(ValueError, match="tokenizer/ folder"):
        dmap.encode_prompt(sd, "a photo")


@pytest.mark.parametrize("case", ["v", "half", "sd2-layout-unet", "mixed"])
def test_bad_single_files(tmp_path, tiny_loaders, monkeypatch, capsys, case):
    """Each one ValueError; through the command, one `error:` line and exit code 2: v-prediction
    asked of SD 1.x, a half-downloaded file, an SD 2-layout UNet (Linear projections) where the
    text says SD 1.x, read with the SD 1.x config (misshaped) or with its own (two models)."""
    from skimage.data import astronaut

    sd2_layout = replace(TINY15, linear_projection=True)
    path = single_file(tmp_path / "v1-5.safetensors", sd1_text_state(),
                       sd2_layout if case in ("sd2-layout-unet", "mixed") else TINY15)
    prediction = "v" if case == "v" else None
    if case == "half":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    if case == "mixed":
        monkeypatch.setattr(unet, "unet_from_single_file", functools.partial(
            unet.unet_from_single_file.func, config=sd2_layout))
    message = {"v": f"{path} is an SD 1.x checkpoint; SD 1.x has no v-prediction model: "
                    "drop --prediction v",
               "half": f"{path}: not a readable safetensors file",
               "sd2-layout-unet": f"{path}: 12 misshaped keys for UNet, first: "
                                  "model.diffusion_model.input_blocks.1.1.proj_in.weight (32, 32) "
                                  "(expected (32, 32, 1, 1))",
               "mixed": f"{path}: its UNet is sd2's but its text encoder sd1's"}[case]
    image = tmp_path / "a.png"
    Image.fromarray(astronaut()).save(image)
    with pytest.raises(ValueError, match=re.escape(message)):
        dmap.load_sd2(path, prediction)
    flags = ["--prediction", prediction] if prediction else []
    assert dmap.main([str(image), "--model", path, "--out", str(tmp_path / "o"), "--size", "64",
                      "--steps", "2", "--device", "cpu", *flags]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# (4) full size, on the meta device: names and shapes against diffusers / transformers, and the
#     LDM single-file names of SD 1.5 onto ours


def test_full_size_unet_names_and_shapes():
    with torch.device("meta"):
        ours = unet.UNet(SD15_UNET)
        ref = UNet2DConditionModel(**{k: v for k, v in SD15_UNET_DIFFUSERS.items()
                                      if not k.startswith("_")})
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(shapes) == 686 and shapes["mid_block.attentions.0.proj_in.weight"] == \
        (1280, 1280, 1, 1)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    # 8 heads at every level, head dims 40, 80, 160 (mid: 160)
    attention = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attention.heads == 8 and ours.mid_block.attentions[0].transformer_blocks[0] \
        .attn2.heads == 8
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == \
        (320, 768)
    # LDM names: diffusers' converter run on {ldm name: ldm name} gives {our name: ldm name}
    ldm = ldm_state({k: k for k in shapes})
    truth = convert_ldm_unet_checkpoint({k: k for k in ldm}, {"layers_per_block": 2})
    mapped = {unet.ldm_unet_key(k): k for k in ldm}
    assert mapped == truth and len(mapped) == 686 and set(mapped) == set(shapes)


def test_full_size_text_names_and_shapes():
    with torch.device("meta"):
        ours = TextEncoder(SD15_TEXT).state_dict()
        ref = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_DIFFUSERS)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == \
        {k.removeprefix("text_model."): v.shape for k, v in ref.items()}
    assert sum(v.numel() for v in ours.values()) == 123_060_480
    # the LDM file: FrozenCLIPEmbedder.transformer's keys, and transformers 4.x's position_ids
    ldm = [f"cond_stage_model.transformer.{k}" for k in ref] + \
        ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    truth = {k.removeprefix("text_model."): v
             for k, v in convert_ldm_clip_checkpoint({k: k for k in ldm}).items()
             if not k.endswith("position_ids")}
    mapped = {clip.sd1_key(k): k for k in ldm if clip.sd1_key(k) is not None}
    assert mapped == truth and set(mapped) == set(ours)
    for other in OTHER_PARTS:
        assert clip.sd1_key(other) is None


def test_full_size_controlnet_names_and_shapes():
    with torch.device("meta"):
        made = controlnet.from_unet(unet.UNet(SD15_UNET))
        ref = ControlNetModel.from_unet(UNet2DConditionModel(
            **{k: v for k, v in SD15_UNET_DIFFUSERS.items() if not k.startswith("_")}))
    assert {k: v.shape for k, v in made.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    assert made.cfg == controlnet.ControlNetConfig.from_diffusers(dict(ref.config))


# ---------------------------------------------------------------------------------------------
# (5) full size, random weights


@pytest.mark.slow
def test_full_size_unet_parity():
    ref = randomize(UNet2DConditionModel(**{k: v for k, v in SD15_UNET_DIFFUSERS.items()
                                            if not k.startswith("_")}), seed=0)
    with torch.device("meta"):
        ours = unet.UNet(SD15_UNET)
    ours.load_state_dict(ref.state_dict(), assign=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.5])
    with torch.no_grad():
        expected = ref(x, t, context).sample
        del ref
        actual = ours(x, t, context)
    assert_close(actual, expected, 1e-5, what="full-size SD1.5 UNet 64x64")
