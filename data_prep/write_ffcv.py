"""Convert an ImageFolder (or a flat ImageNet val folder + labels file) to an FFCV ``.beton``.

    python data_prep/write_ffcv.py --src /data/imagenet/train --out /fast/in1k_train.beton \\
        --max-res 500 --jpeg-quality 90 --compress-prob 0.5 --workers 32
    python data_prep/write_ffcv.py --src /data/imagenet/val --out /fast/in1k_val.beton \\
        --classes-from /fast/in1k_train.beton \\
        [--labels-file LOC_val_solution.csv | --labels-file ILSVRC2012_validation_ground_truth.txt --synsets meta.mat]

Fields: ``image`` (ffcv RGBImageField) and ``label`` (IntField, index into the class list written
beside the output as ``NAME.classes.txt``). Samples are stored sorted by (label, path).

Files that fail to decode are skipped and listed, never written. They are found while writing, in
one decode per image: a worker that meets one hands ffcv a placeholder and flags it (ffcv's main
process would wait forever for a worker that died on an exception), and only if any were flagged is
the output written again without them. (A separate check pass before writing, as this converter
first had, costs one more decode per image: 0.51x a plain decode+encode loop at 500 px.)

ffcv stores each image within one page of the file, and a worker handed a larger image dies
(8 MiB pages by default: a 2000x1500 raw image does not fit). The pages are sized for the largest
image the run stores: from --max-res when given (the square bound), else from the image headers
(one header read per file, no decode). Any worker that still dies ends the conversion with an
error rather than a wait. A temp file that an earlier, killed conversion left beside the output is
removed (and reported) once its process is gone.

EXIF orientation is ignored by default, as torchvision's ImageFolder and the published ImageNet
pipelines do (so numbers stay comparable); --exif-transpose stores photos upright instead.

Write modes (ffcv): raw (pixels), jpg (all JPEG at --jpeg-quality), proportion (each image JPEG with
probability --compress-prob, else raw), smart (JPEG when the raw pixels exceed --smart-threshold bytes).
Without --write-mode/--preset: proportion if --compress-prob is given, else raw (no JPEG loss; the
right choice for eval sets, where compression costs accuracy).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from multiprocessing import util as mp_util
from pathlib import Path

import numpy as np

from fastssl import atomic
from fastssl.data.classes import classes_path, read_class_file, read_classes, write_classes
from fastssl.data.imagefolder import DatasetError, Listing, list_class_folders, list_flat, open_checked

from PIL import Image

WRITE_MODES = ("raw", "jpg", "smart", "proportion")


@dataclass(frozen=True)
class Options:
    max_res: int | None = 500  # longest side after resizing; None keeps the original size
    jpeg_quality: int = 90
    write_mode: str | None = None  # None: see module docstring
    compress_prob: float | None = None
    smart_threshold: int = 286432  # DailyMAE's value (bytes of raw pixels, ~ 309x309 RGB)


# Published settings. DailyMAE (erow/FastSSL bin/write_dataset.py): smart, 500 px, q90.
# ffcv-imagenet (write_imagenet.sh, ResNet-50 configs): proportion 0.5, 500 px, q90.
PRESETS: dict[str, Options] = {
    "dailymae": Options(max_res=500, jpeg_quality=90, write_mode="smart", smart_threshold=286432),
    "ffcv-imagenet": Options(max_res=500, jpeg_quality=90, write_mode="proportion", compress_prob=0.5),
}


def resolve_options(preset: str | None = None, **given) -> Options:
    """Defaults < preset < explicit values (``given``; None means not given). Validates the result."""
    if preset is not None and preset not in PRESETS:
        raise DatasetError(f"--preset {preset}: unknown (choose from {', '.join(PRESETS)})")
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(Options)}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    opts = replace(PRESETS[preset] if preset else Options(), **given)
    if "compress_prob" in given and opts.write_mode != "proportion":
        if "write_mode" in given:
            raise DatasetError(f"--compress-prob applies to --write-mode proportion, not {opts.write_mode}")
        opts = replace(opts, write_mode="proportion")
    if opts.write_mode is None:
        opts = replace(opts, write_mode="raw")
    if opts.max_res == 0:
        opts = replace(opts, max_res=None)
    _validate(opts)
    return opts


def _validate(o: Options) -> None:
    if o.write_mode not in WRITE_MODES:
        raise DatasetError(f"--write-mode {o.write_mode}: unknown (choose from {', '.join(WRITE_MODES)})")
    if not 1 <= o.jpeg_quality <= 100:
        raise DatasetError(f"--jpeg-quality {o.jpeg_quality}: must be in 1..100")
    if o.compress_prob is not None and not 0.0 <= o.compress_prob <= 1.0:
        raise DatasetError(f"--compress-prob {o.compress_prob}: must be in 0..1")
    if o.max_res is not None and not 1 <= o.max_res <= 65535:
        raise DatasetError(f"--max-res {o.max_res}: must be 0 (keep size) or in 1..65535")
    if o.smart_threshold < 0:
        raise DatasetError(f"--smart-threshold {o.smart_threshold}: must be >= 0")


@dataclass
class Summary:
    out: Path
    images: int
    classes: list[str]
    bytes: int
    seconds: float
    options: Options
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"wrote {self.out}: {self.images} images, {len(self.classes)} classes, "
                 f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s "
                 f"({self.options.write_mode}, max-res {self.options.max_res}, q{self.options.jpeg_quality})"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class _Images:
    """What ffcv's writer workers index. A file that cannot be written must not kill a worker -- ffcv
    would wait for it forever -- so it becomes a 1-pixel placeholder and is flagged in ``failed``."""

    def __init__(self, samples: list[tuple[str, int]], max_res: int | None, exif_transpose: bool):
        self.samples, self.max_res, self.exif_transpose = samples, max_res, exif_transpose
        self.failed = mp.Array("b", len(samples), lock=False)  # shared with the forked workers

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        im, _ = open_checked(path, self.max_res, self.exif_transpose)
        if im is None:
            self.failed[i] = 1
            return np.zeros((1, 1, 3), np.uint8), label
        return im, label


class _WorkerWatch:
    """ffcv's writer waits until its workers have counted every sample, so a worker that dies (an
    exception inside ffcv's encoder, the OOM killer) would leave it waiting forever. Each forked
    worker records its pid here; a thread of the main process looks at their exit status without
    reaping them (waitid WNOWAIT, so multiprocessing can still join them) and, when one ended badly,
    interrupts the main thread's wait with SIGINT. A worker that dies while multiprocessing is still
    starting the others may be reaped by it unseen; the rest are all watched."""

    def __init__(self, workers: int):
        self.pids = mp.Array("q", workers, lock=True)  # filled by the workers as they start
        self.failure: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        mp_util.register_after_fork(self, _WorkerWatch._record)

    def _record(self) -> None:  # in each new worker
        with self.pids.get_lock():
            free = [i for i, pid in enumerate(self.pids[:]) if pid == 0]
            if free:
                self.pids[free[0]] = os.getpid()

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            for pid in filter(None, self.pids[:]):
                try:
                    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:  # already reaped by multiprocessing (while starting others)
                    continue
                if info is None or (info.si_code == os.CLD_EXITED and info.si_status == 0):
                    continue
                how = (f"exit code {info.si_status}" if info.si_code == os.CLD_EXITED
                       else f"signal {signal.Signals(info.si_status).name}")
                self.failure = f"a writer worker died ({how}; its error, if any, is above)"
                # a real signal, not interrupt_main: it also breaks a blocking read (ffcv's queue.get)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    def __enter__(self) -> _WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if self.failure is not None:
            for pid in filter(None, self.pids[:]):  # the others would wait for work that never comes
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


MIN_PAGE_SIZE = 8 * 2**20  # ffcv's default
MAX_PAGE_SIZE = 2**31  # ffcv's pages are powers of two below 4 GiB


def _raw_bytes(size: tuple[int, int], max_res: int | None) -> int:
    """Bytes of an image's raw RGB pixels once ffcv has resized it to ``max_res`` (its rule)."""
    w, h = size
    if max_res is not None and max(w, h) > max_res:
        w, h = int(w * max_res / max(w, h)), int(h * max_res / max(w, h))
    return w * h * 3


def page_size(samples: list[tuple[str, int]], max_res: int | None) -> int:
    """The smallest ffcv page (a power of two, at least ffcv's default) that holds the largest image:
    its raw pixels, which also bound its JPEG. Raises DatasetError if that is over ffcv's limit."""
    largest, path = 3 * max_res * max_res if max_res else 0, None
    if not max_res or largest > MAX_PAGE_SIZE:  # the square bound is no use: read the headers
        largest = 0
        for p, _ in samples:
            try:
                with Image.open(p) as im:
                    size = im.size
            except Exception:  # noqa: BLE001 -- unreadable: skipped by the workers, with its reason
                continue
            if _raw_bytes(size, max_res) > largest:
                largest, path = _raw_bytes(size, max_res), p
    if largest > MAX_PAGE_SIZE:
        raise DatasetError(f"{path}: {largest / 2**30:.1f} GiB of raw pixels, over ffcv's "
                           f"{MAX_PAGE_SIZE // 2**30} GiB limit per image (set --max-res)")
    return max(MIN_PAGE_SIZE, 1 << (largest - 1).bit_length())


def _write_beton(path: Path, samples: list[tuple[str, int]], opts: Options, workers: int,
                 chunk_size: int, exif_transpose: bool = False) -> list[int]:
    """Write ``samples`` to ``path``; the indices of those that failed (written as placeholders)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image = RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_res,
                          smart_threshold=opts.smart_threshold, jpeg_quality=opts.jpeg_quality,
                          compress_probability=opts.compress_prob or 0.0)
    dataset = _Images(samples, opts.max_res, exif_transpose)
    writer = DatasetWriter(str(path), {"image": image, "label": IntField()},
                           page_size=page_size(samples, opts.max_res), num_workers=workers)
    watch = _WorkerWatch(workers)
    try:
        with watch:
            writer.from_indexed_dataset(dataset, chunksize=chunk_size)
    except KeyboardInterrupt:
        if watch.failure is None:
            raise
        writer.metadata_sm.close()  # ffcv frees its shared memory only when it finishes
        writer.metadata_sm.unlink()
        raise DatasetError(f"{watch.failure}: nothing written") from None
    return np.flatnonzero(np.frombuffer(dataset.failed, np.int8)).tolist()


def _take_evenly(samples: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The first ``n`` samples taking classes in turn, so a trial run sees every class."""
    seen: dict[int, int] = {}
    ranked = []
    for path, label in samples:
        ranked.append((seen.get(label, 0), label, path))
        seen[label] = seen.get(label, 0) + 1
    return sorted(((p, lab) for _, lab, p in sorted(ranked)[:n]), key=lambda s: (s[1], s[0]))


def _load_class_list(classes_from: str | os.PathLike) -> list[str]:
    p = Path(classes_from)
    try:
        return read_classes(p) if p.suffix == ".beton" else read_class_file(p)
    except FileNotFoundError:
        want = classes_path(p) if p.suffix == ".beton" else p
        raise DatasetError(f"--classes-from {classes_from}: {want} not found") from None


def _listing(src: Path, classes_from, labels_file, synsets) -> Listing:
    if not src.is_dir():
        raise DatasetError(f"--src {src}: no such folder")
    classes = _load_class_list(classes_from) if classes_from else None
    if labels_file:
        return list_flat(src, labels_file, classes, synsets)
    if synsets:
        raise DatasetError("--synsets needs --labels-file")
    return list_class_folders(src, classes)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(src: str | os.PathLike, out: str | os.PathLike, *, preset: str | None = None,
            max_res: int | None = None, jpeg_quality: int | None = None, compress_prob: float | None = None,
            write_mode: str | None = None, smart_threshold: int | None = None,
            exif_transpose: bool = False, workers: int | None = None, chunk_size: int = 100,
            force: bool = False,
            classes_from: str | os.PathLike | None = None, labels_file: str | os.PathLike | None = None,
            synsets: str | os.PathLike | None = None, limit: int | None = None, log=print) -> Summary:
    """Write ``src`` to ``out`` (a ``.beton``) and ``NAME.classes.txt`` beside it.

    Image options left None come from ``preset``, then from :class:`Options` (``max_res=0``: keep
    size). ``exif_transpose``: store photos upright by their EXIF Orientation (default: the pixels as
    stored, as torchvision's ImageFolder reads them). Raises :class:`DatasetError` (nothing written)
    for bad input. The output appears only when complete: it is written to a hidden temp file in the
    same folder, renamed on success and removed on any failure, KeyboardInterrupt included (a temp
    left by a kill -9 is removed by the next run). ``log`` receives warnings and the start line
    (ffcv's writer shows its own progress bar).
    """
    t0 = time.time()
    opts = resolve_options(preset, max_res=max_res, jpeg_quality=jpeg_quality, compress_prob=compress_prob,
                           write_mode=write_mode, smart_threshold=smart_threshold)
    workers = default_workers() if workers is None else workers
    for name, value in (("--workers", workers), ("--chunk-size", chunk_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise DatasetError(f"{name} {value}: must be >= 1")
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise DatasetError(f"--out {out}: is a folder")
    if out.exists() and not force:
        raise DatasetError(f"--out {out}: exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise DatasetError(f"--out {out}: folder {out.parent} does not exist")
    problem = atomic.why_unwritable(out.parent)
    if problem:
        raise DatasetError(f"--out {out}: {problem}")
    for stale in atomic.remove_stale_temps(out):
        log(f"removed {stale}, left by an earlier conversion that was killed")

    listing = _listing(src, classes_from, labels_file, synsets)
    samples = listing.samples if limit is None else _take_evenly(listing.samples, limit)
    skipped = list(listing.skipped)
    with atomic.replacing(out) as tmp:
        while True:  # each rewrite drops at least one file, so this ends
            if not samples:
                raise DatasetError(f"--src {src}: no readable images ({len(skipped)} files skipped)")
            log(f"writing {len(samples)} images to {out} ({opts.write_mode}, {workers} workers)")
            failed = _write_beton(tmp, samples, opts, workers, chunk_size, exif_transpose)
            if not failed:
                break
            # the reason, from the same check the workers ran ("changed on disk" if it passes now)
            skipped += [(samples[i][0], open_checked(samples[i][0], opts.max_res)[1] or "failed while writing")
                        for i in failed]
            bad = set(failed)
            samples = [s for i, s in enumerate(samples) if i not in bad]
            log(f"{len(failed)} files could not be read: writing again without them")
        write_classes(classes_path(out), listing.classes)
    counts = np.bincount([lab for _, lab in samples], minlength=len(listing.classes))
    warnings = [f"class {c!r} (index {i}) has no images; its index is kept"
                for i, c in enumerate(listing.classes) if counts[i] == 0]
    for w in warnings:
        log(f"warning: {w}")
    return Summary(out, len(samples), listing.classes, out.stat().st_size, time.time() - t0, opts,
                   skipped, warnings)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump: the message names the bad flag
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="ImageFolder root (class folders) or flat val folder")
    p.add_argument("--out", required=True, help="output .beton")
    p.add_argument("--preset", help=f"published settings: {', '.join(PRESETS)}; explicit flags override")
    p.add_argument("--max-res", type=int, help="longest side in px after resize, 0 = keep (default 500)")
    p.add_argument("--jpeg-quality", type=int, help="1..100 (default 90)")
    p.add_argument("--compress-prob", type=float, help="JPEG share for --write-mode proportion")
    p.add_argument("--write-mode", help=f"{', '.join(WRITE_MODES)} (default: see above)")
    p.add_argument("--smart-threshold", type=int, help="bytes of raw pixels above which smart mode uses JPEG")
    p.add_argument("--exif-transpose", action="store_true",
                   help="store photos upright by their EXIF Orientation (default: ignore it, as ImageFolder)")
    p.add_argument("--workers", type=int, help="processes for checking and writing (default: all cores)")
    p.add_argument("--chunk-size", type=int, default=100, help="images per writer work item")
    p.add_argument("--classes-from", help="train .beton (reads its .classes.txt) or a class list file")
    p.add_argument("--labels-file", help="flat val: LOC_val_solution.csv or devkit ground truth .txt")
    p.add_argument("--synsets", help="devkit meta.mat or ILSVRC-ID->wnid list, for the ground truth .txt")
    p.add_argument("--limit", type=int, help="convert at most N images, classes taken in turn")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    a = p.parse_args(argv)
    try:
        summary = convert(a.src, a.out, preset=a.preset, max_res=a.max_res, jpeg_quality=a.jpeg_quality,
                          compress_prob=a.compress_prob, write_mode=a.write_mode,
                          smart_threshold=a.smart_threshold, exif_transpose=a.exif_transpose,
                          workers=a.workers, chunk_size=a.chunk_size,
                          force=a.force, classes_from=a.classes_from, labels_file=a.labels_file,
                          synsets=a.synsets, limit=a.limit, log=partial(print, file=sys.stderr))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
