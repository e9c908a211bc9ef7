"""The commands' plumbing (cli.py): exit codes and one-line messages for bad input, full disks
and Ctrl-C, also while the command is still importing torch."""

import cli

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("dmap.py", "cse.py", "eval.py", "toy_gmm.py", "gmm_benchmark.py", "observations.py",
            "speed.py", "mini.py")


@pytest.mark.parametrize("raised, code, line", [
    (ValueError("--steps must be >= 1"), 2, "error: --steps must be >= 1"),
    (OSError(errno.ENOSPC, "No space left on device", "out/a.png"), 2,
     "error: No space left on device (out/a.png); free space and rerun"),
    (OSError(errno.EACCES, "Permission denied", "/root/x"), 2,
     "error: Permission denied (/root/x); check the path and its permissions"),
    (KeyboardInterrupt("at step 3 of 9; nothing written"), 130,
     "interrupted at step 3 of 9; nothing written"),
    (KeyboardInterrupt(), 130, "interrupted before sampling"),
])
def test_run_exit_codes(capsys, raised, code, line):
    def body():
        raise raised

    assert cli.run(body, interrupted="before sampling") == code
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line] and captured.out == ""
    assert cli.run(lambda: "done", interrupted="x") == 0
    assert capsys.readouterr().out == "done\n"


def test_parser_error_is_two_lines(capsys):
    """argparse's own errors: the positionals' usage line and the error, not every flag."""
    p = cli.ArgumentParser(prog="dmap.py")
    p.add_argument("image")
    for k in range(30):
        p.add_argument(f"--flag-{k}", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["a.png", "--flag-3", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: dmap.py image [options] (--help lists them)",
        "error: argument --flag-3: invalid int value: 'many'"]


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    def save(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        cli.write_atomic(str(tmp_path / "a.json"), save)
    assert list(tmp_path.iterdir()) == []
    cli.write_json(str(tmp_path / "a.json"), {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}'


def test_commands_are_not_the_importer():
    """Importing the modules (pytest, a notebook) leaves Python's Ctrl-C alone."""
    assert signal.getsignal(signal.SIGINT) is not cli._interrupted_while_starting


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_while_importing(command):
    """Ctrl-C in the first half second of a command (torch still importing): one line, exit
    130, not a KeyboardInterrupt traceback and death by SIGINT."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, command, "--help"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps, start = f"/proc/{proc.pid}/maps", time.monotonic()
    while time.monotonic() - start < 30:  # until torch's libraries load: cli came before
        with open(maps) as f:
            if "torch" in f.read():
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.splitlines() == ["interrupted while starting; nothing done"] and out == "", err


def test_idle_cores_sees_a_busy_machine():
    """With every core busy in other processes, no core is idle: a command then runs torch on
    one thread (cli.py section 1), not on as many as the machine has."""
    cores = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        assert max(1, round(cli.idle_cores(0.3))) == 1
    finally:
        for p in busy:
            p.kill()
            p.wait()
