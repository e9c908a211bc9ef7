"""vae.py against diffusers' AutoencoderKL: same weights, same outputs; loaders; bad files."""

import json
import os

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from conftest import assert_close, ldm_vae_state, random_ldm_state, randomize
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from vae import SD2_VAE, TINY, VAE, VAEConfig, ldm_vae_key, load_vae, vae_from_single_file

# stabilityai/stable-diffusion-2-base vae/config.json as on the Hub (docs/sd2_formats.md §1.2)
SD2_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.8.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY_VAE_CONFIG = dict(SD2_VAE_CONFIG, block_out_channels=[16, 32, 64, 64], norm_num_groups=8)


def diffusers_vae(config: dict) -> AutoencoderKL:
    return AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()


@torch.no_grad()
def astronaut(size: int = 64) -> torch.Tensor:
    """skimage's astronaut as a (1, 3, size, size) image in [-1, 1]."""
    x = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="area")


def latents(n: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def assert_same_outputs(ours: VAE, ref: AutoencoderKL, what: str, tol: float = 1e-4):
    x, z = astronaut(), latents()
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert_close(mean, dist.mean, tol, what=f"{what} encode mean")
    assert_close(logvar, dist.logvar, tol, what=f"{what} encode logvar")
    assert_close(ours.decode(z), ref.decode(z).sample, tol, what=f"{what} decode")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomised tiny diffusers AutoencoderKL and the folder it was saved to."""
    ref = diffusers_vae(TINY_VAE_CONFIG)
    randomize(ref)
    folder = str(tmp_path_factory.mktemp("vae"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def write_folder(folder, state: dict, config: dict = TINY_VAE_CONFIG,
                 name: str = "diffusion_pytorch_model.safetensors") -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(state, os.path.join(folder, name))
    return str(folder)


# --- the diffusers folder --------------------------------------------------------------------


def test_load_vae_matches_diffusers(tiny):
    ref, folder = tiny
    ours = load_vae(folder)
    assert ours.cfg == TINY
    assert_same_outputs(ours, ref, "diffusers folder")


def test_legacy_attention_names(tiny, tmp_path):
    """diffusers <= 0.8 files name the VAE attention query/key/value/proj_attn."""
    _, folder = tiny
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, t in load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")).items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[key] = t
    assert sum(k.split(".")[-2] in legacy.values() for k in state) == 16  # 2 attn x 4 x (w, b)
    old, new = load_vae(write_folder(tmp_path / "legacy", state)), load_vae(folder)
    new = new.state_dict()
    for name, p in old.state_dict().items():  # the same tensors, hence the same outputs
        assert torch.equal(p, new[name]), name
    # both spellings in one file fill the same parameters twice: an error, not a silent pick
    mixed = state | load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="a second time"):
        load_vae(write_folder(tmp_path / "mixed", mixed))


def test_fp16_folder(tiny, tmp_path):
    """diffusion_pytorch_model.fp16.safetensors loads, as fp16 or cast to `dtype`."""
    ref, folder = tiny
    state = {k: v.half() for k, v in ref.state_dict().items()}
    half = write_folder(tmp_path, state, name="diffusion_pytorch_model.fp16.safetensors")
    assert load_vae(half).decoder.conv_out.weight.dtype == torch.float16
    ours = load_vae(half, dtype=torch.float32)
    for name, p in ours.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, state[name].float()), name


def test_sd2_names_shapes_and_count_equal_diffusers():
    """Full SD 2.0 size on the meta device: our parameters are diffusers' (names and shapes)."""
    assert VAEConfig.from_diffusers(SD2_VAE_CONFIG) == SD2_VAE
    with torch.device("meta"):
        ref, ours = diffusers_vae(SD2_VAE_CONFIG), VAE(SD2_VAE)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(shapes) == 248  # docs/sd2_formats.md §0.4
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863


# --- the LDM single-file layout --------------------------------------------------------------


# Other parts of a single-file checkpoint, to be skipped (docs/sd2_formats.md §2.2)
OTHER_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
    "cond_stage_model.model.ln_final.weight": torch.ones(1024),
    "betas": torch.zeros(1000),
    "alphas_cumprod": torch.zeros(1000),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(875000, dtype=torch.int32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_file_matches_diffusers_conversion(tmp_path, dtype):
    """An LDM-named file loads to the model diffusers' own converter makes of it."""
    ldm = {k: v.to(dtype) for k, v in random_ldm_state(TINY).items()}
    prefixed = {f"first_stage_model.{k}": v.float() for k, v in ldm.items()}
    converted = convert_ldm_vae_checkpoint(prefixed, TINY_VAE_CONFIG)
    assert len(converted) == len(ldm)
    ref = diffusers_vae(TINY_VAE_CONFIG)
    ref.load_state_dict(converted, strict=True)  # our LDM name list covers every parameter

    path = str(tmp_path / "ldm.safetensors")
    save_file({**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **OTHER_KEYS}, path)
    ours = vae_from_single_file(path, TINY, dtype=torch.float32)
    for name, p in ours.state_dict().items():  # each tensor where diffusers puts it
        assert torch.equal(p, converted[name]), name
    if dtype == torch.float32:  # equal weights give equal outputs for the others
        assert_same_outputs(ours, ref, "single file")
    assert vae_from_single_file(path, TINY).encoder.conv_in.weight.dtype == dtype


def test_ldm_names_at_sd2_size():
    """At full size, the LDM names map one-to-one onto ours (shapes up to the 1x1 convs)."""
    ldm = ldm_vae_state(SD2_VAE, lambda shape, base=None: torch.empty(shape, device="meta"))
    with torch.device("meta"):
        ours = VAE(SD2_VAE).state_dict()
    assert len(ldm) == 248
    mapped = {ldm_vae_key(f"first_stage_model.{k}"): v.shape for k, v in ldm.items()}
    assert mapped.keys() == ours.keys()
    for name, shape in mapped.items():
        assert shape in (ours[name].shape, (*ours[name].shape, 1, 1)), name
    assert all(ldm_vae_key(k) is None for k in OTHER_KEYS)


# --- bad input -------------------------------------------------------------------------------


def test_bad_config():
    bad = [
        dict(SD2_VAE_CONFIG, down_block_types=["AttnDownEncoderBlock2D"] * 4),
        dict(SD2_VAE_CONFIG, scaling_factor=0.13025),  # SDXL's VAE
        dict(SD2_VAE_CONFIG, _class_name="AutoencoderTiny"),
    ]
    for cfg in bad:
        with pytest.raises(ValueError, match="not supported"):
            VAEConfig.from_diffusers(cfg)


def test_bad_files(tiny, tmp_path):
    ref, folder = tiny
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        load_vae(str(tmp_path / "nowhere"))
    empty = write_folder(tmp_path / "empty", {}, name="other.safetensors")
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors"):
        load_vae(empty)
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=f"{missing}: no such file"):
        vae_from_single_file(missing, TINY)

    pickle = str(tmp_path / "pickle.safetensors")
    torch.save(ref.state_dict(), pickle)
    with pytest.raises(ValueError, match=f"{pickle}: not a readable safetensors file"):
        vae_from_single_file(pickle, TINY)
    truncated = str(tmp_path / "truncated.safetensors")
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{truncated}: not a readable safetensors file"):
        vae_from_single_file(truncated, TINY)


@pytest.mark.parametrize("what, key", [
    ("missing", "decoder.up_blocks.1.resnets.2.conv2.bias"),
    ("unexpected", "decoder.up_blocks.1.resnets.2.conv3.bias"),
    ("misshaped", "encoder.conv_in.weight"),
])
def test_bad_keys(tiny, tmp_path, what, key):
    ref, _ = tiny
    state = dict(ref.state_dict())
    if what == "missing":
        del state[key]
    elif what == "unexpected":
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(16, 3, 5, 5)
    folder = write_folder(tmp_path, state)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=f"{path}: 1 {what} keys .*{key}"):
        load_vae(folder)


# --- full size (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_sd2_decoder_matches_diffusers():
    """Full SD 2.0 decoder, random weights, 32x32 latent -> 256x256 image."""
    ref = diffusers_vae(SD2_VAE_CONFIG)
    randomize(ref)
    ours = VAE(SD2_VAE).eval()
    ours.load_state_dict(ref.state_dict())
    z = latents(1, 32)
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample, 1e-4, what="SD2 decode")
