"""Pretrain loader memory over epochs: resident memory must stay flat, not grow per epoch.

    python -m benchmarks.memory [--quick] [--epochs 3] [--workers 2] [--res 224] [--leave-after 2]

FFCV's workers are threads of this process, so the process's memory is the loader's memory. After
each epoch (and as the peak sampled at every batch) it reports RSS, and its split (psutil
``memory_full_info``) into USS -- pages private to this process -- and the rest, shared pages, which
are file-backed: the shared libraries and, with ``os_cache=True``, the memory-mapped .beton in the OS
page cache. Under DDP every rank maps the same file, so those pages are held once per node, not once
per rank; only USS multiplies with the number of processes. The first epoch grows the allocators'
pools; flat means no growth after it: ``growth`` = (last epoch - first) / (epochs - 1), and
``steady`` = the same from epoch 1 on. A second loader runs epochs that its consumer leaves after
``--leave-after`` batches, as a training loop's ``break`` does (before a partial accumulation window,
or on a stop signal): they too must leave no thread or buffers behind.
"""
from __future__ import annotations

import argparse
import gc
import threading

import psutil

from .common import fail, print_table, write_results
from .photos import photo_beton

MIB = 2**20


def _sample() -> dict:
    m = psutil.Process().memory_full_info()
    return {"rss": m.rss / MIB, "uss": m.uss / MIB, "shared": (m.rss - m.uss) / MIB}


def _epochs(loader, epochs: int, leave_after: int | None) -> list[dict]:
    """Memory (and live threads) after each epoch, each left after ``leave_after`` batches if set."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        peak = 0.0
        for i, _ in enumerate(loader):
            peak = max(peak, psutil.Process().memory_info().rss / MIB)
            if leave_after is not None and i + 1 == leave_after:
                break
        out.append({**_sample(), "peak_rss": peak, "threads": threading.active_count()})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 photos at 160 px")
    p.add_argument("--epochs", type=int, help="default 6; 3 with --quick")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--res", type=int, help="crop size (default 224; 160 with --quick)")
    p.add_argument("--leave-after", type=int, default=2, help="batches of each epoch the second loader takes")
    a = p.parse_args(argv)
    a.epochs = a.epochs or (3 if a.quick else 6)
    if a.epochs < 3:
        fail(f"--epochs {a.epochs}: must be >= 3 (epoch 0 warms up; then a drift)")
    if a.leave_after < 1:
        fail(f"--leave-after {a.leave_after}: must be >= 1")
    from fastssl.data import make_pretrain_loader

    images = 256 if a.quick else 512
    res = a.res or (160 if a.quick else 224)
    _, beton = photo_beton(images, a.workers)
    before = _sample()
    keys = ("rss", "peak_rss", "uss", "shared")
    runs, rows = {}, []
    for mode, leave_after in (("whole", None), (f"left after {a.leave_after}", a.leave_after)):
        loader = make_pretrain_loader(beton, a.batch, res, a.workers, seed=0, os_cache=True)
        epochs = _epochs(loader, a.epochs, leave_after)
        del loader
        gc.collect()  # ffcv's reader sits in a reference cycle: unmap its .beton before the next run
        growth = {k: (epochs[-1][k] - epochs[0][k]) / (a.epochs - 1) for k in keys}
        steady = {k: (epochs[-1][k] - epochs[1][k]) / (a.epochs - 2) for k in keys}
        runs[mode] = {"epochs": epochs, "growth_mib_per_epoch": growth, "steady_growth_mib_per_epoch": steady}
        rows += [[mode, k, *(f"{e[c]:.0f}" for c in keys), e["threads"]] for k, e in enumerate(epochs)]
        rows += [[mode, "growth /epoch", *(f"{growth[c]:+.1f}" for c in keys), ""],
                 [mode, "steady /epoch (from 1)", *(f"{steady[c]:+.1f}" for c in keys), ""]]
    table = print_table(f"Pretrain loader memory, MiB ({a.workers} worker threads, batch {a.batch}, "
                        f"{res} px, {images} photos; before the loader: RSS {before['rss']:.0f})",
                        ["epochs", "epoch", "RSS at end", "peak RSS", "USS (private)", "shared (file-backed)",
                         "threads"], rows)
    results = {"workers": a.workers, "batch": a.batch, "res": res, "images": images,
               "beton_mib": beton.stat().st_size / MIB, "before_loader": before, "runs": runs, "table": table}
    write_results("memory", results, {f"{mode}: epoch {k} RSS": e["rss"]
                                      for mode, r in runs.items() for k, e in enumerate(r["epochs"])}, quick=a.quick)
    return results


if __name__ == "__main__":
    main()
