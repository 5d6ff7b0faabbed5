"""The whole journey on the demo data, as the commands a user would type (`make demo` runs this).

make demo images -> convert to .beton -> pretrain a micro MAE -> linear probe and kNN of it and of a
random encoder, beside logistic regression on the raw pixels. Every step is idempotent: finished
outputs are kept, a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def pixel_baseline(images: Path, side: int = 16) -> float:
    """Top-1 (%) on val of scikit-learn's logistic regression on the raw grey pixels of the demo
    images, box-downsampled to side x side: what the encoders' features are measured against."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        files = sorted((images / name).glob("*/*.jpg"))
        x = np.stack([np.asarray(Image.open(f).convert("L").resize((side, side), Image.BOX), np.float32).ravel()
                      for f in files]) / 255.0
        return x, np.array([int(f.parent.name) for f in files])

    (x, y), (xv, yv) = split("train"), split("val")
    clf = LogisticRegression(max_iter=2000).fit(x, y)  # lbfgs: deterministic
    return 100.0 * float((clf.predict(xv) == yv).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastssl.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo", help="where the images and .beton files go")
    p.add_argument("--runs", default="runs/demo", help="where the run folders go")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: the recipe's)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default: the recipe's)")
    args = p.parse_args(argv)
    runs = Path(args.runs).resolve()
    data = Path(args.data).resolve()
    train, val = make_demo_betons(data)
    data_keys = [f"data.train={train}", f"data.val={val}"]
    sh("-m", "fastssl.pretrain", "recipes/demo/pretrain_cpu.yaml", f"run_dir={runs / 'pretrain'}",
       *data_keys, *([f"epochs={args.epochs}"] if args.epochs else []))
    ckpt = checkpoint.list_checkpoints(runs / "pretrain")[-1]
    probe, knn = {}, {}
    for name, init in (("pretrained", str(ckpt)), ("random", "random")):
        run_dir = runs / f"linprobe_{name}"
        sh("-m", "fastssl.linprobe", "recipes/demo/linprobe_cpu.yaml", f"init={init}",
           f"run_dir={run_dir}", *data_keys, *([f"epochs={args.probe_epochs}"] if args.probe_epochs else []))
        probe[name] = json.loads((run_dir / "results.json").read_text())["val/top1"]
        run_dir = runs / f"knn_{name}"
        sh("-m", "fastssl.knn", "recipes/demo/knn_cpu.yaml", f"init={init}", f"run_dir={run_dir}", *data_keys)
        knn[name] = json.loads((run_dir / "results.json").read_text())["knn/top1"]
    pixels = pixel_baseline(data / "images")

    print("\ndemo val split, top-1 (10 classes):")
    print(f"  {'':32} {'linear probe':>12} {'kNN (k=20)':>11}")
    for name, label in (("pretrained", "pretrained MAE encoder"), ("random", "random encoder")):
        print(f"  {label:32} {probe[name]:11.2f}% {knn[name]:10.2f}%")
    print(f"  {'raw pixels, logistic regression':32} {pixels:11.2f}%")
    print(f"reconstructions: {runs / 'pretrain' / 'recon'}")


if __name__ == "__main__":
    main()
