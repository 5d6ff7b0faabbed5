"""The whole journey on the demo data, as the commands a user would type (`make demo` runs this).

make demo images -> convert to .beton -> pretrain a micro MAE -> linear-probe it and a random
encoder. Every step is idempotent: finished outputs are kept, a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from fastssl.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]  # scripts and recipes are named relative to the repo


def sh(*args: str) -> None:
    print("$ python " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def make_demo_betons(data: Path, per_class: int | None = None) -> tuple[Path, Path]:
    """The demo images (`per_class` digits of each class, None: all) and their train/val .beton
    files under `data` (kept if already there)."""
    train, val = data / "train.beton", data / "val.beton"
    subset = ["--per-class", str(per_class)] if per_class else []
    sh("data_prep/make_demo_dataset.py", "--out", str(data / "images"), *subset)
    for split, beton in (("train", train), ("val", val)):
        if not beton.exists():
            sh("data_prep/write_ffcv.py", "--src", str(data / "images" / split), "--out", str(beton),
               "--max-res", "64", "--jpeg-quality", "90", "--workers", "2")
    return train, val


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastssl.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo", help="where the images and .beton files go")
    p.add_argument("--runs", default="runs/demo", help="where the run folders go")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: the recipe's)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default: the recipe's)")
    args = p.parse_args(argv)
    runs = Path(args.runs).resolve()
    train, val = make_demo_betons(Path(args.data).resolve())
    data_keys = [f"data.train={train}", f"data.val={val}"]
    sh("-m", "fastssl.pretrain", "recipes/demo/pretrain_cpu.yaml", f"run_dir={runs / 'pretrain'}",
       *data_keys, *([f"epochs={args.epochs}"] if args.epochs else []))
    ckpt = checkpoint.list_checkpoints(runs / "pretrain")[-1]
    results = {}
    for name, init in (("pretrained", str(ckpt)), ("random", "random")):
        run_dir = runs / f"linprobe_{name}"
        sh("-m", "fastssl.linprobe", "recipes/demo/linprobe_cpu.yaml", f"init={init}",
           f"run_dir={run_dir}", *data_keys, *([f"epochs={args.probe_epochs}"] if args.probe_epochs else []))
        results[name] = json.loads((run_dir / "results.json").read_text())["val/top1"]

    print("\nlinear probe on the demo val split (top-1):")
    print(f"  pretrained MAE encoder  {results['pretrained']:6.2f}%")
    print(f"  random encoder          {results['random']:6.2f}%")
    print(f"reconstructions: {runs / 'pretrain' / 'recon'}")


if __name__ == "__main__":
    main()
