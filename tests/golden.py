"""Every number the commands make, recorded so that a change of shape can prove it changed none.

    python tests/golden.py record DIR    # run the commands below into DIR, write DIR/manifest.json
    python tests/golden.py compare A B     # the two manifests: equal, or every difference named

What is recorded (each through its command line, which a refactor must keep): a restoration by
every method and operator with the shipped prior (pixel space) and by every method on a tiny
Stable Diffusion-shaped pipeline (latent space, with and without a CSE); a few CSE training
steps' weights; `eval.py run` and `score` tables; `eval.py observe`; the tables of
`python toy_gmm.py` and `python gmm_benchmark.py`; `mini.py --quick`'s report numbers. Files
are compared byte for byte (images, weights, arrays) and JSON after dropping what depends on
the clock or the folder (seconds, dates, paths).
Run both sides on the same machine with the same threads: float results depend on the CPU.
"""

import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import skimage.data  # noqa: E402
from conftest import tiny_pipeline  # noqa: E402
from PIL import Image  # noqa: E402

PRIOR = os.path.join(ROOT, "models", "mini-prior")
METHODS = ("ddpm", "dps", "dsg", "dmap", "freedom", "resample", "psld")
# JSON keys whose values depend on the clock, the machine or the folder, not on the numbers
VOLATILE = {"seconds", "peak_mb", "date", "code", "machine", "cpu", "threads"}


def command(*argv: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")


def record(out: str) -> None:
    os.makedirs(out, exist_ok=False)
    pipe, photos = os.path.join(out, "pipe"), os.path.join(out, "photos")
    tiny_pipeline(pipe)
    os.makedirs(photos)
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(photos, f"{name}.png"))
    example = os.path.join(PRIOR, "example.png")
    for op in ("sr", "blur", "inpaint"):
        for m in METHODS:
            command("dmap.py", example, "--model", PRIOR, "--method", m, "--op", op,
                    "--out", os.path.join(out, "prior"))
    cse = os.path.join(out, "cse")
    command("cse.py", "train", "--model", pipe, "--images", photos, "--out", cse, "--size", "64",
            "--num-images", "3", "--batch", "2", "--micro-batch", "2", "--steps", "2", "--lr",
            "1e-3", "--validate-every", "0", "--device", "cpu")
    astronaut = os.path.join(photos, "astronaut.png")
    for m in METHODS:
        command("dmap.py", astronaut, "--model", pipe, "--method", m, "--op", "sr", "--size",
                "64", "--steps", "4", "--out", os.path.join(out, "sd"), "--device", "cpu")
    for m in ("ddpm", "dps", "dmap"):
        command("dmap.py", astronaut, "--model", pipe, "--method", m, "--op", "sr", "--size",
                "64", "--steps", "4", "--cse", os.path.join(cse, "checkpoint-2"), "--out",
                os.path.join(out, "sd-cse"), "--device", "cpu")
    command("eval.py", "run", "--images", photos, "--out", os.path.join(out, "run"), "--model",
            pipe, "--size", "64", "--steps", "3", "--methods", "ddpm,dps,dmap-same,psld",
            "--device", "cpu", "--metrics", "psnr,ssim,sw", "--op", "sr,blur", "--batch", "2")
    command("eval.py", "score", "--ref", os.path.join(out, "run", "reference"), "--pred",
            os.path.join(out, "run", "sr", "dps"), "--metrics", "psnr,ssim,sw", "--json",
            os.path.join(out, "score.json"))
    command("eval.py", "observe", "--image", astronaut, "--op", "sr", "--cse",
            os.path.join(cse, "checkpoint-2"), "--out", os.path.join(out, "observe"), "--model",
            pipe, "--size", "64", "--steps", "3", "--k", "3", "--k-mean", "4", "--trajectories",
            "2", "--repeats", "2", "--batch", "2", "--device", "cpu")
    command("toy_gmm.py", "--out", os.path.join(out, "toy"))
    command("gmm_benchmark.py", "--out", os.path.join(out, "toy"))  # was part of toy_gmm.py
    command("mini.py", "--quick", "--out", os.path.join(out, "mini"))
    manifest = fingerprints(out)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    print(f"recorded {len(manifest)} files in {out}")


def fingerprints(out: str) -> dict:
    """{file: its fingerprint} of every file under `out` but the manifest."""
    found = {}
    for folder, _, files in os.walk(out):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.relpath(path, out) != "manifest.json":
                found[os.path.relpath(path, out)] = fingerprint(path)
    return found


def new_form(key: str, value):
    """The two records whose form changed when the commands became functions, in their new
    form: a run's zeta, once the flag's text ("dps=4,sr/dmap=8"), now {name: zeta}; mini.py's
    operator settings, once flags (["--sr-factor", "4"]), now {"sr_factor": 4}."""
    if key == "zeta" and isinstance(value, str):
        return {k: float(v) for k, v in (item.split("=") for item in value.split(","))}
    if key == "ops" and isinstance(value, dict) and all(isinstance(v, list) for v in
                                                        value.values()):
        return {op: {flag[2:].replace("-", "_"): float(v) if "." in v else int(v)
                     for flag, v in zip(flags[::2], flags[1::2], strict=True)}
                for op, flags in value.items()}
    return value


def stable(value):
    """A JSON value without what depends on the clock, the machine or the folder."""
    if isinstance(value, dict):
        return {k: stable(new_form(k, v)) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, str) and (os.sep in value or value.startswith("/")):
        return "<path>"
    return value


def fingerprint(path: str):
    if path.endswith((".md", ".txt", ".log")) or os.path.basename(path) == "seconds.json":
        return None  # prose with times and paths (its numbers are in the JSON beside it); times
    if path.endswith(".json"):
        with open(path) as f:
            return stable(json.load(f))
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compare(a: str, b: str) -> int:
    """The two folders' files, fingerprinted now (so a rule changed here applies to both)."""
    left, right = fingerprints(a), fingerprints(b)
    bad = [f"only in {a}: {k}" for k in sorted(set(left) - set(right))]
    bad += [f"only in {b}: {k}" for k in sorted(set(right) - set(left))]
    bad += [f"differs: {k}" for k in sorted(set(left) & set(right)) if left[k] != right[k]]
    print("\n".join(bad) or f"all {len(left)} files equal")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"] and len(sys.argv) == 3:
        record(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
