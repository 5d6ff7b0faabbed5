"""Run every benchmark: ``python -m benchmarks.run [--quick] [--only loader,...]``.

Each benchmark is a module ``benchmarks.<name>`` with ``main(argv) -> dict`` that prints its table and
writes ``benchmarks/results/<name>.json`` (+ ``.png``). Benchmarks owned by other issues plug in by
adding their module under the name listed here; a missing one is reported as not present.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

BENCHMARKS = ("loader", "data_prep", "train_step", "memory", "recipe_compute", "linprobe_cache")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller settings: < 3 minutes in all")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    a = p.parse_args(argv)
    names = BENCHMARKS if a.only is None else tuple(a.only.split(","))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: --only {unknown[0]}: unknown benchmark (choose from {', '.join(BENCHMARKS)})",
              file=sys.stderr)
        return 2
    for name in names:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"## {name}: not present yet", flush=True)
            continue
        t = time.perf_counter()
        importlib.import_module(f"benchmarks.{name}").main(["--quick"] if a.quick else [])
        print(f"## {name}: {time.perf_counter() - t:.0f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
