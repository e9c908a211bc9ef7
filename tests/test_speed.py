"""The speed benchmark (python speed.py) and what makes a step fast and lean: FLOP counts against
diffusers' models, call counts per step, mixed precision, activation checkpointing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from conftest import tiny_pipeline
from PIL import Image

import dmap
import speed
import unet
import vae


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    tiny_pipeline(str(root))
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    return root


def test_flop_per_call_equals_diffusers_models_at_sd2_size():
    """FLOP of each call kind at 512 px (meta device) equal what the same counter finds on
    diffusers' UNet and VAE: 0.80 TFLOP for the UNet, 2.52 for the decoder, forward."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    abar = dmap.sd_abar()
    with torch.device("meta"):
        nets = dict(unet=unet.UNet(unet.SD2_UNET), vae=vae.VAE(vae.SD2_VAE),
                    context=torch.zeros(1, 77, 1024), abar=abar, prediction="eps", channels=4)
    flops = speed.call_flops(nets, 1, 512)
    theirs = {}
    with torch.device("meta"):
        d_unet = UNet2DConditionModel(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                      use_linear_projection=True).requires_grad_(False)
        d_vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                              down_block_types=["DownEncoderBlock2D"] * 4,
                              up_block_types=["UpDecoderBlock2D"] * 4).requires_grad_(False)
        # (module inputs computed from x, as ours: the counter's hooks refuse leaf inputs)
        for name, fn, x in (
                ("denoiser", lambda z: d_unet(z / 2**0.5, 500,
                                              encoder_hidden_states=nets["context"]).sample,
                 torch.zeros(1, 4, 64, 64)),
                ("decoder", lambda z: d_vae.decode(z / vae.SCALING_FACTOR).sample,
                 torch.zeros(1, 4, 64, 64)),
                ("encoder", lambda im: d_vae.encode(im * 1.0).latent_dist.mean,
                 torch.zeros(1, 3, 512, 512))):
            for grad in (False, True):
                with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
                    xg = x.requires_grad_(grad)
                    out = fn(xg)
                    if grad:
                        torch.autograd.grad(out, xg, torch.ones_like(out))
                theirs[f"{name} {'grad' if grad else 'fwd'}"] = counter.get_total_flops()
    assert flops == theirs
    assert flops["denoiser fwd"] / 1e12 == pytest.approx(0.80, abs=0.01)
    assert flops["decoder fwd"] / 1e12 == pytest.approx(2.52, abs=0.01)
    # A guided step differentiates w.r.t. x only: no weight gradients, so the backward costs
    # about one forward (6.79 TFLOP per DPS step; with weight gradients it would be 9.95).
    assert (flops["denoiser grad"] + flops["decoder grad"]) / 1e12 == pytest.approx(6.79, abs=0.01)


def test_benchmark_on_a_tiny_model(pipeline, tmp_path, capsys):
    """python speed.py at 64 px: each method's network calls per step are the algorithm's, FLOP
    are calls x FLOP per call (linear in the batch), and the table has every row."""
    out = tmp_path / "speed.json"
    argv = ["--model", str(pipeline), "--size", "64", "--methods",
            "ddpm,dps,dmap,dmap-same,psld", "--steps", "2", "--batch", "1", "2", "--json",
            str(out)]
    assert speed.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {(r["method"], r["batch"]): r for r in report["rows"]}
    assert sorted(rows) == sorted((m, b) for m in ("ddpm", "dps", "dmap", "dmap-same", "psld")
                                  for b in (1, 2))
    calls = {"ddpm": {"denoiser fwd": 1}, "dps": {"denoiser grad": 1, "decoder grad": 1},
             "dmap": {"denoiser fwd": 1, "denoiser grad": 3, "decoder grad": 3},  # K = 3
             "dmap-same": {"denoiser fwd": 1, "denoiser grad": 2, "decoder grad": 2},  # K = 2
             "psld": {"denoiser grad": 1, "decoder grad": 1, "encoder grad": 1}}
    per_image = {"ddpm": 500, "dps": 500, "dmap": 500, "dmap-same": 250, "psld": 500}
    for (method, batch), r in rows.items():
        assert r["calls"] == calls[method], method
        assert r["steps_per_image"] == per_image[method]
        assert len(r["step_seconds"]) == 2 and r["s_per_step"] > 0 and r["floor_s"] > 0
        assert r["flop"] == sum(n * report["call_flop"][k] * batch for k, n in r["calls"].items())
        assert r["s_per_image"] == pytest.approx(r["s_per_step"] * per_image[method] / batch)
    assert set(report["diffusers"]["calls"]) == {"denoiser fwd", "denoiser grad", "decoder fwd",
                                                 "decoder grad"}
    assert report["diffusers"]["dps"]["calls"] == calls["dps"]
    for ratio in report["diffusers"]["calls"].values():  # >= 3 alternating pairs, their median
        low, high = ratio["ratio_range"]
        assert ratio["pairs"] == 3 and low <= ratio["ratio"] <= high
    table = capsys.readouterr().out
    assert all(f"| {m} | none |" in table for m in per_image) and "ours / diffusers" in table
    assert speed.main(argv) == 2  # the report exists: refused without --force
    assert "pass --force" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_rows(pipeline, tmp_path, capsys):
    """--compile: after the eager rows, the same method with the networks compiled, the same
    calls per step, its compile time (the first step less a step) and the line comparing it."""
    out = tmp_path / "speed.json"
    assert speed.main(["--model", str(pipeline), "--size", "64", "--methods", "dps", "--steps",
                       "2", "--no-diffusers", "--compile", "--json", str(out)]) == 0
    eager, compiled = json.loads(out.read_text())["rows"]
    assert not eager["compiled"] and compiled["compiled"]
    assert compiled["calls"] == eager["calls"] == {"denoiser grad": 1, "decoder grad": 1}
    assert compiled["compile_s"] == pytest.approx(compiled["first_step_s"] -
                                                  compiled["s_per_step"])
    assert compiled["compile_s"] > 10 * compiled["s_per_step"]  # the first step compiles
    table = capsys.readouterr().out
    assert "| dps compiled | none | 1 |" in table and "x the uncompiled step" in table


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps and --batch must be >= 1"),
    (["--random-weights", "--model", "x"], "not both"),
    (["--methods", "dps,cse"], "drop the CSE methods"),
    (["--methods", "dps,nope"], "unknown method nope"),
    (["--methods", "dps,dps"], "distinct names"),
    (["--size", "60"], "multiple of 8"),
])
def test_benchmark_bad_input(extra, message, capsys):
    assert speed.main(["--size", "64", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=0), "--steps and --batch must be >= 1"),
    (dict(methods=["dps", "dmap+cse"]), "drop the CSE methods"),
    (dict(checkpointing="some"), "--checkpointing must be one of"),
    (dict(op="nonlinear_blur"), "--op must be one of"),
    (dict(dtype="float64"), "--dtype must be one of"),
])
def test_benchmark_function_refuses_bad_input_before_it_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        speed.benchmark(size=64, **kwargs)


def test_the_command_runs_as_a_script_without_eval():
    """python speed.py is a command of its own; speed.py sits below eval.py (no import of it)."""
    done = subprocess.run([sys.executable, "speed.py", "--help"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(speed.__file__)))
    assert done.returncode == 0 and "--random-weights" in done.stdout, done.stderr
    code = "import sys, speed; assert 'eval' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(
        os.path.abspath(speed.__file__))).returncode == 0


def test_bfloat16_networks_keep_float32_latents_and_the_answer(pipeline, tmp_path):
    """--dtype bfloat16 runs the networks in bf16 and keeps x, x0_hat and the guidance in
    float32; the DPS gradient on the astronaut has cosine >= 0.99 with the float32 one at sigma
    14, 1 and 0.1, and a whole tiny restoration stays close to the float32 one."""
    nets32 = speed.our_networks(torch.device("cpu"), torch.float32, model=str(pipeline))
    nets16 = speed.our_networks(torch.device("cpu"), torch.bfloat16, model=str(pipeline))
    x_ref = dmap.read_image(str(pipeline / "astronaut.png"), 64)
    cosines = speed.gradient_cosines(nets32, nets16, x_ref)
    assert min(cosines.values()) >= 0.99, cosines
    sd = dmap.load_sd2(str(pipeline), dtype=torch.bfloat16)
    denoiser = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar)
    x = torch.randn(1, 4, 8, 8)
    assert denoiser(x, 1.0).dtype == torch.float32 and sd.decode(x).dtype == torch.float32

    restored = {}
    for dtype in ("float32", "bfloat16"):
        argv = [str(pipeline / "astronaut.png"), "--model", str(pipeline), "--method", "dps",
                "--op", "sr", "--size", "64", "--steps", "20", "--dtype", dtype, "--out",
                str(tmp_path / dtype), "--name", "r"]
        assert dmap.main(argv) == 0
        restored[dtype] = np.asarray(Image.open(tmp_path / dtype / "r.png"), dtype=np.float64)
    rmse = np.sqrt(((restored["float32"] - restored["bfloat16"]) ** 2).mean())
    assert rmse < 2.0, rmse  # of 255


def test_decoder_checkpointing_changes_nothing():
    """The decoder's per-layer activation checkpointing recomputes what it dropped: the same
    image and the same gradient w.r.t. the latent."""
    torch.manual_seed(0)
    model = vae.VAE(vae.TINY).requires_grad_(False)
    z = torch.randn(2, 4, 8, 8)
    grads, images = [], []
    for on in (False, True):
        model.decoder.gradient_checkpointing = on
        zg = z.clone().requires_grad_(True)
        image = model.decode(zg)
        grads.append(torch.autograd.grad(image.square().sum(), zg)[0])
        images.append(image.detach())
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)
