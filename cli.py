"""Command plumbing shared by every command (dmap.py, cse.py, eval.py, observations.py,
speed.py, toy_gmm.py, gmm_benchmark.py, mini.py): the parser, its help format and the flags
every model command shares, the wrapper that turns errors and Ctrl-C into one line and an exit
code, the number of torch threads, atomic writers and reading records back. Nothing here knows
a model; only the standard library is imported, so a command imports this module first,
before torch.

Exit codes: 0 done, 2 bad input (one `error:` line that says what to do), 130 Ctrl-C (one
`interrupted` line that says what was kept).
"""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

# ---------------------------------------------------------------------------------------------
# (1) Before torch is imported: Ctrl-C and the number of threads
# ---------------------------------------------------------------------------------------------


def _interrupted_while_starting(signum, frame):
    print("interrupted while starting; nothing done", file=sys.stderr, flush=True)
    os._exit(130)  # not an exception: it could surface as a traceback inside any import


def _runs_a_command() -> bool:
    """True when the script Python runs is one of this repository's commands (not a notebook,
    pytest or another program that imports the modules: their Ctrl-C stays theirs)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.dirname(os.path.abspath(script)) == os.path.dirname(os.path.abspath(__file__))


def idle_cores(seconds: float = 0.1) -> float:
    """How many of this process's cores were idle over the next `seconds` (/proc/stat), or
    all of them where /proc/stat cannot be read."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def times():  # the "cpu" line: user nice system idle iowait irq softirq steal ...
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = times()
        time.sleep(seconds)
        total1, idle1 = times()
    except (OSError, ValueError):
        return float(cores or 1)
    share = (idle1 - idle0) / max(total1 - total0, 1)  # of all the machine's cores
    return min(share * (os.cpu_count() or 1), cores or 1)


if _runs_a_command():
    signal.signal(signal.SIGINT, _interrupted_while_starting)  # `run` puts Python's back
    # torch's threads: as many as there are idle cores, at least one. On a busy machine more
    # threads than free cores make every parallel region wait for a descheduled thread: tiny
    # workloads ran 8-29x slower (README.md, "Threads"). OMP_NUM_THREADS, when set, wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, round(idle_cores()))))

# ---------------------------------------------------------------------------------------------
# (2) The parser and the wrapper around a command's body
# ---------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a short error: the usage line (positionals only) and one `error:` line,
    exit code 2, instead of every flag's usage before it."""

    def error(self, message):
        formatter = self._get_formatter()
        formatter.add_usage(None, self._get_positional_actions(), [])
        usage = formatter.format_help().strip().replace("usage: ", "", 1)
        sys.stderr.write(f"usage: {usage} [options] (--help lists them)\n"
                         f"error: {message}\n")
        sys.exit(2)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, once: not for a required flag, a flag without
    one (None) or a switch, nor where the help already says it; a list as it is typed. The
    description (a module's docstring) keeps its lines."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if action.required or default is None or default is False or \
                default is argparse.SUPPRESS or "(default" in help:
            return help
        if isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{help} (default: {str(default).replace('%', '%%')})"


DEFAULT_MODEL = os.environ.get("SD2_MODEL", "./weights/stable-diffusion-2-base")


def add_model_flags(p: argparse.ArgumentParser, *, size: int | None, device: str,
                    size_help: str = "image size in pixels", seed_help: str = "random seed",
                    dtype: bool = True) -> None:
    """The flags every command that loads a model shares: --model --prediction --size --seed
    --dtype (unless dtype is False) --device (device: the default, cuda where there is one)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="SD 2.x or 1.x pipeline folder or "
                   "single .safetensors file (default: $SD2_MODEL or %(default)s)")
    p.add_argument("--prediction", choices=["eps", "v"], help="eps (SD 2 512-base, SD 1.x) or v "
                   "(SD 2 768-v); needed for a single-file 768-v checkpoint (default: the "
                   "folder's scheduler config, eps for a single file)")
    p.add_argument("--size", type=int, default=size, help=size_help)
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    if dtype:
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="network dtype; latents, sigmas and the guidance step stay float32")
    p.add_argument("--device", default=device, help="torch device (under torchrun: "
                   "cuda:LOCAL_RANK)")


def run(body: Callable[[], str], *, interrupted: str, to_stderr: bool = False) -> int:
    """A command's main(): `body()` returns the line printed when it is done. A ValueError is
    the user's to fix: `error: <message>`, exit 2; so is an OSError (a full disk, a folder that
    cannot be written), named with its file. Ctrl-C prints `interrupted <what was kept>`, exit
    130: the KeyboardInterrupt's message when the code that was running gave one, else
    `interrupted`. The closing line goes to stdout, or to stderr when stdout carries results."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = body()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        advice = "free space and rerun" if e.errno == errno.ENOSPC else \
            "check the path and its permissions"
        print(f"error: {e.strerror or e}{where}; {advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted {e.args[0] if e.args else interrupted}", file=sys.stderr)
        return 130
    print(done, file=sys.stderr if to_stderr else sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------
# (3) Atomic writers: a crash, a kill or a full disk never leaves half a file
# ---------------------------------------------------------------------------------------------


def write_atomic(path: str, save: Callable[[str], object]) -> None:
    """save(tmp) then rename onto path; the temporary file is removed on any failure."""
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    def dump(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, dump)


def write_json(path: str, value) -> None:
    write_text(path, json.dumps(value, indent=2))


def read_json(path: str) -> dict | None:
    """The JSON object in the file `path`; None when it holds none (truncated, or not JSON): a
    record that does not parse is work not done."""
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError:  # json's errors, and bytes that are not text
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------
# (4) What records and flags share
# ---------------------------------------------------------------------------------------------


def check(conditions) -> None:
    """Bad input is one line: ValueError with the message of the first (ok, message) whose ok
    is false."""
    for ok, message in conditions:
        if not ok:
            raise ValueError(message)


def parse_map(text: str | None, what: str, value=str) -> dict:
    """A comma list of KEY=VALUE (keys as given: 'dps=1.2,sr/dmap=3' or 'sr=runs/a') -> dict;
    ValueError saying the form."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, eq, v = item.partition("=")
        try:
            out[key.strip()] = value(v)
        except ValueError:
            eq = ""
        if not eq or not key.strip():
            raise ValueError(f"{what} takes a comma list of NAME=VALUE, got {item!r}")
    return out


def code_version() -> str:
    """The git commit of this checkout (+dirty with uncommitted changes), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")
