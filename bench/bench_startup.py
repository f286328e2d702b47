"""Start-up cost of the `gpuherd` CLI, side by side with the official `vastai --help`: each
command runs N times as a fresh subprocess and the bench prints median and minimum wall time and
CPU time (user + system, from the child's rusage).

    .venv-test/bin/python bench/bench_startup.py [--runs 10] [--cold]

Every run gets the same fresh data directory (GPUHERD_HOME in a temporary folder, removed at
the end) with the instant sandbox. One untimed `gpuherd status` runs first, so the timed
one-shots find the embedded database already migrated: that is what a user's second command
costs. `--cold` gives every run a new data directory instead (the first command after install,
which creates and migrates the database). The targets (issue: CLI start-up) are `--help` under
0.3 s and a one-shot `status` under 0.6 s on the 2-CPU development machine.

Bytecode: a user's Python writes `__pycache__` on the first run and reads it on every later one,
so the children run with it, kept under the bench's temporary folder (PYTHONPYCACHEPREFIX, filled
by one untimed run; PYTHONDONTWRITEBYTECODE, which the development machine sets, is dropped for
them). Without a cache every run compiles gpuherd's own modules again: 0.1-0.2 s more per command.

Why CPU as well as wall: the machine is shared, so wall time carries other people's load; CPU
time of the child is what gpuherd itself spends."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    def row(self, label: str) -> str:
        return (f"{label:<34} wall median {statistics.median(self.wall):6.3f} s  min {min(self.wall):6.3f} s   "
                f"cpu median {statistics.median(self.cpu):6.3f} s  min {min(self.cpu):6.3f} s")


def _env(home: Path) -> dict[str, str]:
    """The child's environment: its data directory `home`, and the bytecode cache every run
    shares, beside the homes in the bench's temporary folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPUHERD_") and k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env.update(GPUHERD_HOME=str(home), GPUHERD_SANDBOX_TIME_SCALE="0", COLUMNS="120",
               PYTHONPYCACHEPREFIX=str(home.parent / "pycache"))
    return env


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall s, child CPU s, exit code) of one run. The CPU is the difference of this process's
    children rusage around the run: runs are sequential, so it is exactly that child's."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        sys.stderr.write(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-400:]}\n")
    return wall, cpu, done.returncode


def measure(argv: list[str], runs: int, root: Path, *, cold: bool, tag: str) -> Timing:
    """`runs` timed runs of argv: all in the shared warm home, or (cold) each in a home of its own."""
    timing = Timing([], [])
    shared = root / "home"
    for i in range(runs):
        home = root / f"cold-{tag}-{i}" if cold else shared
        wall, cpu, _ = run_once(argv, _env(home))
        timing.wall.append(wall)
        timing.cpu.append(cpu)
    return timing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command (default 10)")
    parser.add_argument("--cold", action="store_true", help="a new data directory for every run")
    opts = parser.parse_args()
    gpuherd = str(BIN / "gpuherd")
    commands: list[tuple[str, list[str]]] = [
        ("gpuherd --help", [gpuherd, "--help"]),
        ("gpuherd status", [gpuherd, "status"]),
        ("gpuherd --json status", [gpuherd, "--json", "status"]),
    ]
    vastai = BIN / "vastai"
    if vastai.exists():
        commands.insert(1, ("vastai --help (official CLI)", [str(vastai), "--help"]))
    else:
        print(f"(no {vastai}: the vastai comparison is skipped)")
    root = Path(tempfile.mkdtemp(prefix="gpuherd-bench-startup-"))
    try:
        run_once([gpuherd, "status"], _env(root / "warm-up"))      # fill the bytecode cache
        if not opts.cold:
            run_once([gpuherd, "status"], _env(root / "home"))     # create and migrate the database once
        print(f"{opts.runs} runs each, {'a new' if opts.cold else 'one warm'} data directory, python {sys.version.split()[0]}")
        for n, (label, argv) in enumerate(commands):
            print(measure(argv, opts.runs, root, cold=opts.cold, tag=str(n)).row(label), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
