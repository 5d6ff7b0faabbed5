"""Linear probe: live encoding every epoch (the MAE protocol) against the cached-feature fast path.

    python benchmarks/linprobe_cache.py --init runs/demo/pretrain/checkpoints/ckpt_….pt --views 1 2 4

Same recipe, seed and data for every row (recipes/demo/linprobe_cpu.yaml unless --recipe); prints a
table of wall time, speed-up and top-1 and writes it as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fastssl import checkpoint, linprobe
from fastssl.config import LinProbeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes/demo/linprobe_cpu.yaml"))
    p.add_argument("--init", help="checkpoint to probe (default: newest in runs/demo/pretrain)")
    p.add_argument("--data", default=str(ROOT / "data/demo"), help="folder with train.beton and val.beton")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", default=str(ROOT / "runs/bench_linprobe_cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/linprobe_cache.json"))
    p.add_argument("overrides", nargs="*", help="key=value overrides for every row, e.g. epochs=30")
    args = p.parse_args()
    init = args.init or str(checkpoint.list_checkpoints(ROOT / "runs/demo/pretrain")[-1])
    base = [f"init={init}", f"data.train={args.data}/train.beton", f"data.val={args.data}/val.beton",
            "log.wandb=disabled", "log.progress=false", *args.overrides]

    rows = []
    for views in [0, *args.views]:
        run_dir = Path(args.runs) / f"views_{views}"
        cfg = load_config(LinProbeConfig, args.recipe, [*base, f"run_dir={run_dir}", f"cache_views={views}"])
        for old in checkpoint.list_checkpoints(run_dir):  # time a whole run, not a resumed one
            old.unlink()
        t0 = time.perf_counter()
        result = linprobe.run(cfg)
        rows.append({"mode": "live" if views == 0 else "cached", "views": views, "epochs": cfg.epochs,
                     "seconds": time.perf_counter() - t0, "top1": result["val/top1"]})
    live = rows[0]
    for r in rows:
        r["speedup"] = live["seconds"] / r["seconds"]
        r["top1_delta"] = r["top1"] - live["top1"]

    print(f"\nlinear probe, {live['epochs']} epochs, {init}")
    print(f"{'mode':<8}{'views':>6}{'seconds':>10}{'speed-up':>10}{'top-1':>9}{'delta':>8}")
    for r in rows:
        print(f"{r['mode']:<8}{r['views']:>6}{r['seconds']:>10.1f}{r['speedup']:>9.1f}x{r['top1']:>8.2f}%"
              f"{r['top1_delta']:>+8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"init": init, "recipe": args.recipe, "overrides": args.overrides, "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
