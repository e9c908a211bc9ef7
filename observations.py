"""The three observations of Sec. 3 (Xu et al., ICLR 2025): on any denoiser, how far the
scores that DPS, DSG and DMAP imply stray from a conditional score (I), whether they have the
mean zero every conditional score has at x_T (II), and how much their samples vary (III).

    python observations.py --image IMG --op sr --cse CKPT --out DIR   # Fig. 1, 3, Tables 1-3
    (python eval.py observe ... runs the same)

Reading order: (1) the estimators, functions of a denoiser, a measurement and a schedule, which
the tests check on the exact Gaussian mixture of toy_gmm.py; (2) `observe`: the three on one
measurement of an image on SD 2.0 (or a pixel prior), with a trained CSE as the reference
conditional score, each part written when done (a killed run resumes); (3) the command line.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import controlnet
import dmap
import plot

# ---------------------------------------------------------------------------------------------
# (1) The estimators, on any denoiser (SD 2.0 here, the exact GMM in the tests)
# ---------------------------------------------------------------------------------------------


def tweedie_score(denoiser, x, sigma: float) -> torch.Tensor:
    """s(x) = (x0_hat(x) - x) / sigma^2 (Tweedie, Eq. 4), flattened to (N, n)."""
    with torch.no_grad():
        return dmap.score(x, denoiser(x, sigma), sigma)


def score_error(score, reference, sigma: float, mc_var=None) -> float:
    """sigma * RMS over samples and coordinates of s - s_ref: epsilon units, per coordinate (so
    SD latents and 2-d toys are on one scale); the squared error debiased by the Monte Carlo
    variance of an estimated s (dmap.implied_score)."""
    se = (score - reference).pow(2).sum(1) - (0 if mc_var is None else mc_var)
    return sigma * math.sqrt(max(se.mean().item() / score.shape[1], 0.0))


def observation_1(reference, denoiser, runs, x, y, A, sigmas, *, repeats=8, seed=0, parts=None,
                  every=1, callback=None) -> dict:
    """Observation I (Fig. 1, Table 1; Eq. 9-10): along the trajectory of the unguided sampler on
    the reference conditional denoiser started at x (the CSE on SD, as the paper's ControlNet
    check; the exact posterior on a GMM), every `every`-th step, the score_error against the
    reference's score of the unconditional score and of the score each run (label, sampler,
    hyper-parameters) implies (dmap.implied_score; `repeats` noise draws, DPS's is exact).
    The authors' distance (1 - abar_t) mean((eps - eps_ref)^2) (pipe.py:3537-3577,
    docs/official_code.md §9.2) is (1 - abar_t) times our value squared; their reference was a
    StableSR trajectory, which this project has no weights for."""
    s = sigmas.tolist()
    generator = torch.Generator(x.device).manual_seed(seed)
    out = dict(sigmas=[], error={label: [] for label in ["unconditional"] + [r[0] for r in runs]})
    for i in range(len(s) - 1):
        if i % every == 0:
            ref = tweedie_score(reference, x, s[i])
            out["sigmas"].append(s[i])
            out["error"]["unconditional"].append(
                score_error(tweedie_score(denoiser, x, s[i]), ref, s[i]))
            for label, name, hyper in runs:
                score, mc_var = dmap.implied_score(
                    name, denoiser, x, y, A, s[i], s[i + 1], repeats=1 if name == "dps" else
                    repeats, seed=seed + i, parts=parts, **hyper)
                out["error"][label].append(score_error(score, ref, s[i], mc_var))
        x = dmap.ddpm(reference, x, y, A, sigmas[i:i + 2], generator=generator)
        if callback is not None:
            callback(i)
    return out


def observation_2(reference, denoiser, runs, x, y, A, sigmas, *, repeats=8, seed=0, parts=None,
                  chunk=64, callback=None) -> dict:
    """Observation II (Table 2; Eq. 11-12): at the first step, over the samples x of p(x_T | y)
    (on SD, N(0, sigma_max^2), which it is up to the data's variance), the mean of each score:
    every valid conditional score has mean zero there. Per label, in epsilon units and per
    coordinate: sigma ||mean|| / sqrt(n), its standard error, and sigma * RMS ||s|| / sqrt(n)."""
    s = sigmas.tolist()
    parts_of = {label: [] for label in ["reference conditional", "unconditional"] +
                [r[0] for r in runs]}
    for k in range(0, len(x), chunk):
        xk = x[k:k + chunk]
        parts_of["reference conditional"].append(tweedie_score(reference, xk, s[0]))
        parts_of["unconditional"].append(tweedie_score(denoiser, xk, s[0]))
        for label, name, hyper in runs:
            parts_of[label].append(dmap.implied_score(
                name, denoiser, xk, y, A, s[0], s[1], repeats=1 if name == "dps" else repeats,
                seed=seed + k, parts=parts, **hyper)[0])
        if callback is not None:
            callback(len(xk))
    out, n = {}, x[0].numel()
    for label, chunks in parts_of.items():
        v = torch.cat(chunks).double()
        out[label] = dict(norm=s[0] * v.mean(0).norm().item() / math.sqrt(n),
                          se=s[0] * (v.std(0) / math.sqrt(len(v))).norm().item() / math.sqrt(n),
                          rms=s[0] * v.pow(2).sum(1).mean().sqrt().item() / math.sqrt(n))
    return out


def pixel_std(samples: torch.Tensor) -> np.ndarray:
    """Observation III (Fig. 3, Table 3; Eq. 13): the standard deviation over k samples (k, ...)
    of one measurement, per coordinate; images (k, 3, H, W) -> (H, W), averaged over RGB (the
    authors' cal_var.ipynb: torch.std(xs, dim=0) on [-1, 1] images, docs/official_code.md §9.4)."""
    std = samples.double().std(0)
    return (std.mean(0) if std.ndim == 3 else std).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# (2) The three on one measurement of an image
# ---------------------------------------------------------------------------------------------


def observe(image: str, out: str, *, cse: str, model: str = dmap.DEFAULT_MODEL, op: str = "sr",
            size: int = 512, steps: int = 50, zeta: dict | None = None,
            zetas: list | None = None, trajectories: int = 4, every: int = 1, repeats: int = 8,
            k_mean: int = 1000, k: int = 50, batch: int = 8, seed: int = 0,
            prediction: str | None = None, dtype: str = "float32", device: str = dmap.DEVICE,
            **operator_settings) -> dict:
    """The three observations for one measurement of `image` (centre crop, `size` px, no noise)
    on the model, with the CSE `cse` as the reference conditional score. DPS at zetas (default:
    DPS's zeta x 1/4, 1, 4), DSG and DMAP at theirs; zeta: {method or op/method: step} instead of
    dmap's defaults. Each part is written to `out` when done and read back when its file exists
    (a killed run resumes). -> {"observation_1", "observation_2": dicts, "maps": {label:
    (H, W) standard deviations}, "markdown": the tables}."""
    checks = [(min(k, k_mean, trajectories, batch, every, repeats, steps) >= 1,
               "--k, --k-mean, --trajectories, --batch, --every, --repeats and --steps must be "
               ">= 1"), (k >= 2, "--k must be >= 2 (a standard deviation needs two samples)")]
    cli.check(checks)
    os.makedirs(out, exist_ok=True)
    device, dtype = torch.device(device), getattr(torch, dtype)
    operator = dmap.make_operator(op, size, seed=seed, model=model, **operator_settings)[0]
    operator = operator.to(device)  # data in float32, networks in dtype
    generator = torch.Generator(device).manual_seed(seed)
    y = operator.measure(dmap.read_image(image, size).to(device), 0.0, generator)
    sd = dmap.load_sd2(model, prediction, device, dtype)
    context = dmap.encode_prompt(sd, "")
    unconditional = dmap.SDDenoiser(sd.unet, context, sd.abar, sd.prediction)
    net = controlnet.load_cse(cse, op, size, device, dtype)[0]
    reference = dmap.CSEDenoiser(sd.unet, net, context, sd.abar, operator.hint(y), sd.prediction)

    def A(z):
        return operator(sd.decode(z))

    def zeta_of(method):  # the given one, else dmap's default (its ZETA table)
        for key in (f"{op}/{method}", method):
            if key in (zeta or {}):
                return zeta[key]
        return dmap.sampler_settings(method, op)[1]["zeta"]

    dps_zeta, rate = zeta_of("dps"), zeta_of("dsg")
    zetas = list(zetas) if zetas else [dps_zeta / 4, dps_zeta, 4 * dps_zeta]
    runs = [(f"DPS zeta={z:g}", "dps", dict(zeta=z)) for z in zetas] + \
        [(f"DSG rate={rate:g}", "dsg", dict(zeta=rate)),
         (f"DMAP zeta={zeta_of('dmap'):g}", "dmap", dict(zeta=zeta_of("dmap")))]
    sigmas = dmap.sd_sigmas(steps, sd.abar)
    latent = sd.latent(size)

    def noise(n, seed):
        g = torch.Generator(device).manual_seed(seed)
        return sigmas[0].item() * dmap.noise_like(torch.empty((n, *latent), device=device), g)

    done = {}
    for name in ("observation_1", "observation_2"):
        path = os.path.join(out, name + ".json")
        if os.path.exists(path):
            done[name] = cli.read_json(path)
            if done[name] is None:  # truncated by a crash before the atomic writers: redo it
                del done[name]
                print(f"{path} does not parse; computing it again", file=sys.stderr)
    if "observation_1" not in done:
        with tqdm(total=steps, desc="observation I", unit="step") as bar:
            done["observation_1"] = observation_1(
                reference, unconditional, runs, noise(trajectories, seed + 1), y, A,
                sigmas, repeats=repeats, seed=seed, every=every,
                callback=lambda i: bar.update(1))
        cli.write_json(os.path.join(out, "observation_1.json"), done["observation_1"])
    if "observation_2" not in done:
        with tqdm(total=k_mean, desc="observation II", unit="sample") as bar:
            done["observation_2"] = observation_2(
                reference, unconditional, runs, noise(k_mean, seed + 2), y, A, sigmas,
                repeats=repeats, seed=seed, chunk=batch, callback=bar.update)
        cli.write_json(os.path.join(out, "observation_2.json"), done["observation_2"])
    maps = {}
    for label, name, hyper in runs[:len(zetas)] + runs[-1:] + [("CSE", "ddpm", {})]:
        path = os.path.join(out, "observation_3_" + label.replace(" ", "_") + ".npy")
        if not os.path.exists(path):
            denoiser = reference if label == "CSE" else unconditional
            images = []
            for i in tqdm(range(0, k, batch), desc=f"observation III {label}", unit="batch"):
                b = min(batch, k - i)
                g = torch.Generator(device).manual_seed(seed + 3 + i)
                z0 = dmap.SAMPLERS[name](denoiser, noise(b, seed + 3 + i), y, A, sigmas,
                                         generator=g, **hyper)
                with torch.no_grad():
                    images.append(sd.decode(z0).float().clamp(-1, 1))  # as the authors
            std = pixel_std(torch.cat(images))
            cli.write_atomic(path, lambda tmp, v=std: np.save(tmp, v))
        maps[label] = np.load(path)
    text = observations_markdown(done, maps, image=image, op=op, size=size, steps=steps,
                                 cse=cse, trajectories=trajectories, k_mean=k_mean, k=k)
    cli.write_text(os.path.join(out, "observations.md"), text)
    for file, figure in draw_observations(done, maps).items():
        cli.write_atomic(os.path.join(out, file), figure.save)
    return dict(done, maps=maps, markdown=text)


def observations_markdown(done, maps, *, image, op, size, steps, cse, trajectories, k_mean,
                          k) -> str:
    one, two = done["observation_1"], done["observation_2"]
    lines = [f"# Observations of Sec. 3 on {image} ({op}, {size} px, "
             f"{steps} steps, code {cli.code_version()})", "",
             "Reference conditional score: the CSE " + cse + ". Errors and means in "
             "epsilon units per coordinate (sigma * RMS); the authors' Fig. 1 plots (1 - abar_t)"
             " times the squared error.", "",
             f"## Table 1: mean score error over the {len(one['sigmas'])} steps "
             f"({trajectories} CSE trajectories)", "", "| score | error |", "|---|---|"]
    lines += [f"| {label} | {np.mean(e):.4g} |" for label, e in one["error"].items()]
    lines += ["", f"## Table 2: the mean score at x_T over {k_mean} samples", "",
              "| score | norm of the mean | its standard error | RMS of the score |",
              "|---|---|---|---|"]
    lines += [f"| {label} | {m['norm']:.4g} | {m['se']:.3g} | {m['rms']:.4g} |"
              for label, m in two.items()]
    lines += ["", f"## Table 3: per-pixel standard deviation over {k} samples (pixels on "
              "[-1, 1], as the authors' cal_var.ipynb: StableSR 0.1080, DPS 0.0453)", "",
              "| method | mean std |", "|---|---|"]
    lines += [f"| {label} | {v.mean():.4g} |" for label, v in maps.items()]
    return "\n".join(lines) + "\n"


def draw_observations(done, maps) -> dict:
    one = done["observation_1"]
    curve = plot.line_plot({label: (one["sigmas"], e) for label, e in one["error"].items()},
                           logx=True, logy=True, xlabel="sigma (sampling runs right to left)",
                           ylabel="sigma * RMS error", title="Observation I: each score "
                           "against the CSE's, along CSE trajectories")
    top = max(v.max() for v in maps.values())
    heat = plot.image_grid([[plot.heat_map(v, vmin=0, vmax=top, label="std") for v in
                             maps.values()]], [[f"{k}: mean {v.mean():.3g}" for k, v in
                                                maps.items()]],
                           title="Observation III: per-pixel standard deviation over samples")
    return {"observation_1.png": curve, "observation_3.png": heat}




# ---------------------------------------------------------------------------------------------
# (3) The command line (also `python eval.py observe`)
# ---------------------------------------------------------------------------------------------


def add_arguments(o: argparse.ArgumentParser) -> None:
    o.add_argument("--image", required=True, help="the reference image of the measurement")
    o.add_argument("--op", default="sr", help=f"operator: {dmap.OP_HELP}")
    o.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    o.add_argument("--cse", required=True, help="a trained CSE: the reference conditional "
                   "score")
    o.add_argument("--steps", type=int, default=50, help="sampling steps")
    o.add_argument("--zeta", help="dps, dsg and dmap step sizes instead of dmap.py's "
                   "defaults, as for eval.py run (dps=1.2,dsg=0.1,dmap=2.4)")
    o.add_argument("--zetas", help="DPS step sizes, comma list (default: DPS's zeta x 1/4, 1, "
                   "4)")
    o.add_argument("--trajectories", type=int, default=4, help="CSE trajectories (Obs. I)")
    o.add_argument("--every", type=int, default=1, help="score errors every this many steps")
    o.add_argument("--repeats", type=int, default=8, help="noise draws per point for the DSG "
                   "and DMAP implied scores")
    o.add_argument("--k-mean", type=int, default=1000, help="samples of x_T (Obs. II)")
    o.add_argument("--k", type=int, default=50, help="samples per method (Obs. III)")
    o.add_argument("--batch", type=int, default=8, help="samples at once")
    dmap.add_operator_flags(o)
    cli.add_model_flags(o, size=512, device=dmap.DEVICE)


def command(args: argparse.Namespace) -> str:
    """The command's body: flags -> observe's keywords; prints the tables."""
    try:
        zetas = [float(z) for z in args.zetas.split(",")] if args.zetas else None
    except ValueError:
        raise ValueError(f"--zetas takes a comma list of numbers, got {args.zetas!r}") from None
    result = observe(args.image, args.out, cse=args.cse, model=args.model, op=args.op,
                     size=args.size, steps=args.steps,
                     zeta=cli.parse_map(args.zeta, "--zeta", float), zetas=zetas,
                     trajectories=args.trajectories, every=args.every, repeats=args.repeats,
                     k_mean=args.k_mean, k=args.k, batch=args.batch, seed=args.seed,
                     prediction=args.prediction, dtype=args.dtype, device=args.device,
                     **{k: getattr(args, k) for k in dmap.OPERATOR_FLAGS})
    print(result["markdown"])
    return f"wrote observations.md, observation_1.png and observation_3.png to {args.out}"


INTERRUPTED = "before the end; every part on disk is whole: rerun the same command to continue"


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.DefaultsHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    return cli.run(lambda: command(args), interrupted=INTERRUPTED, to_stderr=True)


if __name__ == "__main__":
    sys.exit(main())
