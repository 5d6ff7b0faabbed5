"""Baseline vs fast progressive pretraining on the demo data, at equal epochs: pretraining wall time,
training FLOPs and linear-probe top-1 of each encoder.

    python benchmarks/progressive_demo.py [--epochs N] [--probe-epochs N] [--seeds 0 1 2] [--out runs/bench_progressive]

Runs the commands a user types (`python -m fastssl.pretrain recipes/demo/pretrain_cpu{,_fast}.yaml`,
then `python -m fastssl.linprobe`) for each seed, prints a table (top-1 mean ± half the range over
seeds) and writes benchmarks/results/progressive_demo.json after every seed. Wall time is the
pretraining process's, start to exit, on whatever CPU this runs on: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import fail, print_table, write_results  # noqa: E402
from fastssl.config import PretrainConfig, load_config  # noqa: E402
from fastssl.demo import make_demo_betons  # noqa: E402
from fastssl.train import checkpoint, flops  # noqa: E402

RECIPES = {"baseline": "recipes/demo/pretrain_cpu.yaml", "fast": "recipes/demo/pretrain_cpu_fast.yaml"}
# The 4-view cached probe (as benchmarks/scalenet_demo.py): six live probes would take most of an hour on
# 2 CPU cores; with the demo probe's mild crops it tracks the live one (benchmarks/linprobe_cache.py).
PROBE = "recipes/demo/linprobe_fast_cpu.yaml"


def python(*args: str) -> float:
    """Run `python ARGS` in the repo; its wall time in seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--out", default="runs/bench_progressive")
    p.add_argument("--epochs", type=int, help="pretraining epochs for both (default: the recipes' 40)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default: the recipe's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    train, val = make_demo_betons((ROOT / args.data).resolve())
    common = [f"data.train={train}", f"data.val={val}", "log.wandb=disabled", "log.progress=false",
              "log.recon_every_epochs=0", *([f"epochs={args.epochs}"] if args.epochs else [])]
    runs = []
    for seed in args.seeds:  # both recipes per seed, so machine noise hits them alike
        for name, recipe in RECIPES.items():
            run_dir = out / f"seed_{seed}" / name
            if run_dir.exists():
                fail(f"{run_dir} exists; remove it or pass another --out (a resumed run would not time)")
            overrides = [f"run_dir={run_dir}", f"seed={seed}", *common]
            wall = python("-m", "fastssl.pretrain", recipe, *overrides)
            probe_dir = out / f"seed_{seed}" / f"linprobe_{name}"
            python("-m", "fastssl.linprobe", PROBE, f"init={checkpoint.list_checkpoints(run_dir)[-1]}",
                   f"run_dir={probe_dir}", f"seed={seed}", f"data.train={train}", f"data.val={val}",
                   "log.wandb=disabled", "log.progress=false",
                   *([f"epochs={args.probe_epochs}"] if args.probe_epochs else []))
            top1 = json.loads((probe_dir / "results.json").read_text())["val/top1"]
            runs.append({"run": name, "seed": seed, "pretrain_wall_s": wall, "linprobe_top1": top1})
            print(f"seed {seed} {name}: pretrain {wall:.1f} s, linear-probe top-1 {top1:.2f}%", flush=True)
        report(runs, common)


def report(runs: list[dict], common: list[str]) -> None:
    """The table over the seeds run so far, and benchmarks/results/progressive_demo.json."""
    rows = {}
    for name, recipe in RECIPES.items():
        cfg = load_config(PretrainConfig, ROOT / recipe, common)
        mine = [r for r in runs if r["run"] == name]
        walls, top1 = [r["pretrain_wall_s"] for r in mine], [r["linprobe_top1"] for r in mine]
        f = flops.recipe_flops(cfg, images=1)
        rows[name] = {"recipe": recipe, "epochs": cfg.epochs, "flops_ratio": f["ratio"],
                      "train_gflops_per_epoch_image": f["total"] / cfg.epochs / 1e9,
                      "pretrain_wall_s_mean": statistics.mean(walls), "linprobe_top1": top1,
                      "linprobe_top1_mean": statistics.mean(top1),
                      "linprobe_top1_half_range": (max(top1) - min(top1)) / 2}
    base = rows["baseline"]["pretrain_wall_s_mean"]
    seeds = sorted({r["seed"] for r in runs})
    print_table(f"baseline vs fast progressive pretraining on the demo, seeds {seeds}",
                ["run", "recipe", "epochs", "FLOPs ratio", "pretrain wall s", "speed-up", "LP top-1 per seed",
                 "LP top-1 mean"],
                [[name, f"`{r['recipe'].removeprefix('recipes/')}`", r["epochs"], f"{r['flops_ratio']:.2f}x",
                  f"{r['pretrain_wall_s_mean']:.1f}", f"{base / r['pretrain_wall_s_mean']:.2f}x",
                  " ".join(f"{t:.2f}" for t in r["linprobe_top1"]),
                  f"{r['linprobe_top1_mean']:.2f} ±{r['linprobe_top1_half_range']:.2f}"] for name, r in rows.items()])
    print(f"wrote {write_results('progressive_demo', {'seeds': seeds, 'probe': PROBE, 'rows': rows, 'runs': runs})}")


if __name__ == "__main__":
    main()
