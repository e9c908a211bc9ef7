"""Command plumbing shared by every command (dmap.py, cse.py, eval.py, toy_gmm.py, mini.py,
speed.py): the parser, the wrapper that turns errors and Ctrl-C into one line and an exit
code, the number of torch threads, and atomic writers. Nothing here knows a model; only the
standard library is imported, so a command imports this module first, before torch.

Exit codes: 0 done, 2 bad input (one `error:` line that says what to do), 130 Ctrl-C (one
`interrupted` line that says what was kept).
"""

import argparse
import errno
import json
import os
import signal
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
