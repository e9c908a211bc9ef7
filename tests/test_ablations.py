"""ablations.py: Tables 5, 7 and 9 as grids of eval.run on the shipped small prior: each cell is
the run it names (its restorations are dmap.restore's with the same settings), the tables hold
every cell, bad input is one line."""

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

import ablations
import cse
import dmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIOR = os.path.join(ROOT, "models", "mini-prior")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    return str(folder)


def common(**extra):
    return dict(ops=("blur",), n=2, model=PRIOR, size=32, metrics=("psnr",), device="cpu",
                **extra)


def test_table5_cells_are_the_runs_they_name(photos, tmp_path):
    cells = ablations.table5_cells(4)
    assert list(cells) == ["DPS T=4", "DSG T=4", "DMAP T=4 K=1", "DMAP T=2 K=2", "DMAP T=1 K=4"]
    result = ablations.ablation(photos, str(tmp_path), cells, title="t5", **common())
    rows = result["rows"]
    assert rows["DMAP T=2 K=2"]["sampler"] == {"eta": 1.0, "zeta": 4.0, "K": 2, "steps": 2}
    assert rows["DPS T=4"]["sampler"]["steps"] == 4 and rows["DPS T=4"]["psnr"]["n"] == 2
    assert "| DMAP T=1 K=4 | 1 | eta 1, zeta 4, K 4 |" in result["markdown"]
    assert json.loads((tmp_path / "table.json").read_text())["rows"].keys() == rows.keys()
    # The cell's restoration of its first image is dmap.restore's with the same settings.
    ours = np.asarray(Image.open(tmp_path / "DMAP_T_2_K_2" / "blur" / "dmap" / "astronaut.png"))
    alone = dmap.restore(os.path.join(photos, "astronaut.png"), model=PRIOR, method="dmap",
                         op="blur", steps=2, K=2, device="cpu")
    np.testing.assert_array_equal(ours, alone["restored"])


def test_table9_runs_the_pf_ode(photos, tmp_path):
    cells = ablations.table9_cells(("dps",))
    for settings in cells.values():
        settings["steps"] = 3
    rows = ablations.ablation(photos, str(tmp_path), cells, title="t9", **common())["rows"]
    assert rows["dps PF-ODE"]["sampler"]["eta"] == 0.0
    assert rows["dps ancestral"]["sampler"]["eta"] == 1.0
    assert rows["dps PF-ODE"]["psnr"]["mean"] != rows["dps ancestral"]["psnr"]["mean"]


def test_table7_takes_each_checkpoint_of_a_cse_run(photos, tmp_path, capsys):
    run = tmp_path / "cse"
    cse.train(model=PRIOR, images=photos, n=None, out=str(run), op="blur", size=32,
              blur_std=1.0, steps=4, batch=2, micro_batch=2, lr=1e-4, checkpoint_every=2,
              validate_every=0, device="cpu")
    cells = ablations.table7_cells(str(run), "blur")
    assert list(cells) == ["DPS+CSE after 2 steps", "DPS+CSE after 4 steps"]
    result = ablations.ablation(photos, str(tmp_path / "t7"), cells, title="t7",
                                **common(steps=2, operator={"blur_std": 1.0}))
    assert set(result["rows"]) == set(cells)
    with pytest.raises(ValueError, match="has no checkpoint-3 .it has 2, 4"):
        ablations.table7_cells(str(run), "blur", [3])
    assert ablations.main(["table7", "--images", photos, "--out", str(tmp_path / "x"),
                           "--cse-run", str(tmp_path / "nowhere"), "--model", PRIOR]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --cse-run")
