"""How fast the ``zoo`` command answers: ``zoo --help``, ``list``, ``models``, ``recipes`` against
``python -c "import torch"`` (the floor of any command that imports torch), in one run.

Each command runs as a fresh process, alternating with the baseline, ``--rounds`` times; medians
and the ratio to the baseline are printed (below 1: faster than merely importing torch).

    python bench/bench_cli.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "zoo --help": ["-m", "zoo.cli", "--help"],
    "zoo list": ["-m", "zoo.cli", "list"],
    "zoo models": ["-m", "zoo.cli", "models"],
    "zoo recipes": ["-m", "zoo.cli", "recipes"],
}
BASELINE = ["-c", "import torch"]


def wall(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "MEDZOO_HOME": home}
        wall(BASELINE, env)  # warm the page cache for both
        times: dict[str, list[float]] = {name: [] for name in [*COMMANDS, "import torch"]}
        for _ in range(args.rounds):
            for name, cmd in COMMANDS.items():
                times[name].append(wall(cmd, env))
                times["import torch"].append(wall(BASELINE, env))
    base = statistics.median(times["import torch"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.rounds} rounds, medians")
    label = 'python -c "import torch"'
    print(f"{label:28s} {base:6.2f} s  (baseline)")
    for name in COMMANDS:
        t = statistics.median(times[name])
        print(f"{name:28s} {t:6.2f} s  {t / base:5.2f} x baseline  (min {min(times[name]):.2f}, "
              f"max {max(times[name]):.2f})")


if __name__ == "__main__":
    main()
