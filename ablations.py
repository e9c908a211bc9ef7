"""The paper's ablations as grids of eval.run: each cell of a table is one run over the same
images, and the table is its rows side by side (Xu et al., ICLR 2025, Tables 5, 7 and 9).

    python ablations.py table5 --images DIR --out runs/t5 [eval.py run's flags]   # T x K
    python ablations.py table7 --images DIR --out runs/t7 --cse-run runs/cse-sr   # CSE time
    python ablations.py table9 --images DIR --out runs/t9 --methods dps,dmap     # PF-ODE

Table 5: at one budget of denoiser calls with a gradient (T x K = 100), DPS and DSG at T = 100
steps and DMAP at (T, K) = (100, 1), (50, 2), (25, 4). Table 7: DPS + CSE with the CSE's
checkpoints after more and more training (the paper: 1, 2, 4, 8 GPU hours; here the
checkpoint-N folders of one `cse.py train` run). Table 9 (right): every method with ancestral
steps (eta 1, DDPM) and with the deterministic PF-ODE (eta 0, DDIM). Every cell keeps each
method's default zeta (dmap.sampler_settings; the paper gives no other for these tables: our
choice). Reading order: (1) a grid of runs and its table; (2) the three tables' cells; (3) the
command line. A killed grid resumes: each cell is an eval.run folder.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import os
import re
import sys

import dmap
import eval as evaluation
from metrics import LABELS, cell

# ---------------------------------------------------------------------------------------------
# (1) A grid of runs and its table
# ---------------------------------------------------------------------------------------------


def ablation(images: str, out: str, cells: dict, *, title: str, **common) -> dict:
    """eval.run once per cell (label -> its settings over `common`, eval.RunSettings' fields)
    into out/<label>, each with one method and one operator; then the table, a row per cell:
    the method, its settings, time per image and each metric. -> {"rows": {label: summary},
    "markdown"}; table.md and table.json in `out`."""
    rows, settings = {}, {}
    for label, cell_settings in cells.items():
        run = dict(common, **cell_settings)
        if len(run.get("methods", ())) != 1 or len(run.get("ops", ("sr",))) != 1:
            raise ValueError(f"cell {label}: one method and one operator per cell")
        result = evaluation.run(images, os.path.join(out, folder_name(label)), grid=0, **run)
        (summary,) = result["table"].values()
        rows[label], settings = summary, result["settings"]
    names = list(common.get("metrics", evaluation.RunSettings.metrics))
    head = ["cell", "steps T", "sampler settings", "time (s)"] + [LABELS[n] for n in names]
    lines = [f"# {title}", "", f"{settings['n']} images of {settings['images']}, model "
             f"{settings['model']}, {settings['size']} px, seed {settings['seed']} + image "
             f"index, code {settings['code']}; each cell is eval.py run's folder "
             f"{out}/<cell>", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows.items():
        knobs = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in s["sampler"].items() if k != "steps")
        lines.append("| " + " | ".join([label, str(s["sampler"]["steps"]), knobs,
                                        f"{s['seconds']:.1f}"] + [cell(s, n) for n in names])
                     + " |")
    text = "\n".join(lines) + "\n"
    cli.write_text(os.path.join(out, "table.md"), text)
    cli.write_json(os.path.join(out, "table.json"), dict(title=title, rows=rows))
    return dict(rows=rows, markdown=text)


def folder_name(label: str) -> str:
    """A cell's folder: its label with every run of other characters than letters, digits,
    '.', '+' and '-' as one '_' ("DMAP T=50 K=2" -> "DMAP_T_50_K_2")."""
    return re.sub(r"[^\w.+-]+", "_", label)


# ---------------------------------------------------------------------------------------------
# (2) The cells of Tables 5, 7 and 9
# ---------------------------------------------------------------------------------------------


def table5_cells(budget: int = 100) -> dict:
    """Table 5: T x K = budget denoiser calls with a gradient per restoration."""
    cells = {f"DPS T={budget}": dict(methods=("dps",), steps=budget),
             f"DSG T={budget}": dict(methods=("dsg",), steps=budget)}
    for K in (1, 2, 4):
        if budget % K == 0:
            cells[f"DMAP T={budget // K} K={K}"] = dict(methods=("dmap",), steps=budget // K,
                                                        knobs={"K": K})
    return cells


def table7_cells(cse_run: str, op: str = "sr", at: list | None = None) -> dict:
    """Table 7: DPS + CSE with the checkpoints of the training run `cse_run` (its
    checkpoint-N folders; at: the steps N to take, default every one there)."""
    found = {int(m.group(1)): os.path.join(cse_run, name) for name in os.listdir(cse_run)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))} if os.path.isdir(cse_run) else {}
    if not found:
        raise ValueError(f"--cse-run {cse_run}: no checkpoint-N folders (a cse.py train --out)")
    missing = [n for n in at or () if n not in found]
    if missing:
        raise ValueError(f"--cse-run {cse_run} has no checkpoint-{missing[0]} (it has "
                         f"{', '.join(map(str, sorted(found)))})")
    return {f"DPS+CSE after {n} steps": dict(methods=("dps+cse",), cse={op: found[n]})
            for n in sorted(at or found)}


def table9_cells(methods=("dps", "dsg", "dmap")) -> dict:
    """Table 9 (right): each method with ancestral steps (eta 1) and with the PF-ODE (eta 0)."""
    return {f"{m} {name}": dict(methods=(m,), eta=eta) for m in methods
            for name, eta in (("ancestral", 1.0), ("PF-ODE", 0.0))}


TITLES = {"table5": "Table 5: T x K at a fixed budget of guided denoiser calls",
          "table7": "Table 7: DPS + CSE against the CSE's training steps",
          "table9": "Table 9: ancestral steps (eta 1) against the PF-ODE (eta 0)"}

# ---------------------------------------------------------------------------------------------
# (3) The command line
# ---------------------------------------------------------------------------------------------


def command_line() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.DefaultsHelpFormatter)
    tables = p.add_subparsers(dest="table", required=True)
    for name, title in TITLES.items():
        q = tables.add_parser(name, help=title, formatter_class=cli.DefaultsHelpFormatter)
        q.add_argument("--images", required=True, help="folder of reference images")
        q.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
        q.add_argument("--op", default="sr", help=f"operator: {dmap.OP_HELP}")
        q.add_argument("--n", "--num-images", dest="n", type=int, default=1000,
                       help="the first N images by name")
        q.add_argument("--batch", type=int, default=1, help="images restored at once")
        q.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise std")
        q.add_argument("--metrics", default="psnr,lpips,fid", help="comma list of "
                       f"{', '.join(evaluation.METRICS)}")
        q.add_argument("--metric-weights", help="folder of the LPIPS and FID weight files "
                       "(default: $TORCH_HOME/hub/checkpoints, downloaded there if missing)")
        q.add_argument("--kid-subset", type=int, default=1000, help="KID subset size")
        dmap.add_operator_flags(q)
        cli.add_model_flags(q, size=512, device=dmap.DEVICE,
                            seed_help="random seed (+ image index)")
        if name == "table5":
            q.add_argument("--budget", type=int, default=100, help="T x K, guided denoiser "
                           "calls per restoration")
        elif name == "table7":
            q.add_argument("--cse-run", required=True, help="a cse.py train --out folder")
            q.add_argument("--at", help="comma list of its checkpoint steps (default: all)")
        else:
            q.add_argument("--methods", default="dps,dsg,dmap", help="comma list of methods")
            q.add_argument("--steps", type=int, help="sampling steps (default: the paper's)")
    return p


def main(argv=None) -> int:
    args = command_line().parse_args(argv)

    def body():
        if args.table == "table5":
            cells = table5_cells(args.budget)
        elif args.table == "table7":
            at = [int(n) for n in evaluation.listed(args.at)] if args.at else None
            cells = table7_cells(args.cse_run, args.op, at)
        else:
            cells = table9_cells(evaluation.listed(args.methods))
            for settings in cells.values():
                settings["steps"] = args.steps
        result = ablation(
            args.images, args.out, cells, title=TITLES[args.table], ops=(args.op,), n=args.n,
            batch=args.batch, sigma_y=args.sigma_y, metrics=evaluation.listed(args.metrics),
            metric_weights=args.metric_weights, kid_subset=args.kid_subset,
            operator={k: getattr(args, k) for k in dmap.OPERATOR_FLAGS
                      if getattr(args, k) is not None},
            model=args.model, prediction=args.prediction, size=args.size, seed=args.seed,
            dtype=args.dtype, device=args.device)
        print(result["markdown"])
        return f"wrote {os.path.join(args.out, 'table.md')}"

    return cli.run(body, interrupted=f"before the end; {evaluation.RESUMES}", to_stderr=True)


if __name__ == "__main__":
    sys.exit(main())
