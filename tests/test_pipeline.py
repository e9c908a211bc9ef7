"""The SD 2.0 pipeline: load_sd2 on a tiny model in the official folder layout, one DPS step
against diffusers' own scheduler, UNet and VAE, and the restoration command end to end."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import (
    SD2_SCHEDULER,
    assert_close,
    ldm_state,
    openclip_state,
    random_ldm_state,
    tiny_pipeline,
)
from PIL import Image

import clip
import dmap
import operators
import vae


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd2"))
    return root, tiny_pipeline(root)


def test_load_sd2_folder(pipeline):
    root, (_, _, text) = pipeline
    sd = dmap.load_sd2(root)
    assert sd.prediction == "eps" and len(sd.abar) == 1000
    ids = sd.tokenizer([""])
    assert ids[0, :3].tolist() == [512, 513, 0]  # bos, eos, pad 0
    with torch.no_grad():
        assert_close(dmap.encode_prompt(sd, ""), text(ids).last_hidden_state, 1e-5,
                     what="context")
    with pytest.raises(ValueError, match="prediction_type"):
        dmap.load_sd2(root, prediction="v")


def test_dps_step_equals_diffusers(pipeline):
    """One DPS step written with diffusers' scheduler, UNet and VAE in the official order
    (pipe.py:4100-4140) gives the same next latent as our dps on the same weights and noise."""
    from diffusers import EulerAncestralDiscreteScheduler

    root, (d_unet, d_vae, text) = pipeline
    sd = dmap.load_sd2(root)
    op = operators.Blur(size=32, kernel_size=9, std=1.0)
    x_ref = torch.rand(1, 3, 32, 32) * 2 - 1
    y, zeta, steps = op(x_ref), 0.7, 50
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD2_SCHEDULER)
    scheduler.set_timesteps(steps)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.sigmas[0]
    with torch.no_grad():
        context = text(sd.tokenizer([""])).last_hidden_state
    for i in (0, 17):  # the first step and one in the middle
        scheduler._step_index = i
        t = scheduler.timesteps[i]
        zg = z.clone().requires_grad_(True)
        eps = d_unet(scheduler.scale_model_input(zg, t), t, encoder_hidden_states=context).sample
        out = scheduler.step(eps, t, zg, generator=torch.Generator().manual_seed(i))
        image = d_vae.decode(out.pred_original_sample / 0.18215).sample
        (grad,) = torch.autograd.grad(torch.linalg.norm(op(image) - y), zg)
        reference = out.prev_sample.detach() - zeta * grad

        denoiser = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar, sd.prediction)
        sigmas = dmap.sd_sigmas(steps, sd.abar)[i:i + 2]
        ours = dmap.dps(denoiser, z, y, lambda z0: op(sd.vae.decode(z0 / vae.SCALING_FACTOR)),
                        sigmas, zeta=zeta, generator=torch.Generator().manual_seed(i))
        assert_close(ours, reference, 1e-4, what=f"DPS step {i}")
        z = reference


@pytest.mark.parametrize("method", sorted(dmap.SAMPLERS))
def test_every_sampler_on_tiny_sd(pipeline, method):
    """Each sampler runs on load_sd2-built parts: finite, the latent's shape, seeded."""
    sd = dmap.load_sd2(pipeline[0])
    denoiser = dmap.SDDenoiser(sd.unet, dmap.encode_prompt(sd, ""), sd.abar, sd.prediction)
    op = operators.SR(size=32, factor=4)
    y = op(torch.rand(1, 3, 32, 32) * 2 - 1)
    kwargs = {"resample": dict(iters=5)}.get(method, {})
    kwargs |= dmap.model_parts(method, H=op, adjoint=op.adjoint, decode=sd.decode,
                               encode=sd.encode)
    sigmas = dmap.sd_sigmas(4, sd.abar)
    outs = [dmap.SAMPLERS[method](denoiser, sigmas[0] * torch.randn(
        1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), y,
        lambda z: op(sd.decode(z)), sigmas, generator=torch.Generator().manual_seed(1),
        **kwargs) for _ in range(2)]
    assert outs[0].shape == (1, 4, 4, 4) and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def astronaut_file(tmp_path, crop=(slice(None), slice(None))):
    from skimage.data import astronaut

    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()[crop]).save(path)
    return path


def test_cli_end_to_end(pipeline, tmp_path, capsys):
    root, _ = pipeline
    image = astronaut_file(tmp_path, (slice(0, 400), slice(50, 500)))  # not square: cropped
    out = tmp_path / "out"
    args = [str(image), "--model", root, "--out", str(out), "--size", "64", "--steps", "4",
            "--device", "cpu"]
    assert dmap.main(args + ["--method", "dmap", "--op", "sr"]) == 0
    stem = "astronaut_dmap_sr_size64_steps4"  # the settings that differ from the defaults
    record = json.loads((out / f"{stem}.json").read_text())
    assert record["sampler"] == dict(eta=1.0, zeta=4.8, K=3, steps=4)
    assert record["operator"] == dict(size=64, factor=8) and record["image"] == str(image)
    assert np.isfinite(record["psnr"]) and record["outputs"][-1] == f"{stem}.json"
    last = capsys.readouterr().out.strip().split("\n")[-1]
    assert last.startswith(f"wrote {stem}.png, ") and "PSNR" in last and "s in all" in last
    restored = np.asarray(Image.open(out / f"{stem}.png"))
    assert restored.shape == (64, 64, 3)
    assert np.asarray(Image.open(out / f"{stem}_y.png")).shape == (8, 8, 3)
    panel = np.asarray(Image.open(out / f"{stem}_panel.png"))
    assert panel.shape[0] > 64 and panel.shape[1] > 3 * 64  # titles over, lines between
    # nothing is overwritten without --force; with it, the same seed gives the same image
    before = (out / f"{stem}.png").stat().st_mtime_ns
    assert dmap.main(args + ["--method", "dmap", "--op", "sr"]) == 2
    assert (out / f"{stem}.png").stat().st_mtime_ns == before
    assert dmap.main(args + ["--method", "dmap", "--op", "sr", "--force"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / f"{stem}.png")), restored)
    # a sweep needs no new --out: each setting names its files; --name names them directly
    for zeta in ("1", "2"):
        assert dmap.main(args + ["--method", "dps", "--op", "sr", "--zeta", zeta]) == 0
        assert (out / f"astronaut_dps_sr_size64_steps4_zeta{zeta}.png").exists()
    assert dmap.main(args + ["--method", "ddpm", "--op", "blur", "--name", "plain"]) == 0
    record = json.loads((out / "plain.json").read_text())
    assert record["sampler"] == dict(eta=1.0, steps=4)
    assert record["operator"] == dict(size=64, std=3.0)
    # PSLD takes the pixel operator and its adjoint; --observed reads the image as y
    assert dmap.main(args + ["--method", "psld", "--op", "inpaint_random"]) == 0
    assert dmap.main([str(out / f"{stem}_y.png"), "--observed", "--model", root, "--out",
                      str(out), "--size", "64", "--steps", "2", "--method", "dps", "--op", "sr",
                      "--name", "observed"]) == 0
    assert "psnr" not in json.loads((out / "observed.json").read_text())
    assert "PSNR" not in capsys.readouterr().out.strip().split("\n")[-1]


@pytest.mark.parametrize("size", [64, 128])
def test_inpaint_box_scales_with_the_image(pipeline, tmp_path, size):
    root, _ = pipeline
    image = astronaut_file(tmp_path)
    assert dmap.main([str(image), "--model", root, "--out", str(tmp_path), "--size", str(size),
                      "--steps", "2", "--method", "dps", "--op", "inpaint", "--name", "a"]) == 0
    y = np.asarray(Image.open(tmp_path / "a_y.png"))
    hole = (y == 127) | (y == 128)  # masked pixels are 0 in [-1, 1]
    assert hole.all(axis=2).sum() == (size // 4) ** 2


def test_cli_ctrl_c(pipeline, tmp_path, capsys, monkeypatch):
    """Ctrl-C while sampling: one line, exit code 130, nothing written (not even the folder)."""
    root, _ = pipeline
    dps = dmap.SAMPLERS["dps"]

    def interrupted(*args, callback, **kwargs):
        def stop(d):  # Ctrl-C during the second step, before it is done
            if d["i"] == 1:
                raise KeyboardInterrupt
            callback(d)
        return dps(*args, callback=stop, **kwargs)

    monkeypatch.setitem(dmap.SAMPLERS, "dps", interrupted)
    out = tmp_path / "o"
    assert dmap.main([str(astronaut_file(tmp_path)), "--model", root, "--out", str(out),
                      "--size", "64", "--steps", "3", "--method", "dps"]) == 130
    last = capsys.readouterr().err.strip().split("\n")[-1]
    assert last == "interrupted at step 2 of 3; nothing written"
    assert not out.exists()


@pytest.mark.parametrize("full", ["panel", "record"])
def test_full_disk_writes_nothing(pipeline, tmp_path, capsys, monkeypatch, full):
    """No space left while the outputs are written: one line, exit 2, none of the four files
    (those written before the failure are removed again), so a rerun is not refused."""
    import cli

    import errno

    real = cli.write_atomic

    def write_atomic(path, save):
        if path.endswith("_panel.png" if full == "panel" else ".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, save)

    monkeypatch.setattr(cli, "write_atomic", write_atomic)
    root, _ = pipeline
    out = tmp_path / "o"
    assert dmap.main([str(astronaut_file(tmp_path)), "--model", root, "--out", str(out),
                      "--size", "64", "--steps", "2", "--method", "ddpm"]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]
    assert last.startswith("error: cannot write ") and "No space left on device" in last, last
    assert "nothing written" in last and list(out.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent"], "/nonexistent: no such file or folder; check --model (to get"),
    (["--zeta", "-1"], "--zeta must be >= 0"),
    (["--steps", "-3"], "--steps must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--method", "freedom", "--window", "0.2", "1.5"], "loop fractions"),
    (["--method", "freedom", "--repeats", "0"], "--repeats must be >= 1"),
    (["--K", "0"], "--K must be >= 1"),
    (["--method", "dps", "--K", "2"], "--K does not apply"),
    (["--method", "ddpm", "--zeta", "1"], "--zeta does not apply to --method ddpm"),
    (["--op", "blur", "--sr-factor", "5"], "--sr-factor applies to --op sr only"),
    (["--op", "blur", "--kernel-weights", "k.safetensors"], "applies to --op nonlinear_blur"),
    (["--method", "dps", "--dmap-setting", "same"], "--dmap-setting does not apply"),
    (["--observed", "--sigma-y", "0.1"], "with --observed, y is read as it is"),
    (["--sigma-y", "-0.1"], "--sigma-y must be >= 0"),
    (["--op", "nonlinear_blur", "--size", "128"], "GOPRO_wVAE.safetensors: no such file; "
     "nonlinear_blur needs bkse's KernelWizard weights converted to safetensors once (README"),
    (["--zeta", "1e30", "--method", "dps"], "try a smaller --zeta"),
    (["--out", "/proc/forbidden"], "cannot create files under /proc"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "try --device cpu"),
    (["--device", "banana"], "try --device cpu"),
    (["--compile", "--checkpointing", "vae"], "--compile and --checkpointing cannot be combined"),
])
def test_cli_bad_input(pipeline, tmp_path, capsys, extra, message):
    from skimage.data import astronaut

    root, _ = pipeline
    image = tmp_path / "a.png"
    Image.fromarray(astronaut()).save(image)
    args = [str(image), "--model", root, "--out", str(tmp_path / "o"), "--size", "64",
            "--steps", "3", "--device", "cpu"]
    assert dmap.main(args + extra) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]  # after any progress bar
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "o").exists()  # the output folder is made only to write outputs


def test_compile_without_a_compiler(pipeline, tmp_path, capsys, monkeypatch):
    """--compile on a CPU machine without a C++ compiler: one line that says what to do."""
    root, _ = pipeline
    image = astronaut_file(tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(dmap.shutil, "which", lambda name: None)
    assert dmap.main([str(image), "--model", root, "--out", str(tmp_path / "o"), "--size",
                      "64", "--steps", "2", "--device", "cpu", "--compile"]) == 2
    assert capsys.readouterr().err.strip().split("\n")[-1] == (
        "error: --compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX): "
        "install one, or run without --compile")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dps", "dmap"])
def test_compiled_restoration_equals_eager(pipeline, tmp_path, method):
    """restore(compile=True) on the tiny pipeline (UNet and decoder compiled, with and without
    a gradient) restores the image of the uncompiled run, up to rounding."""
    root, _ = pipeline
    image = astronaut_file(tmp_path)
    kwargs = dict(model=root, method=method, op="sr", size=64, steps=3, device="cpu")
    eager = dmap.restore(str(image), **kwargs)
    compiled = dmap.restore(str(image), compile=True, **kwargs)
    assert compiled["record"]["compile"] and not eager["record"]["compile"]
    diff = np.abs(compiled["restored"].astype(int) - eager["restored"].astype(int))
    print(f"{method}: max |diff| {diff.max()} of 255, mean {diff.mean():.4f}")
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert abs(compiled["record"]["psnr"] - eager["record"]["psnr"]) < 0.01


def test_cli_bad_images(pipeline, tmp_path, capsys):
    root, _ = pipeline
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("empty.png", "text.png", "missing.png"):
        assert dmap.main([str(tmp_path / name), "--model", root, "--out", str(tmp_path)]) == 2
        assert "cannot read image" in capsys.readouterr().err
    Image.new("RGB", (40, 300)).save(tmp_path / "thin.png")
    assert dmap.main([str(tmp_path / "thin.png"), "--model", root, "--size", "64",
                      "--out", str(tmp_path)]) == 2
    assert "smaller than the 64x64" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown method, exit code 2
        dmap.parse_args(["a.png", "--method", "nope"])


def test_read_image_modes(tmp_path):
    """Grayscale, RGBA and 16-bit images all come back as (1, 3, size, size) in [-1, 1]."""
    gray = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
    for name, image in (("g.png", Image.fromarray(gray)),
                        ("rgba.png", Image.fromarray(np.dstack([gray] * 4))),
                        ("16.png", Image.fromarray(gray.astype(np.uint16) * 257))):
        image.save(tmp_path / name)
        x = dmap.read_image(str(tmp_path / name), 32)
        assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
        assert_close(x[0, 0], x[0, 2], 1e-6, what=name)  # gray stays gray
    a, b = (dmap.read_image(str(tmp_path / n), 32) for n in ("g.png", "16.png"))
    assert_close(a, b, 1e-2, rel=False, what="16-bit = 8-bit")


def test_load_sd2_single_file(tmp_path, monkeypatch):
    """One LDM checkpoint holds all three parts; load_sd2 splits it, defaults to eps, and encodes
    the empty prompt without a tokenizer (tiny configs patched in for the full-size ones)."""
    import functools

    from safetensors.torch import save_file

    import unet

    torch.manual_seed(0)
    text = {k: v for k, v in openclip_state(clip.TINY, torch.Generator().manual_seed(0)).items()
            if k.startswith("cond_stage_model.")}
    autoencoder = {f"first_stage_model.{k}": v for k, v in random_ldm_state(vae.TINY).items()}
    state = ldm_state(unet.UNet(unet.TINY).state_dict()) | autoencoder | text
    path = tmp_path / "512-base-ema.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    for module, name, config in ((unet, "unet_from_single_file", unet.TINY),
                                 (vae, "vae_from_single_file", vae.TINY),
                                 (clip, "text_encoder_from_single_file", clip.TINY)):
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), config=config))
    sd = dmap.load_sd2(str(path))
    assert sd.prediction == "eps" and sd.tokenizer is None
    assert torch.equal(sd.vae.decoder.conv_out.weight,
                       state["first_stage_model.decoder.conv_out.weight"])
    assert dmap.encode_prompt(sd, "").shape == (1, 77, clip.TINY.width)
    with pytest.raises(ValueError, match="tokenizer/ folder"):
        dmap.encode_prompt(sd, "a photo")
    assert dmap.load_sd2(str(path), prediction="v", dtype=torch.float16).prediction == "v"


def test_help_shows_every_default(capsys):
    """Every option but the switches states its default in --help."""
    import re

    with pytest.raises(SystemExit):
        dmap.parse_args(["--help"])
    text = capsys.readouterr().out.split("options:")[1]
    entries = re.split(r"\n  (?=--)", text)[1:]  # one per option, wrapped lines included
    assert len(entries) == 32
    for entry in entries:
        flag = entry.split()[0]
        assert "default" in entry or flag in ("--force", "--observed", "--no-crop",
                                              "--compile"), flag
    text = " ".join(text.split())
    assert "(default: 200)" in text and "(default: 0.2 0.5)" in text  # read from the samplers


def test_shipped_prior_restores_the_example(tmp_path):
    """The first screen's command: DMAP deblurs models/mini-prior/example.png with the shipped
    prior's own defaults (32 px, 25 steps, blur std 1, its tuned zeta) to the PSNR the README
    states (25.44 dB on an AMD EPYC; other CPUs round differently), far above the unguided
    sampler's, and DMAP above DPS."""
    prior = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                         "mini-prior")
    psnr = {}
    for method in ("dmap", "dps", "ddpm"):
        assert dmap.main([os.path.join(prior, "example.png"), "--model", prior,
                          "--method", method, "--op", "blur", "--out", str(tmp_path)]) == 0
        with open(tmp_path / f"example_{method}_blur.json") as f:
            record = json.load(f)
        psnr[method] = record["psnr"]
    assert record["operator"] == {"size": 32, "std": 1.0} and record["sampler"]["steps"] == 25
    assert abs(psnr["dmap"] - 25.44) < 0.3 and psnr["dmap"] > psnr["dps"] > psnr["ddpm"] + 8, psnr
