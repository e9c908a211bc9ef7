"""CSE training, the self-generated data set and restoration with a CSE, on a tiny SD 2.0 in the
official folder layout and real photographs (scikit-image): the loss goes down, checkpoints load
in diffusers, a resumed run equals the uninterrupted one bit for bit, two processes equal one,
and one DPS+CSE step equals the authors' order written with diffusers."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import skimage.data
import torch
from conftest import SD2_SCHEDULER, assert_close, randomize, tiny_pipeline
from PIL import Image
from safetensors.torch import load_file

import cse
import dmap
import operators
from controlnet import from_unet, load_controlnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat",
          "immunohistochemistry")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny pipeline folder, folder of 7 photographs, the diffusers UNet and VAE)."""
    root = str(tmp_path_factory.mktemp("sd2"))
    d_unet, d_vae, _ = tiny_pipeline(root)
    images = str(tmp_path_factory.mktemp("photos"))
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(images, name + ".png"))
    return root, images, d_unet, d_vae


def train_argv(setup, out, *extra):
    root, images, _, _ = setup
    return ["train", "--model", root, "--images", images, "--out", str(out), "--size", "64",
            "--num-images", "5", "--batch", "4", "--micro-batch", "2", "--lr", "1e-3",
            "--steps", "3", "--checkpoint-every", "1", "--validate-every", "0", "--device", "cpu",
            *extra]


def weights(checkpoint) -> dict:
    return load_file(os.path.join(checkpoint, "controlnet", "diffusion_pytorch_model.safetensors"))


def error_line(capsys) -> str:
    """The one `error:` line a failed command printed (after the progress bar), no traceback."""
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def fixed_loss(root, images, controlnet) -> float:
    """The loss on 16 fixed samples (indices far from those trained on)."""
    sd = dmap.load_sd2(root)
    op = operators.SR(size=64)
    with torch.no_grad():
        return cse.batch_losses(controlnet, sd, dmap.encode_prompt(sd, ""), images, op,
                                {"size": 64, "factor": 8}, range(10**6, 10**6 + 16), 64, 7,
                                contextlib.nullcontext).mean().item()


def test_loss_goes_down(setup, tmp_path):
    """40 steps on 5 photos: the loss on fixed held samples falls by more than 15%."""
    root, images_dir, _, _ = setup
    argv = train_argv(setup, tmp_path, "--steps", "40", "--checkpoint-every", "40")
    assert cse.main(argv) == 0
    images, _ = cse.choose_images(images_dir, 5)
    fresh = from_unet(dmap.load_sd2(root).unet)
    trained = load_controlnet(str(tmp_path / "checkpoint-40" / "controlnet"))
    before, after = fixed_loss(root, images, fresh), fixed_loss(root, images, trained)
    print(f"fixed-sample loss {before:.4f} -> {after:.4f}")
    assert after < 0.85 * before
    info = json.load(open(tmp_path / "checkpoint-40" / "cse.json"))
    assert (info["op"], info["size"], info["n"], info["step"]) == ("sr", 64, 5, 40)
    assert len(info["train_images"]) == 5


def test_checkpoint_loads_in_diffusers(setup, tmp_path):
    """What we save is a diffusers ControlNetModel folder: from_pretrained reads it, with the
    same residuals as ours."""
    from diffusers import ControlNetModel

    assert cse.main(train_argv(setup, tmp_path, "--steps", "1")) == 0
    folder = str(tmp_path / "checkpoint-1" / "controlnet")
    theirs, ours = ControlNetModel.from_pretrained(folder).eval(), load_controlnet(folder)
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        down, mid = theirs(x, 500, context, hint, return_dict=False)
        our_down, our_mid = ours(x, 500, context, hint)
    for a, b in zip(our_down + [our_mid], list(down) + [mid], strict=True):
        assert_close(a, b, 1e-5, what="residual")
    assert max(r.abs().max().item() for r in our_down) > 0  # trained: the zero convs moved


def test_resume_is_exact(setup, tmp_path, monkeypatch, capsys):
    """Killed in step 3 (Ctrl-C), resumed with --resume: checkpoint-3 is bit-identical to the
    uninterrupted run's; a half-written checkpoint folder is ignored; only the two newest
    checkpoints keep the optimizer state."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert cse.main(train_argv(setup, whole)) == 0
    calls, real = [], cse.batch_losses

    def interrupted(*args, **kwargs):  # 2 micro-batches per step: the 5th call is step 3
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cse, "batch_losses", interrupted)
    assert cse.main(train_argv(setup, broken)) == 130
    assert "at step 3 of 3" in capsys.readouterr().err
    monkeypatch.setattr(cse, "batch_losses", real)
    (broken / ".checkpoint-3" / "controlnet").mkdir(parents=True)  # a kill while writing
    assert cse.main(train_argv(setup, broken, "--resume")) == 0
    a, b = weights(whole / "checkpoint-3"), weights(broken / "checkpoint-3")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["controlnet_mid_block.weight"],
                           weights(whole / "checkpoint-2")["controlnet_mid_block.weight"])
    states = sorted(p.parent.name for p in broken.glob("checkpoint-*/state.pt"))
    assert states == ["checkpoint-2", "checkpoint-3"]


def test_two_processes_equal_one(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on the CPU) at the same effective batch gives the
    training of one process, to float tolerance (only the gradient sums' order differs)."""
    one, two = tmp_path / "one", tmp_path / "two"
    argv = train_argv(setup, one, "--steps", "2", "--micro-batch", "1")
    assert cse.main(argv) == 0
    argv = train_argv(setup, two, "--steps", "2", "--micro-batch", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", os.path.join(ROOT, "cse.py"), *argv],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # The second step's update, all tensors together: Adam turns a rounding-level gradient
    # into a full step of either sign, so single weights may differ by 2 lr; the update may not.
    a1, a2, b2 = (weights(d / f"checkpoint-{k}") for d, k in ((one, 1), (one, 2), (two, 2)))
    update = torch.cat([(a2[k] - a1[k]).flatten() for k in a2])
    error = torch.cat([(b2[k] - a2[k]).flatten() for k in a2])
    print(f"update norm {update.norm():.4g}, difference {error.norm():.3g}")
    assert error.norm() < 1e-3 * update.norm()


def test_dps_cse_step_equals_diffusers(setup):
    """One DPS+CSE step in the authors' order (pipe.py:1687-1737): diffusers ControlNetModel
    residuals into UNet2DConditionModel, EulerAncestralDiscreteScheduler.step, the VAE decode of
    pred_original_sample, the gradient of ||y - A(x0_hat)|| w.r.t. the latent; against dmap.dps
    with dmap.CSEDenoiser on our loaded copies of the same weights and the same noise."""
    from diffusers import ControlNetModel, EulerAncestralDiscreteScheduler

    root, _, d_unet, d_vae = setup
    d_cn = randomize(ControlNetModel.from_unet(d_unet), seed=5)
    folder = os.path.join(root, "controlnet_test")
    d_cn.save_pretrained(folder, safe_serialization=True)
    sd = dmap.load_sd2(root)
    controlnet = load_controlnet(folder)
    op = operators.SR(size=32, factor=4)
    x_ref = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y, zeta, steps = op(x_ref), 0.7, 50
    hint = op.hint(y)
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD2_SCHEDULER)
    scheduler.set_timesteps(steps)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.sigmas[0]
    context = dmap.encode_prompt(sd, "")
    denoiser = dmap.CSEDenoiser(sd.unet, controlnet, context, sd.abar, hint, sd.prediction)
    for i in (0, 17):
        scheduler._step_index = i
        t = scheduler.timesteps[i]
        zg = z.clone().requires_grad_(True)
        z_in = scheduler.scale_model_input(zg, t)
        down, mid = d_cn(z_in, t, context, hint, return_dict=False)
        eps = d_unet(z_in, t, context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample
        out = scheduler.step(eps, t, zg, generator=torch.Generator().manual_seed(i))
        image = d_vae.decode(out.pred_original_sample / 0.18215).sample
        (grad,) = torch.autograd.grad(torch.linalg.norm(op(image) - y), zg)
        reference = out.prev_sample.detach() - zeta * grad
        ours = dmap.dps(denoiser, z, y, lambda z0: op(sd.decode(z0)),
                        dmap.sd_sigmas(steps, sd.abar)[i:i + 2], zeta=zeta,
                        generator=torch.Generator().manual_seed(i))
        assert_close(ours, reference, 1e-4, what=f"DPS+CSE step {i}")
        z = reference


def test_restore_with_cse(setup, tmp_path, capsys):
    """dmap.py --cse: the record names the CSE; CSE alone (ddpm) differs from plain ddpm; a CSE
    trained for another operator or size is refused in one line."""
    root, images, _, _ = setup
    assert cse.main(train_argv(setup, tmp_path / "run", "--steps", "1")) == 0
    checkpoint = str(tmp_path / "run" / "checkpoint-1")
    image = os.path.join(images, "astronaut.png")
    common = [image, "--model", root, "--op", "sr", "--size", "64", "--steps", "3", "--out",
              str(tmp_path / "out"), "--method", "ddpm", "--device", "cpu"]
    assert dmap.main(common + ["--cse", checkpoint, "--name", "cse"]) == 0
    assert dmap.main(common + ["--name", "plain"]) == 0
    record = json.load(open(tmp_path / "out" / "cse.json"))
    assert record["cse"] == dict(path=checkpoint, step=1, images=5)
    a = np.asarray(Image.open(tmp_path / "out" / "cse.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "plain.png"))
    assert (a != b).any()
    capsys.readouterr()
    for extra, message in ((["--op", "blur"], "trained for --op sr at --size 64; this run is "
                            "--op blur at --size 64"),
                           (["--size", "128"], "trained for --op sr at --size 64; this run is "
                            "--op sr at --size 128")):
        assert dmap.main(common + extra + ["--cse", checkpoint, "--force"]) == 2
        assert message in capsys.readouterr().err


def test_generate_resumes(setup, tmp_path, capsys):
    """generate writes image i from seed + i: a deleted image comes back identical, the others
    are not redone."""
    root = setup[0]
    argv = ["generate", "--model", root, "--out", str(tmp_path), "--n", "3", "--steps", "2",
            "--size", "32", "--device", "cpu"]
    assert cse.main(argv) == 0
    first = (tmp_path / "000001.png").read_bytes()
    os.remove(tmp_path / "000001.png")
    assert cse.main(argv) == 0
    assert "wrote 1 new image(s)" in capsys.readouterr().out
    assert (tmp_path / "000001.png").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png", "000002.png"]


def test_generate_interrupted(setup, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second image: exit 130, one line that counts the image kept and says how
    to go on."""
    calls, real = [], dmap.ddpm

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dmap, "ddpm", interrupted)
    argv = ["generate", "--model", setup[0], "--out", str(tmp_path), "--n", "3", "--steps", "2",
            "--size", "32", "--device", "cpu"]
    assert cse.main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"interrupted after 1 new image(s) in {tmp_path}; the same command writes "
                    "the rest")
    assert os.listdir(tmp_path) == ["000000.png"]


def test_augmentation(tmp_path):
    """The torchvision fallback crop (a scale no box can meet: the centre crop of the nearest
    allowed ratio), the flip and jitter ranges, and reproducibility from the generator."""
    image = Image.fromarray(skimage.data.astronaut()).resize((200, 100))
    g = torch.Generator().manual_seed(0)
    crop = cse.random_resized_crop(image, 64, g, scale=(5.0, 6.0))
    expected = image.crop((33, 0, 166, 100)).resize((64, 64), Image.BILINEAR)  # 4/3 of 100
    assert np.array_equal(np.asarray(crop), np.asarray(expected))
    same = cse.color_jitter(image, torch.Generator().manual_seed(0), strength=0.0)
    # factors 1 and hue 0: only the HSV round trip's rounding is left
    assert np.abs(np.asarray(same, dtype=int) - np.asarray(image, dtype=int)).max() <= 6
    path = tmp_path / "a.png"
    image.save(path)
    a = cse.augment(str(path), 64, torch.Generator().manual_seed(3))
    b = cse.augment(str(path), 64, torch.Generator().manual_seed(3))
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1


def test_bad_input(setup, tmp_path, capsys):
    """One line each, exit code 2: an empty folder, unreadable files (skipped, counted), --n
    larger than the folder, an existing run without --resume, a resume with other settings."""
    root, images, _, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"\x89PNG not really")
    cases = [(["--images", str(empty)], "skipped 1 unreadable file(s)"),
             (["--images", str(empty)], "no readable image"),
             (["--images", str(tmp_path / "nowhere")], "no such folder"),
             (["--n", "50"], "--n 50, but"),
             (["--batch", "0"], "--batch and --micro-batch must be >= 1"),
             (["--batch", "6", "--n", "2", "--steps", "0"], "--steps must be >= 1")]
    for extra, message in cases:
        assert cse.main(train_argv(setup, tmp_path / "x", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()  # nothing written
    run = tmp_path / "run"
    assert cse.main(train_argv(setup, run, "--steps", "1")) == 0
    capsys.readouterr()
    assert cse.main(train_argv(setup, run, "--steps", "2")) == 2
    assert "checkpoint-1 exists; pass --resume" in capsys.readouterr().err
    assert cse.main(train_argv(setup, run, "--steps", "2", "--resume", "--lr", "2e-3")) == 2
    assert "lr 0.001 (now 0.002)" in capsys.readouterr().err


def test_fewer_images_than_the_batch(setup, tmp_path):
    """2 images, batch 4: each epoch is a fresh order of both, so a batch holds each twice (the
    authors repeat their list up to the batch)."""
    assert cse.main(train_argv(setup, tmp_path, "--num-images", "2", "--steps", "1")) == 0
    orders = [cse.epoch_order(2, 0, e) for e in range(2)]
    assert all(sorted(o) == [0, 1] for o in orders)
    assert json.load(open(tmp_path / "checkpoint-1" / "cse.json"))["n"] == 2


def test_gradient_checkpointing_changes_nothing():
    """--grad-checkpoint recomputes activations: the same loss and ControlNet gradients."""
    import unet

    torch.manual_seed(0)
    u = randomize(unet.UNet(unet.TINY)).requires_grad_(False)
    c = randomize(from_unet(u), seed=1)
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    context = torch.randn(2, 77, unet.TINY.cross_attention_dim, generator=g)
    grads = []
    for on in (False, True):
        u.gradient_checkpointing = c.gradient_checkpointing = on
        c.zero_grad()
        loss = u(x, 300, context, c(x, 300, context, hint)).pow(2).mean()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in c.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads, strict=True))


def test_full_disk_while_writing_a_checkpoint(setup, tmp_path, monkeypatch, capsys):
    """The network's or the optimizer's file cannot be written (safetensors' and torch.save's
    own errors on a full disk): one line naming --out and the last whole checkpoint, exit 2, no
    temporary folder left; the earlier checkpoint is intact and the run resumes from it."""
    run = tmp_path / "run"
    assert cse.main(train_argv(setup, run, "--steps", "1")) == 0
    before = weights(run / "checkpoint-1")

    def full(error, message):  # a writer that writes a part of its file, then finds no space
        def write(obj, path, *args, **kwargs):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise error(message)

        return write

    writers = [(safetensors.torch, "save_file", safetensors.SafetensorError,
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                '"No space left on device" })'),
               (torch, "save", RuntimeError, "[enforce fail at inline_container.cc:626] . "
                "unexpected pos 1216 vs 1114")]
    for module, name, error, message in writers:
        with monkeypatch.context() as m:
            m.setattr(module, name, full(error, message))
            assert cse.main(train_argv(setup, run, "--steps", "2", "--resume")) == 2
        line = error_line(capsys)
        assert f"checkpoint-2 under {run}" in line and f"{run}/checkpoint-1 is intact" in line
        assert sorted(os.listdir(run)) == ["checkpoint-1"]
        after = weights(run / "checkpoint-1")
        assert all(torch.equal(before[k], after[k]) for k in before)
    with monkeypatch.context() as m:  # the first checkpoint: nothing earlier to name
        m.setattr(torch, "save", full(RuntimeError, "unexpected pos"))
        assert cse.main(train_argv(setup, tmp_path / "new", "--steps", "1")) == 2
    assert "no earlier checkpoint" in error_line(capsys)
    assert os.listdir(tmp_path / "new") == []
    assert cse.main(train_argv(setup, run, "--steps", "2", "--resume")) == 0
    assert (run / "checkpoint-2" / "state.pt").is_file()


def test_unreadable_state(setup, tmp_path, monkeypatch, capsys):
    """--resume with a newest state.pt that is no torch file (a Git LFS pointer): one line that
    says to move that checkpoint away to resume from the one before, which still holds its
    state.pt; doing so resumes from it (one step trained), to the same weights. Without an
    earlier one (the only state.pt is not the optimizer's) the line says to start a new run."""
    run = tmp_path / "run"
    assert cse.main(train_argv(setup, run)) == 0
    (run / "checkpoint-3" / "state.pt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n")
    assert cse.main(train_argv(setup, run, "--resume")) == 2
    line = error_line(capsys)
    assert f"{run}/checkpoint-3/state.pt is unreadable" in line
    assert f"move {run}/checkpoint-3 out of {run} to resume from {run}/checkpoint-2" in line
    shutil.move(run / "checkpoint-3", tmp_path / "aside")
    calls, real = [], cse.batch_losses
    monkeypatch.setattr(cse, "batch_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cse.main(train_argv(setup, run, "--resume")) == 0
    assert len(calls) == 2  # step 3 only: two micro-batches
    a, b = weights(tmp_path / "aside"), weights(run / "checkpoint-3")
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = tmp_path / "one"
    assert cse.main(train_argv(setup, one, "--steps", "1")) == 0
    torch.save({"step": 1}, one / "checkpoint-1" / "state.pt")
    assert cse.main(train_argv(setup, one, "--steps", "2", "--resume")) == 2
    line = error_line(capsys)
    assert "no earlier checkpoint" in line and "another --out" in line


def test_resume_never_restarts(setup, tmp_path, capsys):
    """--resume continues the newest checkpoint or nothing: one without its state.pt is
    refused in one line that names the one before to resume from; checkpoints that all lack it
    (copied without it) are refused, named, rather than trained again from step 0 over them."""
    run = tmp_path / "run"
    assert cse.main(train_argv(setup, run)) == 0
    before = {c.name: weights(c) for c in run.iterdir()}
    (run / "checkpoint-3" / "state.pt").unlink()
    assert cse.main(train_argv(setup, run, "--steps", "4", "--resume")) == 2
    line = error_line(capsys)
    assert f"{run}/checkpoint-3 has no state.pt" in line
    assert f"out of {run} to resume from {run}/checkpoint-2" in line
    for state in run.glob("checkpoint-*/state.pt"):
        state.unlink()
    assert cse.main(train_argv(setup, run, "--steps", "4", "--resume")) == 2
    line = error_line(capsys)
    assert f"{run} holds checkpoint-1, checkpoint-2, checkpoint-3, but none keeps" in line
    assert sorted(os.listdir(run)) == sorted(before)
    for name, a in before.items():
        b = weights(run / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_a_run(setup, tmp_path, capsys):
    """Any checkpoint-N in --out is a run, with or without its state.pt: a new run with other
    settings and no --resume is refused and overwrites nothing. A temporary .checkpoint-N of a
    killed run is not one: a new run removes it."""
    run = tmp_path / "run"
    assert cse.main(train_argv(setup, run)) == 0
    for newest in ("checkpoint-3", "checkpoint-2"):
        shutil.move(run / newest, tmp_path / newest)
    before = weights(run / "checkpoint-1")
    assert cse.main(train_argv(setup, run, "--lr", "2e-3")) == 2
    assert f"{run}/checkpoint-1 exists; pass --resume" in error_line(capsys)
    after = weights(run / "checkpoint-1")
    assert all(torch.equal(before[k], after[k]) for k in before)
    killed = tmp_path / "killed"
    (killed / ".checkpoint-7" / "controlnet").mkdir(parents=True)
    assert cse.main(train_argv(setup, killed, "--steps", "1")) == 0
    assert sorted(os.listdir(killed)) == ["checkpoint-1"]


def test_help(capsys):
    """Every flag's default shows once, none for a flag without one or a required one."""
    for command, flag in (("train", "--sr-factor SR_FACTOR SR downscaling factor (default: 8)"),
                          ("generate", "--n N, --num-images N number of images (under "
                           "torchrun: --num-images) (default: 1000)")):
        with pytest.raises(SystemExit):
            cse.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text
        assert not re.search(r"\(default: [^)]*\) \(default:", text), text
        assert "--out OUT output folder --model" in text
        assert "--size SIZE image size in pixels (default: 512)" in text
        assert flag in text
