"""Write a small real, labelled image set as a JPEG ImageFolder (train/ and val/).

The images are scikit-learn's bundled handwritten digits (1797 images, 8x8 grayscale, 10 classes),
so the demo needs no download. Each digit is upscaled bicubically and written as white ink on black
in RGB (the pipeline's format). No per-image colours: a random hue is a nuisance that pixel
reconstruction must encode and that dominates feature similarity, so it hid what MAE learns of the
shapes on a set this small.

    python data_prep/make_demo_dataset.py --out data/demo [--size 64] [--per-class N] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = ".complete.json"


def _stratified_split(labels: np.ndarray, per_class: int | None, val_fraction: float,
                      rng: np.random.Generator) -> tuple[list[int], list[int]]:
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))[:per_class]
        n_val = int(round(len(idx) * val_fraction))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def _render(digit: np.ndarray, size: int) -> Image.Image:
    gray = Image.fromarray(np.uint8(digit * (255.0 / 16.0)), mode="L")
    return gray.resize((size, size), Image.BICUBIC).convert("RGB")


def make_demo_dataset(out: str | Path, size: int = 64, per_class: int | None = None, seed: int = 0,
                      val_fraction: float = 0.2, force: bool = False) -> Path:
    """Create ``out/{train,val}/<digit>/*.jpg``; return ``out``. Skips work if ``out`` is complete."""
    from sklearn.datasets import load_digits

    out = Path(out)
    params = {"size": size, "per_class": per_class, "seed": seed, "val_fraction": val_fraction}
    marker = out / MARKER
    if out.exists() and not force:
        if marker.exists() and json.loads(marker.read_text()) == params:
            return out
        raise FileExistsError(f"{out} exists and was not made with these settings (use --force)")

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train, val = _stratified_split(digits.target, per_class, val_fraction, rng)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end, so a half-written tree never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, indices in (("train", train), ("val", val)):
            for i in indices:
                label = int(digits.target[i])
                folder = tmp / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                _render(digits.images[i], size).save(folder / f"digit_{i:04d}.jpg", quality=95)
        (tmp / MARKER).write_text(json.dumps(params))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--size", type=int, default=64, help="side of the square RGB images (px)")
    p.add_argument("--per-class", type=int, default=None, help="images per class before the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--force", action="store_true", help="rebuild even if OUT exists")
    a = p.parse_args(argv)
    if a.size < 8:
        p.error(f"--size {a.size}: must be at least 8")
    if a.per_class is not None and a.per_class < 2:
        p.error(f"--per-class {a.per_class}: must be at least 2")
    if not 0.0 < a.val_fraction < 1.0:
        p.error(f"--val-fraction {a.val_fraction}: must be in (0, 1)")
    try:
        out = make_demo_dataset(a.out, a.size, a.per_class, a.seed, a.val_fraction, a.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = {s: sum(1 for _ in (out / s).glob("*/*.jpg")) for s in ("train", "val")}
    print(f"{out}: {n['train']} train / {n['val']} val images, 10 classes, {a.size}px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
