"""Baseline vs fast progressive pretraining on the demo data, at equal epochs: pretraining wall time,
training FLOPs and linear-probe top-1 of each encoder.

    python benchmarks/progressive_demo.py [--epochs N] [--probe-epochs N] [--out runs/bench_progressive]

Runs the commands a user types (`python -m fastssl.pretrain recipes/demo/pretrain_cpu{,_fast}.yaml`,
then `python -m fastssl.linprobe`), prints a table and writes `<out>/results.json`. Wall time is the
pretraining process's, start to exit, on whatever CPU this runs on: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import fail  # noqa: E402
from fastssl.config import PretrainConfig, load_config  # noqa: E402
from fastssl.demo import make_demo_betons  # noqa: E402
from fastssl.train import checkpoint, flops  # noqa: E402

RECIPES = {"baseline": "recipes/demo/pretrain_cpu.yaml", "fast": "recipes/demo/pretrain_cpu_fast.yaml"}


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
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    train, val = make_demo_betons((ROOT / args.data).resolve())
    common = [f"data.train={train}", f"data.val={val}", "log.wandb=disabled", "log.progress=false",
              "log.recon_every_epochs=0", *([f"epochs={args.epochs}"] if args.epochs else [])]
    rows = {}
    for name, recipe in RECIPES.items():
        run_dir = out / name
        if run_dir.exists():
            fail(f"{run_dir} exists; remove it or pass another --out (a resumed run would not time)")
        overrides = [f"run_dir={run_dir}", *common]
        cfg = load_config(PretrainConfig, ROOT / recipe, overrides)
        wall = python("-m", "fastssl.pretrain", recipe, *overrides)
        probe_dir = out / f"linprobe_{name}"
        python("-m", "fastssl.linprobe", "recipes/demo/linprobe_cpu.yaml",
               f"init={checkpoint.list_checkpoints(run_dir)[-1]}", f"run_dir={probe_dir}",
               f"data.train={train}", f"data.val={val}", "log.wandb=disabled", "log.progress=false",
               *([f"epochs={args.probe_epochs}"] if args.probe_epochs else []))
        top1 = json.loads((probe_dir / "results.json").read_text())["val/top1"]
        f = flops.recipe_flops(cfg, images=1)
        rows[name] = {"recipe": recipe, "epochs": cfg.epochs, "pretrain_wall_s": wall,
                      "train_gflops_per_epoch_image": f["total"] / cfg.epochs / 1e9,
                      "flops_ratio": f["ratio"], "linprobe_top1": top1}
    base = rows["baseline"]["pretrain_wall_s"]
    print(f"\n{'run':<9} {'recipe':<36} {'epochs':>6} {'FLOPs ratio':>11} {'wall s':>7} {'speed-up':>8} {'LP top-1':>8}")
    for name, r in rows.items():
        print(f"{name:<9} {r['recipe']:<36} {r['epochs']:>6} {r['flops_ratio']:>10.2f}x {r['pretrain_wall_s']:>7.1f} "
              f"{base / r['pretrain_wall_s']:>7.2f}x {r['linprobe_top1']:>7.2f}%")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
