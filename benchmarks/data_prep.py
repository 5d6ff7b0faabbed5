"""Dataset conversion throughput (img/s): our converter vs a plain decode+resize+encode loop.

    python -m benchmarks.data_prep [--quick] [--workers 2] [--max-res 500]

Same photos (:mod:`benchmarks.photos`), same worker count, JPEG q90 output:
- ``convert``: ``data_prep.write_ffcv.convert`` end to end (listing, ffcv's writer with our
  decoding workers, the rename);
- ``plain loop``: a ``multiprocessing.Pool`` of the same size doing PIL open -> RGB -> resize to
  ``--max-res`` (long side, only if larger; Lanczos) -> JPEG q90 encode, the parent appending the
  bytes to one file -- the least any converter must do.
The ratio shows what ffcv's writer (and skipping unreadable files safely) costs over the bare work.
Each also runs on the first half of the photos: ``per image`` is the marginal rate (the second half's
images / the time they added), which leaves out what a run pays once (ffcv's writer start-up, the pool).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import tempfile
from functools import partial
from pathlib import Path

from .common import fail, fmt_rate, measure_interleaved, print_table, write_results
from .photos import CACHE, make_photos


def _reencode(path: str, max_res: int) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    if max(im.size) > max_res:
        f = max_res / max(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def plain_loop(files: list[str], out: Path, max_res: int, workers: int) -> int:
    with mp.Pool(workers) as pool, open(out, "wb") as f:
        for blob in pool.imap(partial(_reencode, max_res=max_res), files, chunksize=16):
            f.write(blob)
    return len(files)


def run_convert(root: Path, out: Path, max_res: int, workers: int) -> int:
    from data_prep.write_ffcv import convert

    return convert(root, out, write_mode="jpg", max_res=max_res, jpeg_quality=90, workers=workers,
                   force=True, log=lambda *a, **k: None).images


def marginal_rate(extra_images: int, added_seconds: float) -> float | None:
    """The extra images over the time they added; None where noise hid it (the larger run no slower:
    seen with --quick's 128 extra images on a loaded machine)."""
    return extra_images / added_seconds if added_seconds > 0 else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_prep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 photos, --max-res 500 only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, help="photos (default 512; 256 with --quick)")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    if a.workers < 1:
        fail(f"--workers {a.workers}: must be >= 1")
    images = a.images or (256 if a.quick else 512)
    half = images // 2
    roots = {n: make_photos(CACHE / f"photos{n}", n) for n in (half, images)}  # same seed: half = first half
    files = {n: sorted(str(f) for f in root.glob("*/*.jpg")) for n, root in roots.items()}
    # 500: ImageNet's usual --max-res (photos are 400-500 px, so no resize); 256: every image resized
    settings = (500,) if a.quick else (500, 256)
    import ffcv.writer  # noqa: F401 -- ffcv's import (~6 s) is the process's, not the first run's
    results = {"workers": a.workers, "images": images, "max_res": {}}
    rows = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        for max_res in settings:
            jobs = {}
            for n in (half, images):
                jobs[f"convert {n}"] = partial(run_convert, roots[n], tmp / "out.beton", max_res, a.workers)
                jobs[f"plain loop {n}"] = partial(plain_loop, files[n], tmp / "out.bin", max_res, a.workers)
            stats = measure_interleaved(jobs, a.runs)
            seconds = {(w, n): n / stats[f"{w} {n}"]["median"] for w in ("convert", "plain loop")
                       for n in (half, images)}
            per_image = {w: marginal_rate(images - half, seconds[w, images] - seconds[w, half])
                         for w in ("convert", "plain loop")}
            results["max_res"][max_res] = {"runs": stats, "per_image": per_image}
            base = stats[f"plain loop {images}"]["median"]
            for w in ("convert", "plain loop"):
                m = stats[f"{w} {images}"]
                marginal, loop = per_image[w], per_image["plain loop"]
                rows.append([max_res, w, fmt_rate(m), f"{m['median'] / base:.2f}x",
                             "n/a" if marginal is None else f"{marginal:.0f}",
                             "n/a" if marginal is None or loop is None else f"{marginal / loop:.2f}x"])
    table = print_table(f"Conversion img/s ({a.workers} workers, {images} photos, JPEG q90)",
                        ["max res", "writer", "img/s (median ± half-spread)", "vs plain loop", "per image",
                         "vs plain loop"], rows)
    results["table"] = table
    bars = {f"{r} {w} per image": v for r, s in results["max_res"].items() for w, v in s["per_image"].items()
            if v is not None}
    write_results("data_prep", results, bars, quick=a.quick)
    return results


if __name__ == "__main__":
    main()
