"""mini.py and the pixel-space models it is built on: a pixel-space model folder loads in
diffusers and in dmap.load_sd2 (no VAE, no text encoder), `cse.py train --train unet` trains
its UNet and resumes exactly, and `mini.py --quick` runs every stage, with numbers that must
hold even at that size, and skips every stage on a rerun."""

import dataclasses
import json
import os
import re
import shutil

import pytest
import skimage.data
import torch
from conftest import assert_close, community_weights
from PIL import Image

import cse
import dmap
import eval as evaluation
import metrics
import mini
import plot

TINY_PIXEL = mini.QUICK.unet  # (16, 32) channels, attention at the second level


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """An untrained pixel-space model folder and a folder of 24 crops of photographs."""
    root = tmp_path_factory.mktemp("pixel")
    mini.init_prior(str(root / "model"), mini.QUICK)
    photos = root / "photos"
    photos.mkdir()
    for k, name in enumerate(("astronaut", "coffee", "rocket") * 8):
        a = getattr(skimage.data, name)()
        Image.fromarray(a[16 * k:16 * k + 64, 16 * k:16 * k + 64]).save(photos / f"{k:02d}.png")
    return str(root / "model"), str(photos)


def test_pixel_model_loads_in_diffusers_and_dmap(prior):
    from diffusers import UNet2DConditionModel

    model, _ = prior
    sd = dmap.load_sd2(model)
    assert sd.vae is None and sd.text_encoder is None and sd.latent(16) == (3, 16, 16)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert sd.decode(x) is x and sd.encode(x) is x  # pixel space: the latent is the image
    context = dmap.encode_prompt(sd, "")
    assert context.shape == (1, 1, TINY_PIXEL.cross_attention_dim) and not context.any()
    theirs = UNet2DConditionModel.from_pretrained(os.path.join(model, "unet")).eval()
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ours = sd.unet(x, t, context.expand(2, -1, -1))
        ref = theirs(x, t, encoder_hidden_states=context.expand(2, -1, -1)).sample
    assert_close(ours, ref, 1e-5, what="pixel UNet vs diffusers")
    with pytest.raises(ValueError, match="no text encoder"):
        dmap.encode_prompt(sd, "a cat")


def test_metric_weights_reach_the_tables(prior, tmp_path, capsys):
    """--metric-weights DIR: eval.py run loads LPIPS, FID and KID from DIR (nothing is
    downloaded); a folder without the three files is refused in one line, before any work."""
    model, photos = prior
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mini.main(["--quick", "--out", str(tmp_path / "x"), "--metric-weights",
                      str(empty)]) == 2
    assert "no alexnet-owt-7be5be79.pth there" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    weights = community_weights(tmp_path)
    assert "lpips" not in mini.table_metrics(weights, 16)["metrics"]  # AlexNet needs 31 px
    s = dataclasses.replace(mini.QUICK, size=32)
    table = mini.restore(photos, str(tmp_path / "run"), s, model, ["sr"], ["ddpm"], {},
                         scoring=mini.table_metrics(weights, s.size), quiet=True)
    assert {"psnr", "ssim", "sw", "lpips", "fid", "kid"} <= set(table["sr/ddpm"])
    with pytest.raises(ValueError, match="LPIPS needs images of at least 31 x 31"):
        metrics.LPIPS()(torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 30, 30))


def train_argv(prior, out, *extra):
    model, photos = prior
    return ["train", "--train", "unet", "--model", model, "--images", photos, "--out", str(out),
            "--size", "16", "--n", "24", "--batch", "8", "--micro-batch", "4", "--lr", "2e-3",
            "--steps", "3", "--checkpoint-every", "1", "--validate-every", "0", "--device", "cpu",
            *extra]


def test_train_unet_learns_resumes_exactly_and_is_a_model(prior, tmp_path):
    model, photos = prior
    images = sorted(os.path.join(photos, f) for f in os.listdir(photos))
    assert cse.main(train_argv(prior, tmp_path / "a", "--steps", "30",
                               "--checkpoint-every", "30")) == 0
    trained = str(tmp_path / "a" / "checkpoint-30")
    before, after = (mini.held_out_loss(m, images, mini.QUICK) for m in (model, trained))
    assert after < 0.7 * before, (before, after)
    info = json.load(open(os.path.join(trained, "prior.json")))
    assert info["train"] == "unet" and len(info["losses"]) == 30 and info["op"] is None
    assert dmap.load_sd2(trained).vae is None  # the checkpoint is itself a model folder
    # killed after step 2 and resumed = 3 uninterrupted steps, bit for bit
    assert cse.main(train_argv(prior, tmp_path / "b", "--validate-every", "3",
                               "--validation-steps", "2")) == 0
    assert Image.open(tmp_path / "b" / "validation-3.png").width > 2 * 16  # sample | image
    assert cse.main(train_argv(prior, tmp_path / "c", "--steps", "2")) == 0
    shutil.rmtree(tmp_path / "c" / "checkpoint-1")
    assert cse.main(train_argv(prior, tmp_path / "c", "--resume")) == 0
    a, b = (dmap.load_sd2(str(tmp_path / r / "checkpoint-3")).unet.state_dict() for r in "bc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = json.load(open(tmp_path / "c" / "checkpoint-3" / "prior.json"))["losses"]
    assert c == json.load(open(tmp_path / "b" / "checkpoint-3" / "prior.json"))["losses"]


def test_train_unet_refuses_what_it_cannot_train(prior, tmp_path, capsys):
    model, photos = prior
    assert cse.main(train_argv((photos, photos), tmp_path / "x")) == 2
    assert "is not one" in capsys.readouterr().err  # not a pixel-space model folder
    assert cse.main(train_argv(prior, tmp_path / "y")) == 0
    assert cse.main(train_argv(prior, tmp_path / "y", "--resume", "--train", "controlnet")) == 2
    assert "no cse.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`python mini.py --quick`, once, its --out relative to the working folder."""
    root = tmp_path_factory.mktemp("mini")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert mini.main(["--quick", "--out", "run"]) == 0
    with open(root / "run" / "report.json") as f:
        return root / "run", json.load(f)


def test_quick_run_has_every_stage_and_row(quick):
    out, report = quick
    assert set(mini.STAGES) <= set(report["seconds"])
    table = report["eval"]
    assert set(table) == {f"{op}/{m}" for op in mini.QUICK.ops for m in mini.METHODS}
    assert set(report["tune"]["zeta"]) == {f"{op}/{m}" for op in mini.QUICK.ops
                                           for m in mini.TUNED}
    text = (out / "report.md").read_text()
    for m in mini.METHODS:
        assert f"| {m} |" in text
    for name in ("prior_loss.png", "prior_samples.png", "observe/observation_1.png",
                 "eval/sr/grid.png"):
        assert Image.open(out / name).width > 100


def test_quick_run_has_tables_5_7_9(quick):
    """Table 5 at the budget of its 16 steps, Table 7 at the quarters of the CSE's 4 steps,
    Table 9 with each method's PF-ODE twin; each in report.md with its sentence."""
    out, report = quick
    assert list(report["table5"]) == ["DPS T=16", "DSG T=16", "DMAP T=16 K=1", "DMAP T=8 K=2",
                                      "DMAP T=4 K=4"]
    assert report["table5"]["DMAP T=4 K=4"]["sampler"]["K"] == 4
    assert list(report["table7"]) == [f"DPS+CSE after {n} steps" for n in (1, 2, 4)]
    assert {c: report["table9"][c]["sampler"]["eta"] for c in report["table9"]} == {
        f"{m} {k}": e for m in ("dps", "dsg", "dmap") for k, e in (("ancestral", 1.0),
                                                                   ("PF-ODE", 0.0))}
    text = (out / "report.md").read_text()
    for heading in ("## Table 5: T x K", "## Table 7: DPS + CSE", "## Table 9: ancestral"):
        assert heading in text
    assert "At one budget, DMAP's best split is" in text and "Ancestral minus PF-ODE" in text


def test_quick_run_numbers_that_hold_at_any_size(quick):
    _, report = quick
    held = report["prior"]["held_out"]
    assert held["trained"] < 0.7 * held["untrained"], held  # the prior learnt something
    for op in mini.QUICK.ops:  # guided methods fit y far better than the unguided sampler
        fit = {m: report["eval"][f"{op}/{m}"]["y_rmse"]["mean"] for m in mini.TUNED}
        unguided = report["eval"][f"{op}/ddpm"]["y_rmse"]["mean"]
        assert min(fit.values()) < 0.25 * unguided, (op, unguided, fit)
        assert sum(fit.values()) / len(fit) < 0.8 * unguided, (op, unguided, fit)


def test_quick_run_pairs_the_claims(quick):
    """The mean of per-crop differences is the difference of the table's means (same crops)."""
    out, report = quick
    for op in mini.QUICK.ops:
        for a, b in mini.CLAIMS:
            d = report["paired"][f"{op}/{a}-{b}"]
            table = report["eval"]
            assert d["n"] == mini.QUICK.test_crops and 0 <= d["wins"] <= d["n"]
            assert abs(d["mean"] - (table[f"{op}/{a}"]["psnr"]["mean"]
                                    - table[f"{op}/{b}"]["psnr"]["mean"])) < 1e-9
    assert "| dmap - dps | " in (out / "report.md").read_text()


def test_quick_rerun_skips_every_stage(quick, capsys):
    out, report = quick
    assert mini.main(["--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == len(mini.STAGES)
    with open(out / "report.json") as f:
        assert json.load(f)["eval"] == report["eval"]


def test_bad_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert mini.main(["--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_quick_report_says_quick_with_its_own_counts_and_relative_paths(quick, monkeypatch):
    """report.md opens with the QUICK warning, so do the figures' titles; the Table 6 heading
    names the crop counts used; report.md and report.json name files relative to their folder
    (the figure links resolve there), never the machine's path to it."""
    out, report = quick
    text = (out / "report.md").read_text()
    first = text.splitlines()[0]
    assert "QUICK" in first and "not meaningful" in first, first
    assert "## Table 6 in miniature: SR, CSEs trained on 4, 8, 16 crops\n" in text
    for name in ("report.md", "report.json"):
        assert str(out) not in (out / name).read_text(), name
    assert " data/test" in text and " prior/checkpoint-60" in text  # eval.py's table.md
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert {"prior_loss.png", "eval/sr/grid.png", "observe/observation_1.png"} <= set(links)
    assert all((out / link).is_file() for link in links), links
    titles = []

    def spy(draw):
        def drawn(*args, **kwargs):
            titles.append(kwargs["title"])
            return draw(*args, **kwargs)
        return drawn

    monkeypatch.setattr(plot, "line_plot", spy(plot.line_plot))
    monkeypatch.setattr(plot, "image_grid", spy(plot.image_grid))
    mini.figures(str(out), mini.QUICK, report)
    assert len(titles) == 2 and all(t.splitlines()[-1] == first.strip("*") for t in titles), \
        titles


def test_quick_has_its_own_default_folder(quick, tmp_path, monkeypatch, capsys):
    """Without --out, --quick resumes results/mini-quick and leaves a full run's results/mini
    alone (before, both went to results/mini and the second was refused)."""
    shutil.copytree(quick[0], tmp_path / "results" / "mini-quick")
    full = tmp_path / "results" / "mini"
    full.mkdir()
    (full / "settings.json").write_text(json.dumps(dataclasses.asdict(mini.Settings())))
    monkeypatch.chdir(tmp_path)
    assert mini.main(["--quick"]) == 0
    assert capsys.readouterr().err.count("done before, skipped") == len(mini.STAGES)
    assert os.listdir(full) == ["settings.json"]
    with pytest.raises(SystemExit):
        mini.main(["--help"])
    assert "with --quick results/mini-quick" in " ".join(capsys.readouterr().out.split())


def test_interrupt_says_where_and_that_a_rerun_continues(quick, tmp_path, capsys,
                                                         monkeypatch):
    """Ctrl-C in a stage or in the report: one line with the stage and the inner code's detail,
    without the inner advice (eval.py's 'rerun', cse.py's --resume), and that a rerun of the same
    command continues."""
    out = shutil.copytree(quick[0], tmp_path / "run")
    os.remove(out / "stages" / "tune.json")
    shutil.rmtree(out / "tune")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def last_line():
        return capsys.readouterr().err.strip().splitlines()[-1]

    monkeypatch.setattr(evaluation.Run, "restore", interrupted)  # eval.py adds its detail
    assert mini.main(["--quick", "--out", str(out)]) == 130
    line = last_line()
    assert line.startswith("interrupted in stage 4 of 10 (tune), ") and "00000_astronaut" in line
    assert line.endswith("; rerun the same command to continue") and line.count("rerun") == 1

    def killed_cse(**settings):  # cse.py's message after a checkpoint
        raise KeyboardInterrupt(f"at step 150 of 300; {settings['out']}/checkpoint-100 is whole: "
                                "continue with --resume")

    monkeypatch.setattr(cse, "train", killed_cse)
    os.remove(out / "stages" / "cse.json")
    assert mini.main(["--quick", "--out", str(out)]) == 130
    assert last_line() == ("interrupted in stage 3 of 10 (cse), at step 150 of 300; rerun the "
                           "same command to continue")
    monkeypatch.undo()
    shutil.copy(quick[0] / "stages" / "cse.json", out / "stages")
    shutil.copy(quick[0] / "stages" / "tune.json", out / "stages")
    monkeypatch.setattr(mini, "figures", interrupted)
    assert mini.main(["--quick", "--out", str(out)]) == 130
    assert last_line() == ("interrupted while writing the report, every stage done; rerun the "
                           "same command to continue")


def test_export_prior_is_a_model_with_its_own_defaults(quick, tmp_path, capsys):
    """--export-prior on a finished run: the prior in float16 with defaults.json, and dmap.py
    restores with it at the model's size, steps, operator settings and tuned zeta, named in
    its record; the float16 weights restore as the float32 ones do to within 0.5 dB."""
    out, report = quick
    folder = tmp_path / "prior"
    assert mini.main(["--quick", "--out", str(out), "--export-prior", str(folder)]) == 0
    assert "done before, skipped" in capsys.readouterr().err  # nothing retrained
    defaults = json.loads((folder / "defaults.json").read_text())
    assert defaults["size"] == mini.QUICK.size and defaults["steps"] == mini.QUICK.steps
    assert defaults["operators"] == {"sr": {"factor": 4}, "blur": {"std": 1.0}}
    assert defaults["zeta"]["blur"]["dmap"] == report["tune"]["zeta"]["blur/dmap"]
    assert "python mini.py --export-prior" in (folder / "README.md").read_text()
    psnr = {}
    for name, model in (("fp16", folder), ("fp32", out / report["prior"]["model"])):
        args = [str(folder / "example.png"), "--model", str(model), "--method", "dmap", "--op",
                "blur", "--out", str(tmp_path / name)]
        if name == "fp32":  # the checkpoint has no defaults.json: the same settings by hand
            args += ["--size", "16", "--steps", "16", "--blur-std", "1", "--zeta",
                     str(defaults["zeta"]["blur"]["dmap"])]
        assert dmap.main(args) == 0
        (record,) = (tmp_path / name).glob("*.json")
        record = json.loads(record.read_text())
        psnr[name] = record["psnr"]
    assert record["operator"]["std"] == 1.0 and record["sampler"]["steps"] == 16
    fp16 = json.loads(next((tmp_path / "fp16").glob("*.json")).read_text())
    assert fp16["zeta_from"] == str(folder / "defaults.json")
    assert fp16["sampler"] == dict(record["sampler"]) and fp16["operator"]["size"] == 16
    assert abs(psnr["fp16"] - psnr["fp32"]) < 0.5, psnr
    assert mini.main(["--quick", "--out", str(out), "--export-prior", str(folder)]) == 2
    assert "exists" in capsys.readouterr().err  # never overwritten


def test_rerun_after_a_kill_while_writing(quick):
    """Killed while writing the crops (.data half-written), after renaming them into place but
    before recording the stage, and while writing the initial prior (prior/init.tmp
    half-written): the rerun cleans up, redoes those stages and gets the same results. In the
    quick run's own folder (cse.py resumes only with the paths it was trained with), so last."""
    out = quick[0]
    for name in ("data", "prior"):
        os.remove(out / "stages" / f"{name}.json")
    (out / ".data" / "train").mkdir(parents=True)
    shutil.rmtree(out / "prior" / "init")
    (out / "prior" / "init.tmp" / "unet").mkdir(parents=True)
    assert mini.main(["--quick", "--out", str(out)]) == 0
    assert not (out / ".data").exists() and not (out / "prior" / "init.tmp").exists()
    with open(out / "report.json") as f:
        again = json.load(f)
    assert again["data"] == quick[1]["data"] and again["prior"] == quick[1]["prior"]
