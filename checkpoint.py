"""Reading checkpoints: shared by every model file (unet.py, vae.py, clip.py, operators.py).

A diffusers model folder is config.json + `*.safetensors`; a single-file checkpoint is one
safetensors file with its own key names. `load_state` copies the tensors of either into a model
built on the meta device, one tensor at a time, under the names a `rename` function gives; every
way a file can be wrong (missing, truncated, a pickle, wrong keys or shapes) ends in one
ValueError that names the file and says what to do.
"""

import json
import os
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn


def read_config(folder: str, name: str = "config.json") -> dict:
    """The config.json (or another JSON file `name`) of a diffusers model folder, with a
    one-line error when it is not there or not JSON."""
    path = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder; check the path")
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no {name}; expected a diffusers model folder "
                         "(config.json + *.safetensors)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-download it") from None


def find_weights(folder: str, stem: str) -> str:
    """The weights of a diffusers folder: `stem.safetensors`, else `stem.fp16.safetensors`."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if os.path.isfile(os.path.join(folder, f"{stem}.bin")):
        raise ValueError(f"{folder}: only the pickle file {stem}.bin is there; download "
                         f"{stem}.safetensors instead (pickles are not loaded)")
    raise ValueError(f"{folder}: no {stem}.safetensors; download the model folder again")


def open_checkpoint(path: str):
    """Open a safetensors file lazily (tensors are read one at a time, never all at once)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; check the path")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({str(e)[:80]}); "
                         "it may be truncated or a pickle; re-download it") from None


# rename(file_key) -> our key, None to skip the tensor, or {our_key: fn(tensor)} to split one
# tensor into several (OpenCLIP's fused q/k/v projection).
Rename = Callable[[str], "str | None | dict[str, Callable[[torch.Tensor], torch.Tensor]]"]


def load_state(model: nn.Module, path: str, rename: Rename, device=None, dtype=None) -> nn.Module:
    """Copy the tensors of the safetensors file `path` into `model` (built on the meta device).

    Each tensor is read, converted to `dtype` on `device` and assigned, so peak memory is one
    copy of the weights plus one tensor. A 1x1-conv weight fills a Linear weight of the same
    numel (LDM VAE attention). Missing, unexpected or misshaped keys end in one ValueError that
    names the file and the first offending keys.
    """
    ours = model.state_dict(keep_vars=True)
    state, unexpected, misshaped = {}, [], []
    with open_checkpoint(path) as f:
        for key in f.keys():
            target = rename(key)
            if target is None:
                continue
            fns = {target: None} if isinstance(target, str) else target
            if any(name not in ours for name in fns):
                unexpected.append(key)
                continue
            tensor = f.get_tensor(key)
            for name, fn in fns.items():
                if name in state:
                    raise ValueError(f"{path}: {key} gives {name} a second time; the file mixes "
                                     "two layouts; re-download it")
                t = tensor if fn is None else fn(tensor)
                want = ours[name].shape
                if t.shape != want:
                    if t.shape == (*want, 1, 1):
                        t = t.reshape(want)  # LDM 1x1 conv -> Linear
                    else:
                        misshaped.append(f"{key} {tuple(t.shape)} (expected {tuple(want)})")
                        continue
                use_dtype = dtype if t.is_floating_point() and dtype is not None else t.dtype
                state[name] = t.to(device=device, dtype=use_dtype)
    missing = [k for k in ours if k not in state]
    for what, keys in (("misshaped", misshaped), ("unexpected", unexpected), ("missing", missing)):
        if keys:
            raise ValueError(f"{path}: {len(keys)} {what} keys for {type(model).__name__}, "
                             f"first: {', '.join(keys[:3])}; is this the right model file?")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
