"""Run every benchmark: ``python -m benchmarks.run [--quick] [--only loader,...]``.

Each benchmark is a module ``benchmarks.<name>`` (run in its own process) that prints its table and
writes ``benchmarks/results/<name>.json`` (+ ``.png``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .common import fail

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS = ("loader", "data_prep", "train_step", "memory", "recipe_compute", "linprobe_cache", "mask_views_demo",
              "autoprog_search_demo", "apollo_demo", "family_demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller settings: < 3 minutes in all")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    a = p.parse_args(argv)
    names = BENCHMARKS if a.only is None else tuple(a.only.split(","))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        fail(f"--only {unknown[0]}: unknown benchmark (choose from {', '.join(BENCHMARKS)})")
    failed = 0
    for name in names:
        t = time.perf_counter()
        # a process each: one benchmark's memory, threads and compiled code must not skew the next
        rc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if a.quick else [])],
                            cwd=ROOT).returncode
        print(f"## {name}: {time.perf_counter() - t:.0f} s" + (f" (FAILED, exit {rc})" if rc else "") + "\n",
              flush=True)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
