"""Loader throughput (img/s): our pretrain loader vs PIL, torchvision and stock FFCV, same photos.

    python -m benchmarks.loader [--quick] [--workers 2] [--batch 64]

Every loader reads the same JPEGs (:mod:`benchmarks.photos`) with the same workers and batch, does
RandomResizedCrop(res, scale=(0.2, 1)) + horizontal flip, and yields a batch tensor:
- ``ours``: ``make_pretrain_loader`` (crop-aware decoder, the default), normalised float32 NCHW;
- ``ours, full decode``: the same with ``crop_decode=False`` (decode all, then crop);
- ``ffcv stock``: ffcv's ``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip``, uint8;
- ``PIL``: torch DataLoader over the JPEG files, PIL decode + torchvision RandomResizedCrop
  (bilinear) + flip + ToTensor + Normalize; ``PIL draft``: the same, but PIL's ``draft()`` first
  decodes at the smallest DCT scale that keeps the crop >= res (the best-configured PIL);
- ``tv decode_jpeg``: torchvision ``decode_jpeg`` + v2 RandomResizedCrop (antialias) + flip + Normalize;
- ``limit``: single-thread full-JPEG decode rate (PyTurboJPEG) x workers: what decoding every pixel
  of every image costs, the ceiling for any loader that does so.
"""
from __future__ import annotations

import argparse
import math
import random
from functools import partial

import numpy as np
import torch

from fastssl.data.loaders import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD

from .common import fmt_rate, measure, measure_interleaved, print_table, write_results
from .photos import photo_beton


class _Photos(torch.utils.data.Dataset):
    """The photo files through a PIL or torchvision pipeline (RandomResizedCrop + flip + normalise)."""

    def __init__(self, files: list[str], res: int, kind: str):
        self.files, self.res, self.kind = files, res, kind

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from torchvision.transforms import v2

        if self.kind == "tv":
            from torchvision.io import decode_jpeg, read_file

            img = decode_jpeg(read_file(self.files[i]))
            img = v2.RandomResizedCrop(self.res, scale=(0.2, 1.0), antialias=True)(img)
            img = v2.RandomHorizontalFlip()(img)
            return v2.functional.normalize(img.float().div_(255), MEAN, STD), 0
        from PIL import Image

        im = Image.open(self.files[i])
        i0, j0, h, w = _rrc_params(im.size)
        if self.kind == "pil_draft":
            # draft() picks a DCT scale 1/2^k with size >= the request: ask for the crop's scale
            f = min(h, w) / self.res
            if f >= 2:
                k = 2 ** min(3, int(math.log2(f)))
                w0, h0 = im.size
                im.draft("RGB", (w0 // k, h0 // k))
                sx, sy = im.size[0] / w0, im.size[1] / h0
                i0, j0, h, w = i0 * sy, j0 * sx, min(h * sy, im.size[1] - i0 * sy), min(w * sx, im.size[0] - j0 * sx)
        im = im.convert("RGB").resize((self.res, self.res), Image.BILINEAR, box=(j0, i0, j0 + w, i0 + h))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)
        return v2.functional.normalize(x, MEAN, STD), 0  # (image, label) like the ffcv loaders


def _rrc_params(size: tuple[int, int]) -> tuple[int, int, int, int]:
    from torchvision.transforms import RandomResizedCrop

    w, h = size
    return RandomResizedCrop.get_params(torch.empty(1, h, w), [0.2, 1.0], [3 / 4, 4 / 3])


def _epochs(loader, epochs: int) -> int:
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch[0])
    return n


def _torch_loader(files, res, kind, workers, batch):
    ds = _Photos(files, res, kind)
    # spawn: forking after ffcv/numba started their thread pools leaves the children's pools broken
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=True,
                                       multiprocessing_context="spawn")


def _ffcv_stock(beton, res, workers, batch):
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    pipe = [RandomResizedCropRGBImageDecoder((res, res), scale=(0.2, 1.0)), RandomHorizontalFlip(),
            ToTensor(), ToTorchImage()]
    return Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM,
                  drop_last=True, os_cache=True, pipelines={"image": pipe, "label": None})


def decode_limit(files: list[str], runs: int) -> dict:
    """Single-thread full decode rate (img/s) of the JPEG files with libjpeg-turbo."""
    from turbojpeg import TurboJPEG

    tj = TurboJPEG()
    blobs = [open(f, "rb").read() for f in files]

    def run() -> int:
        for b in blobs:
            tj.decode(b)
        return len(blobs)

    run()
    return measure(run, runs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="160 and 224 px, one epoch a run, without the PIL draft and torchvision rows")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=None, help="photos (default 512; 256 with --quick)")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    from fastssl.data import make_pretrain_loader
    torch.set_num_threads(a.workers)
    a.images = a.images or (256 if a.quick else 512)
    root, beton = photo_beton(a.images, a.workers)
    files = sorted(str(f) for f in root.glob("*/*.jpg"))
    resolutions = (160, 224) if a.quick else (128, 160, 192, 224)
    epochs = 1 if a.quick else 2
    limit = decode_limit(files, a.runs)
    limit_x = {k: v * a.workers for k, v in limit.items() if k != "runs"}
    results, rows = {"limit_per_thread": limit, "workers": a.workers, "batch": a.batch,
                     "images": a.images, "epochs_per_run": epochs, "loaders": {}}, []
    for res in resolutions:
        loaders = {
            "ours": make_pretrain_loader(beton, a.batch, res, a.workers, seed=0),
            "ours, full decode": make_pretrain_loader(beton, a.batch, res, a.workers, seed=0,
                                                      crop_decode=False),
            "ffcv stock": _ffcv_stock(beton, res, a.workers, a.batch),
            "PIL": _torch_loader(files, res, "pil", a.workers, a.batch),
        }
        if not a.quick:  # each spawns its own worker processes: the bulk of --quick's time
            loaders["PIL draft"] = _torch_loader(files, res, "pil_draft", a.workers, a.batch)
            loaders["tv decode_jpeg"] = _torch_loader(files, res, "tv", a.workers, a.batch)
        for ld in loaders.values():
            _epochs(ld, 1)  # warm-up: numba compilation, worker start, page cache
        stats = measure_interleaved({k: partial(_epochs, ld, epochs) for k, ld in loaders.items()}, a.runs)
        pil = stats["PIL"]["median"]
        results["loaders"][res] = stats
        for k, m in stats.items():
            rows.append([res, k, fmt_rate(m), f"{m['median'] / pil:.2f}x",
                         f"{m['median'] / limit_x['median']:.2f}"])
        rows.append([res, f"limit: 1-thread decode x {a.workers}", fmt_rate(limit_x), f"{limit_x['median'] / pil:.2f}x", "1.00"])
        del loaders
    table = print_table(f"Loader img/s ({a.workers} workers, batch {a.batch}, {a.images} photos)",
                        ["res", "loader", "img/s (median ± half-spread)", "vs PIL", "vs limit"], rows)
    results["table"] = table
    bars = {f"{r} {k}": m["median"] for r, s in results["loaders"].items() for k, m in s.items()}
    write_results("loader", results, bars, quick=a.quick)
    return results


if __name__ == "__main__":
    main()
