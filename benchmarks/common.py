"""Shared helpers: timing (median of runs + spread), tables, JSON + PNG results, machine description."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn

from fastssl import atomic

RESULTS = Path(__file__).resolve().parent / "results"


def fail(msg: str) -> NoReturn:
    """A bad command-line value: one line on stderr, exit 2 (as argparse does)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure(run: Callable[[], int], runs: int) -> dict:
    """``run()`` does some work and returns how many items it processed; rate = items / seconds.
    Returns the median rate and its spread over ``runs`` runs (the machine is shared and noisy)."""
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t))
    return summarize(rates)


def summarize(values: list[float]) -> dict:
    """Median, min, max and count of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def measure_interleaved(jobs: dict[str, Callable[[], int]], runs: int) -> dict[str, dict]:
    """:func:`measure` for several jobs, run by run in turn, so machine noise hits them alike."""
    rates: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(runs):
        for k, run in jobs.items():
            rates[k].append(measure(run, 1)["median"])
    return {k: summarize(r) for k, r in rates.items()}


def fmt_rate(m: dict, digits: int = 0) -> str:
    spread = (m["max"] - m["min"]) / m["median"] * 100 if m["median"] else 0.0
    return f"{m['median']:.{digits}f} ±{spread / 2:.0f}%"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = "\n".join([f"### {title}", "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])
    print(text, flush=True)
    return text


def write_results(name: str, payload: dict, bars: dict[str, float] | None = None, *, quick: bool = False) -> Path:
    """``results/<name>.json`` (atomically) and, given ``bars`` (label -> value), ``results/<name>.png``.
    ``quick`` runs go to ``results/quick/`` (git-ignored): a quick check never replaces the published
    figures."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    out = atomic.write_text(folder / f"{name}.json", json.dumps({"machine": machine(), **payload}, indent=1))
    if bars:
        _bar_png(folder / f"{name}.png", name, bars)
    return out


def _bar_png(path: Path, title: str, bars: dict[str, float]) -> None:
    """A horizontal bar chart drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    row, left, width = 22, 260, 420
    img = Image.new("RGB", (left + width + 90, row * (len(bars) + 2)), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 4), title, fill="black")
    top = max(bars.values()) or 1.0
    for k, (label, v) in enumerate(bars.items()):
        y = row * (k + 1) + 4
        d.text((8, y + 3), label[:40], fill="black")
        d.rectangle([left, y, left + int(width * v / top), y + row - 6], fill=(70, 110, 180))
        d.text((left + int(width * v / top) + 6, y + 3), f"{v:.3g}", fill="black")
    with atomic.replacing(path) as tmp:
        img.save(tmp, format="PNG")
