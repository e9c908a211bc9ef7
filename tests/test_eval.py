"""eval.py: `score` pairs folders and reports what it cannot pair; `run` restores exactly what
dmap.py restores, resumes without recomputing, shards over torchrun (2 processes = 1 process);
the Sec. 3 estimators against the exact Gaussian mixture of toy_gmm.py; bad input."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import skimage.data
import torch
from conftest import community_weights, tiny_pipeline
from PIL import Image

import dmap
import eval as evaluation
import metrics
import observations
import operators
import toy_gmm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny pipeline, photo folder with a text file and a too-small image, metric weights in
    the community file layouts)."""
    root = str(tmp_path_factory.mktemp("sd2"))
    tiny_pipeline(root)
    photos = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(photos / f"{name}.png")
    (photos / "notes.txt").write_text("not an image")
    Image.fromarray(skimage.data.astronaut()[:40, :40]).save(photos / "small.png")
    return root, str(photos), community_weights(tmp_path_factory.mktemp("weights"))


def run_argv(setup, out, *extra):
    root, photos, weights = setup
    return ["run", "--images", photos, "--out", str(out), "--model", root, "--size", "64",
            "--steps", "4", "--n", "3", "--methods", "ddpm,dps,dmap-same", "--device", "cpu",
            "--metric-weights", weights, "--kid-subset", "3", *extra]


def table(out) -> dict:
    with open(os.path.join(out, "table.json")) as f:
        t = json.load(f)["table"]
    for row in t.values():  # what depends on the machine, not on the restorations
        row.pop("seconds"), row.pop("peak_mb")
    return t


def flatten(tree, prefix=""):
    """(path, number) leaves of nested dicts and lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def test_score_pairs_by_name_and_reports_the_rest(setup, tmp_path, capsys):
    _, photos, weights = setup
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for name in PHOTOS[:4]:
        r = getattr(skimage.data, name)()[:96, :96]
        p = np.clip(r + rng.normal(0, 20, r.shape), 0, 255).astype(np.uint8)
        Image.fromarray(r).save(ref / f"{name}.jpg", quality=100)
        Image.fromarray(p).save(pred / f"{name}.png")
        expected[name] = (np.asarray(Image.open(ref / f"{name}.jpg").convert("RGB")), p)
    Image.fromarray(skimage.data.camera()).save(ref / "camera.png")  # 512 px: resized
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(pred / "camera.png")
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(pred / "extra.png")
    (ref / "readme.txt").write_text("x")
    (ref / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    out = tmp_path / "scores.json"
    argv = ["score", "--ref", str(ref), "--pred", str(pred), "--metric-weights", weights,
            "--kid-subset", "3", "--json", str(out), "--device", "cpu"]
    assert evaluation.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 5 and report["only_in_pred"] == ["extra"]
    assert report["resized"] == ["camera"] and report["not_images"]["ref"] == ["broken.png",
                                                                             "readme.txt"]
    rows = {r["name"]: r for r in report["per_image"]}
    for name, (r, p) in expected.items():
        assert rows[name]["psnr"] == pytest.approx(metrics.psnr(r, p), rel=1e-12)
        assert rows[name]["ssim"] == pytest.approx(metrics.ssim(r, p), rel=1e-12)
    psnrs = [rows[n]["psnr"] for n in rows]
    m = report["metrics"]["psnr"]
    assert m["mean"] == pytest.approx(np.mean(psnrs))
    lo, _ = scipy.stats.t.interval(0.95, 4, np.mean(psnrs), np.std(psnrs, ddof=1) / np.sqrt(5))
    assert m["ci95"] == pytest.approx(np.mean(psnrs) - lo)
    assert report["metrics"]["fid"]["value"] > 0 and "lpips" in report["metrics"]
    text = capsys.readouterr().out
    assert "1 restorations without a reference: extra" in text and "| PSNR |" in text
    assert evaluation.main(argv) == 2  # --json exists
    assert "pass --force" in capsys.readouterr().err


def test_run_restores_as_dmap_py_and_resumes(setup, tmp_path, capsys):
    root, photos, _ = setup
    out = tmp_path / "run"
    assert evaluation.main(run_argv(setup, out)) == 0
    first = table(out)
    assert set(first) == {"sr/ddpm", "sr/dps", "sr/dmap-same"}
    assert first["sr/dps"]["fid"]["value"] > 0 and first["sr/dps"]["psnr"]["n"] == 3
    text = (out / "table.md").read_text()
    assert "| dmap-same |" in text and "notes.txt (not an image)" in text
    assert Image.open(out / "sr" / "grid.png").size[0] > 5 * 64
    # The restoration is dmap.py's for the same image, seed (seed + index) and settings.
    assert dmap.main([os.path.join(photos, "chelsea.png"), "--method", "dmap",
                      "--dmap-setting", "same", "--steps", "2", "--op", "sr", "--size", "64",
                      "--model", root, "--seed", "2", "--out", str(tmp_path / "cli"),
                      "--name", "x", "--device", "cpu"]) == 0
    ours = np.asarray(Image.open(out / "sr" / "dmap-same" / "chelsea.png"))
    np.testing.assert_array_equal(ours, np.asarray(Image.open(tmp_path / "cli" / "x.png")))
    # A killed run resumes: only what has no record is redone, and the table is the same.
    (out / "sr" / "dps" / "camera.json").unlink()
    kept = os.stat(out / "sr" / "dps" / "astronaut.png").st_mtime_ns
    capsys.readouterr()
    assert evaluation.main(run_argv(setup, out)) == 0
    assert "1 batches restored" in capsys.readouterr().err
    assert os.stat(out / "sr" / "dps" / "astronaut.png").st_mtime_ns == kept
    assert table(out) == first
    # Another setting into the same folder is refused.
    assert evaluation.main(run_argv(setup, out, "--seed", "3")) == 2
    assert "holds a run with seed = 0" in capsys.readouterr().err


def test_two_processes_equal_one(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): disjoint shards, the merged table (FID from the
    merged features) equal to one process's at the same thread count (oneDNN's channels-last
    convolutions sum in an order that depends on the thread count)."""
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluation.main(run_argv(setup, one, "--methods", "dps")) == 0
    finally:
        torch.set_num_threads(threads)
    argv = [a if a != "--n" else "--num-images" for a in run_argv(setup, two, "--methods",
                                                                   "dps")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", os.path.join(ROOT, "eval.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # Restorations and per-image metrics equal; features (FID, KID) to float32 rounding.
    flat = {k: v for k, v in flatten(table(one))}
    for key, value in flatten(table(two)):
        assert value == pytest.approx(flat.pop(key), rel=1e-6, abs=1e-9), key
    assert not flat
    for stem in ("astronaut", "camera", "chelsea"):
        np.testing.assert_array_equal(np.asarray(Image.open(one / "sr" / "dps" / f"{stem}.png")),
                                      np.asarray(Image.open(two / "sr" / "dps" / f"{stem}.png")))


def test_a_failing_rank_loses_nothing_of_the_others(setup, tmp_path):
    """Under torchrun, rank 1 meets a truncated JPEG (PIL's verify passes it, decoding fails):
    it stops with one error line, torchrun stops rank 0; every record on disk is whole, and
    after the file is fixed the same command (here in one process) redoes only what is
    missing and writes the whole table."""
    photos, out = tmp_path / "photos", tmp_path / "run"
    photos.mkdir()
    for stem, name in zip("acd", ("astronaut", "chelsea", "rocket"), strict=True):
        Image.fromarray(getattr(skimage.data, name)()).save(photos / f"{stem}.png")
    Image.fromarray(skimage.data.coffee()).save(photos / "b.jpg")
    whole = (photos / "b.jpg").read_bytes()
    (photos / "b.jpg").write_bytes(whole[:len(whole) // 2])
    argv = [a if a != "--n" else "--num-images" for a in run_argv(
        (setup[0], str(photos), setup[2]), out, "--methods", "dps", "--n", "4")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", os.path.join(ROOT, "eval.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "error: cannot read image" in done.stderr
    assert not (out / "table.md").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "sr" / "dps").glob("*.json")}
    print(f"records kept from the failed run: {sorted(kept)}")
    for name in kept:  # every record is whole, and so is its restoration
        json.loads((out / "sr" / "dps" / name).read_text())
        Image.open(out / "sr" / "dps" / name.replace(".json", ".png")).load()
    (photos / "b.jpg").write_bytes(whole)
    assert evaluation.main(argv) == 0
    assert table(out)["sr/dps"]["psnr"]["n"] == 4
    assert all((out / "sr" / "dps" / n).stat().st_mtime_ns == t for n, t in kept.items())


def test_batches_restore_every_image(setup, tmp_path):
    out = tmp_path / "batch"
    assert evaluation.main(run_argv(setup, out, "--methods", "dps", "--batch", "2",
                                    "--metrics", "psnr,ssim")) == 0
    records = [json.loads((out / "sr" / "dps" / f"{s}.json").read_text())
               for s in ("astronaut", "camera", "chelsea")]
    assert [r["batch"] for r in records] == [2, 2, 1] and [r["seed"] for r in records] == \
        [0, 0, 2]


def test_zeta_operator_flags_sw_and_measurement_fit(setup, tmp_path):
    """--zeta sets the step of the method it names (op/method first, NAME+cse falls back to
    NAME's), operator flags reach the operator, SW is metrics.sliced_wasserstein of the box-
    filtered pixel vectors, and y_rmse is the measurement fit of the restoration."""
    assert evaluation.zeta_for({"dps": 1.0, "blur/dps": 2.0}, "blur", "dps+cse") == 2.0
    assert evaluation.zeta_for({"dps": 1.0, "blur/dps": 2.0}, "sr", "dps+cse") == 1.0
    assert evaluation.zeta_for({"dps": 1.0}, "sr", "dmap") is None
    out = tmp_path / "z"
    assert evaluation.main(run_argv(setup, out, "--methods", "ddpm,dps", "--op", "sr,blur",
                                    "--zeta", "dps=0.3,blur/dps=0.7", "--sr-factor", "4",
                                    "--blur-std", "1.5", "--metrics", "psnr,sw")) == 0
    record = json.loads((out / "blur" / "dps" / "chelsea.json").read_text())
    assert record["sampler"]["zeta"] == 0.7 and record["operator"]["std"] == 1.5
    record = json.loads((out / "sr" / "dps" / "chelsea.json").read_text())
    assert record["sampler"]["zeta"] == 0.3 and record["operator"]["factor"] == 4
    stems = ("astronaut", "camera", "chelsea")
    ref = [np.asarray(Image.open(out / "reference" / f"{s}.png")) for s in stems]
    pred = [np.asarray(Image.open(out / "sr" / "dps" / f"{s}.png")) for s in stems]
    vectors = [torch.tensor(np.stack([a.reshape(64, 1, 64, 1, 3).astype(float).ravel() / 255
                                      for a in images])) for images in (ref, pred)]
    expected = metrics.sliced_wasserstein(*vectors, generator=torch.Generator().manual_seed(0))
    assert table(out)["sr/dps"]["sw"]["value"] == pytest.approx(expected, rel=1e-12)
    # y_rmse: the RMS of A(x) - y on [-1, 1]; the 8-bit image's fit is within rounding of it
    op = operators.SR(size=64, factor=4)
    x, y = (torch.tensor(a).permute(2, 0, 1)[None].float() / 127.5 - 1 for a in (pred[2],
                                                                                  ref[2]))
    fit = (op(x) - op(y)).pow(2).mean().sqrt().item()
    assert record["y_rmse"] == pytest.approx(fit, abs=2 / 255)
    assert "y RMSE" in (out / "table.md").read_text()


def test_a_rerun_with_other_images_is_refused(setup, tmp_path, capsys):
    """The images are part of a run's settings: a rerun into its --out with another folder,
    another --n, or other bytes under the same names is refused (else the table names the new
    images and holds the old ones' restorations); a settings file written before the images'
    fingerprint was kept still resumes."""
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "run"
    for folder, names in ((first, ("astronaut", "camera")), (second, ("chelsea", "coffee"))):
        folder.mkdir()
        for stem, name in zip("ab", names, strict=True):
            Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{stem}.png")

    def argv(images, *extra):
        return run_argv((setup[0], str(images), setup[2]), out, "--methods", "dps", "--n", "2",
                        "--metrics", "psnr", *extra)

    assert evaluation.main(argv(first)) == 0
    whole = (first / "b.png").read_bytes()
    changed = tmp_path / "changed"
    changed.mkdir()
    Image.fromarray(skimage.data.rocket()).save(changed / "b.png")
    capsys.readouterr()
    for images, extra, why in ((second, (), "folder"), (first, ("--n", "1"), "n = 2, not 1"),
                               (changed, (), "other bytes in b.png")):
        if images is changed:  # the same folder and names, one file rewritten
            (first / "b.png").write_bytes((changed / "b.png").read_bytes())
            images = first
        assert evaluation.main(argv(images, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} holds a run of other images" in err[0] and \
            why in err[0] and err[0].endswith("use another --out"), err
    (first / "b.png").write_bytes(whole)
    settings = json.loads((out / "run.json").read_text())
    del settings["images_sha256"]
    (out / "run.json").write_text(json.dumps(settings))
    assert evaluation.main(argv(first)) == 0
    assert "0 batches restored" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["images_sha256"] == {  # kept from now on
        s: hashlib.sha256((first / f"{s}.png").read_bytes()).hexdigest() for s in "ab"}
    assert evaluation.main(argv(second)) == 2  # its folder is still checked


def test_a_corrupt_record_is_redone(setup, tmp_path, capsys):
    """A record that does not parse (a truncated file) is work not done: the rerun says so,
    naming it, and redoes that restoration alone; the table never dies on one. A settings
    file that does not parse is one line naming it."""
    out = tmp_path / "run"
    argv = run_argv(setup, out, "--methods", "dps", "--n", "2", "--metrics", "psnr")
    assert evaluation.main(argv) == 0
    first = table(out)
    record = out / "sr" / "dps" / "camera.json"
    whole = json.loads(record.read_text())
    record.write_text(record.read_text()[:150])
    job = evaluation.RunSettings(images=setup[1], out=str(out), n=2, size=64, metrics=("psnr",))
    images, _ = evaluation.image_list(job)
    with pytest.raises(ValueError, match="1 restorations are missing or unreadable .*camera"):
        evaluation.collect(job, images, ["sr"], ["dps"])
    kept = os.stat(out / "sr" / "dps" / "astronaut.json").st_mtime_ns
    capsys.readouterr()
    assert evaluation.main(argv) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "camera.json" in line] == \
        [f"{record} does not parse; restoring it again"]
    assert "1 batches restored" in err
    assert os.stat(out / "sr" / "dps" / "astronaut.json").st_mtime_ns == kept
    redone = json.loads(record.read_text())
    for r in (whole, redone):
        r.pop("seconds"), r.pop("peak_mb")
    assert redone == whole and table(out) == first
    (out / "run.json").write_text("{")
    assert evaluation.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'run.json'} does not parse" in err[0], err


def test_a_resumed_batch_is_the_uninterrupted_one(setup, tmp_path, capsys):
    """--batch 2: a restoration whose record is lost (a kill) is redone with its batch, whole,
    so it is the very image the uninterrupted run made (not a batch of one with another
    seed), and the table is unchanged."""
    out = tmp_path / "run"
    argv = run_argv(setup, out, "--methods", "dps", "--batch", "2", "--metrics", "psnr")
    assert evaluation.main(argv) == 0
    first = table(out)
    folder = out / "sr" / "dps"
    images = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    os.remove(folder / "camera.json")  # the second image of the first batch (astronaut, camera)
    capsys.readouterr()
    assert evaluation.main(argv) == 0
    assert "1 batches restored" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == images
    assert table(out) == first


@pytest.mark.parametrize("command", ["run", "score", "observe", "speed"])
def test_help_gives_each_default_once(command, capsys):
    """A flag's help ends with its default once; none for required flags, flags without one
    (None) and switches; lists as they are typed."""
    with pytest.raises(SystemExit):
        evaluation.parse_args([command, "--help"])
    text = capsys.readouterr().out.split("options:")[1]
    flags = {}
    for block in re.split(r"\n  (?=-)", text)[1:]:
        block = " ".join(block.split())
        flags[block.split()[0].strip(",")] = block
    for flag, block in flags.items():
        assert block.count("(default") <= 1 and "(default: None)" not in block and \
            "(default: False)" not in block and "(default: [" not in block, block
        assert len(block.split()) > 2, f"{flag} has no help"
    required = {"run": ["--images", "--out"], "score": ["--ref", "--pred"],
                "observe": ["--image", "--out", "--cse"], "speed": []}[command]
    for flag in required:
        assert "(default" not in flags[flag], flags[flag]
    expected = {"run": {"--seed": "0", "--sigma-y": "0.0", "--n": "1000"},
                "score": {"--metrics": "psnr,ssim,lpips,fid,kid,sw"},
                "observe": {"--seed": "0", "--steps": "50"},
                "speed": {"--batch": "1", "--checkpointing": "none", "--seed": "0"}}[command]
    for flag, default in expected.items():
        assert flags[flag].endswith(f"(default: {default})"), flags[flag]


def test_ctrl_c_is_one_line_that_says_what_was_kept(setup, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation.Run, "restore", interrupt)
    assert evaluation.main(run_argv(setup, tmp_path / "run", "--methods", "dps", "--n", "1",
                                    "--metrics", "psnr")) == 130
    err = capsys.readouterr().err.strip().splitlines()  # after the progress bar
    assert err[-1].startswith("interrupted") and "astronaut" in err[-1] and \
        err[-1].count("rerun") == 1, err
    monkeypatch.setattr(metrics.Scorer, "pair", interrupt)
    assert evaluation.main(["score", "--ref", setup[1], "--pred", setup[1], "--metrics",
                            "psnr"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "interrupted while scoring; nothing written"

@pytest.mark.parametrize("extra, message", [
    (["--zeta", "dps"], "--zeta takes a comma list of NAME=VALUE"),
    (["--zeta", "dpz=1"], "--zeta dpz: name a method"),
    (["--blur-std", "2"], "--blur-std applies to --op blur, which this run does not"),
    (["--methods", "dps,wrong"], "unknown method wrong"),
    (["--methods", "dps+cse"], "needs a trained CSE"),
    (["--op", "sr,nope"], "unknown --op nope"),
    (["--n", "0"], "--n must be >= 1"),
    (["--size", "4000"], "no image of .* is at least 4000 px"),
    (["--metrics", "psnr,fidd"], "--metrics takes a comma list"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, extra, message):
    assert evaluation.main(run_argv(setup, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_small_images_are_left_out_with_the_reason(setup):
    job = evaluation.RunSettings(images=setup[1], out="unused", n=10, size=64)
    images, left_out = evaluation.image_list(job)
    assert [stem for _, stem, _ in images] == sorted(PHOTOS)
    assert left_out == [("notes.txt", "not an image"), ("small.png",
                                                          "40 px, smaller than --size")]


def test_empty_folder_and_missing_weights(setup, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    (tmp_path / "empty").mkdir()
    assert evaluation.main(["score", "--ref", str(tmp_path / "empty"), "--pred",
                            setup[1]]) == 2
    assert "holds no readable image" in capsys.readouterr().err
    assert evaluation.main(["score", "--ref", setup[1], "--pred", setup[1], "--metric-weights",
                            str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth are missing" in err and "--metrics psnr,ssim,sw" in err
    assert evaluation.main(["score", "--ref", setup[1], "--pred", setup[1], "--metric-weights",
                            str(tmp_path / "empty"), "--metrics", "fid,psnr"]) == 2
    assert capsys.readouterr().err.strip().endswith(", or leave fid out: --metrics psnr")


# --- the estimators of Sec. 3 on the exact GMM (toy_gmm.fig8_problem), where truth is known ---


def gmm():
    prior, A_mat, y = toy_gmm.fig8_problem()
    post = prior.posterior(A_mat, y, 0.1)
    A, parts = toy_gmm.linear_operator(A_mat[None])
    return prior, post, A, parts, y[None]


def test_observation_1_is_exact_for_dps_and_unconditional():
    """On one step from exact posterior samples: the unconditional error is sigma * RMS of the
    exact score difference, and DPS's implied score is the closed form s - zeta g / (sigma^2 -
    sigma_next^2) (Prop. 1)."""
    prior, post, A, parts, y = gmm()
    sigmas = torch.tensor([1.0, 0.8], dtype=torch.float64)
    x = post.noisy(1.0).sample(500, torch.Generator().manual_seed(0))
    out = observations.observation_1(post.denoiser, prior.denoiser, [("dps", "dps",
                                   dict(zeta=0.3))], x, y, A, sigmas, parts=parts)
    ref = post.score(x, 1.0)
    exact = ((prior.score(x, 1.0) - ref).pow(2).sum(1).mean() / 2).sqrt().item()
    assert out["error"]["unconditional"][0] == pytest.approx(exact, rel=1e-9)
    _, _, g = dmap.measurement_grad(prior.denoiser, x, 1.0, y, A)
    dps = prior.score(x, 1.0) - 0.3 * g / (1.0 - 0.64)
    expected = ((dps - ref).pow(2).sum(1).mean() / 2).sqrt().item()
    assert out["error"]["dps"][0] == pytest.approx(expected, rel=1e-9)


def test_observations_2_and_3_find_what_the_paper_says():
    """Observation II: the exact conditional score has mean zero at x_T (within 3 standard
    errors) while DPS's (zeta 1) does not; Observation III: DDPM on the exact posterior
    denoiser spreads as the exact posterior does (pixel_std within 10%)."""
    prior, post, A, parts, y = gmm()
    sigmas = toy_gmm.fig8_sigmas(40)
    x = post.noisy(sigmas[0].item()).sample(4000, torch.Generator().manual_seed(1))
    two = observations.observation_2(post.denoiser, prior.denoiser, [("dps", "dps",
                                   dict(zeta=1.0))], x, y, A, sigmas, parts=parts, chunk=1000)
    assert two["reference conditional"]["norm"] < 3 * two["reference conditional"]["se"]
    assert two["dps"]["norm"] > 6 * two["dps"]["se"]
    g = torch.Generator().manual_seed(2)
    x_T = sigmas[0].item() * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    exact = post.sample(200000, g).std(0).numpy()
    samples = dmap.ddpm(post.denoiser, x_T, y, A, sigmas, generator=g)
    np.testing.assert_allclose(observations.pixel_std(samples), exact, rtol=0.1)


@pytest.fixture(scope="module")
def trained_cse(setup, tmp_path_factory) -> str:
    """A CSE for SR at 64 px, one training step (cse.py train)."""
    import cse

    root, photos, _ = setup
    out = tmp_path_factory.mktemp("cse")
    assert cse.main(["train", "--model", root, "--images", photos, "--out", str(out), "--size",
                     "64", "--num-images", "3", "--batch", "2", "--micro-batch", "2",
                     "--steps", "1", "--lr", "1e-3", "--validate-every", "0",
                     "--device", "cpu"]) == 0
    return str(out / "checkpoint-1")


def test_cse_rows_and_a_cse_of_another_operator(setup, trained_cse, tmp_path, capsys):
    out = tmp_path / "cse"
    assert evaluation.main(run_argv(setup, out, "--methods", "cse,dps+cse", "--cse",
                                    trained_cse, "--n", "1", "--metrics", "psnr")) == 0
    assert set(table(out)) == {"sr/cse", "sr/dps+cse"}
    assert evaluation.main(run_argv(setup, tmp_path / "blur", "--op", "blur", "--methods",
                                    "dps+cse", "--cse", trained_cse, "--metrics", "psnr")) == 2
    assert "sr" in capsys.readouterr().err and not (tmp_path / "blur" / "blur").exists()


def test_observe_on_a_tiny_model(setup, trained_cse, tmp_path, capsys):
    root, photos, _ = setup
    out = tmp_path / "obs"
    argv = ["observe", "--image", os.path.join(photos, "astronaut.png"), "--op", "sr",
            "--cse", trained_cse, "--out", str(out), "--model", root, "--size",
            "64", "--steps", "3", "--k", "3", "--k-mean", "4", "--trajectories", "2",
            "--repeats", "2", "--batch", "2", "--device", "cpu"]
    assert evaluation.main(argv) == 0
    one = json.loads((out / "observation_1.json").read_text())
    dps = [one["error"][f"DPS zeta={z:g}"] for z in (1.2, 4.8, 19.2)]
    assert np.mean(dps[0]) < np.mean(dps[2])  # a larger step strays further from the CSE
    maps = [np.load(p) for p in sorted(out.glob("observation_3_*.npy"))]
    assert len(maps) == 5 and all(m.shape == (64, 64) and (m >= 0).all() for m in maps)
    assert (out / "observation_1.png").exists() and "Table 2" in (out / "observations.md"
                                                                  ).read_text()
    before = os.stat(out / "observation_1.json").st_mtime_ns
    assert evaluation.main(argv) == 0  # resumes: every part is on disk
    assert os.stat(out / "observation_1.json").st_mtime_ns == before
