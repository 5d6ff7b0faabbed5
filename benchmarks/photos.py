"""Realistic benchmark images: ImageNet-like JPEGs made from the two real photographs that
scikit-learn ships (``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, 427x640).

Each image is a random crop (50-100% of each side) of one photo, resized so its long side is 400-500 px
(ImageNet's typical size after a ``--max-res 500`` conversion), randomly flipped, colour-jittered
(brightness/contrast/saturation ±30%) and saved at JPEG quality 90 (4:2:0, PIL's default): a few
hundred distinct photographs with real-photo entropy, which is what decode cost depends on. Synthetic
images (noise, flat colours) decode at very different speeds and mislead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "bench"  # /data/ is git-ignored


def make_photos(out: Path, n: int, seed: int = 0) -> Path:
    """``out/train/<photo>/*.jpg`` (an ImageFolder of ``n`` images); kept if already complete."""
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    root = Path(out) / "train"
    if len(list(root.glob("*/*.jpg"))) == n:
        return root
    sample = load_sample_images()
    names = [Path(f).stem for f in sample.filenames]
    rng = np.random.default_rng(seed)
    for k in range(n):
        c = k % len(names)
        src = Image.fromarray(sample.images[c])
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = src.crop((x, y, x + cw, y + ch))
        long_side = int(rng.integers(400, 501))
        f = long_side / max(cw, ch)
        im = im.resize((max(1, round(cw * f)), max(1, round(ch * f))), Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enhance(im).enhance(rng.uniform(0.7, 1.3))
        path = root / names[c] / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)
    return root


def photo_beton(n: int, workers: int = 2) -> tuple[Path, Path]:
    """(ImageFolder root, .beton of it with every image stored as JPEG q90, max side 500)."""
    from data_prep.write_ffcv import convert

    base = CACHE / f"photos{n}"
    root = make_photos(base, n)
    beton = base / "train_jpg.beton"
    if not beton.exists():
        convert(root, beton, write_mode="jpg", max_res=500, jpeg_quality=90, workers=workers,
                log=lambda *a, **k: None)
    return root, beton
