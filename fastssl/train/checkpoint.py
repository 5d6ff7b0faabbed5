"""Checkpoints that survive preemption: atomic writes, keep-last-k, resume from the newest that loads.

A file is `ckpt_<step>.pt` under `<run_dir>/checkpoints/`. It holds only tensors and plain Python
values so that `torch.load(weights_only=True)` can read it: no pickled code runs on resume.

Integrity: torch.save writes a zip archive and computes the CRC-32 of every record as it writes it
(the zip format stores them); torch.load does not check them, so a file with bytes flipped in the
middle would load. :func:`verify` reads the archive and checks every CRC (one pass at memory speed,
small next to the write), and a file that fails is treated as one that is truncated: skipped on
resume, not counted as one of the `keep_last` to keep.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from fastssl import atomic

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file beside `path`, fsync, rename, fsync the folder: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        torch.save(obj, tmp)


class Unreadable(RuntimeError):
    """The run folder has checkpoints and none of them loads; its message is one line."""


def save(state: dict, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write `ckpt_<step>.pt`, then remove the checkpoints older than the newest `keep_last` that
    verify. Corrupt files newer than those are left (they are overwritten as the run reaches their
    step): counting them would let them push the good ones out."""
    folder = checkpoint_dir(run_dir)
    path = folder / f"ckpt_{step:09d}.pt"
    atomic_torch_save(state, path)
    newest_first = list_checkpoints(run_dir)[::-1]
    valid = 0
    for i, p in enumerate(newest_first):
        valid += p == path or atomic.verify_archive(p) is None  # the file just written is not read back
        if valid == keep_last:
            for old in newest_first[i + 1:]:
                old.unlink(missing_ok=True)
            break
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid(run_dir: str | Path) -> Path | None:
    return next((p for p in reversed(list_checkpoints(run_dir)) if atomic.verify_archive(p) is None), None)


def load(path: Path) -> tuple[dict | None, str | None]:
    """(state, None) if `path` verifies and loads, else (None, why not)."""
    problem = atomic.verify_archive(path)
    if problem is not None:
        return None, problem
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: the caller falls back or stops
        return None, f"{type(e).__name__}: {e}"
    state["path"] = str(path)
    return state, None


def load_latest(run_dir: str | Path, restart: bool = False) -> dict | None:
    """The newest checkpoint that verifies and loads; a corrupt newest one (killed disk, bad node) is
    skipped. None if the folder has no checkpoints. If it has some and none loads, raises
    :class:`Unreadable` unless `restart` (the user's decision to start over from step 0 there)."""
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        state, problem = load(path)
        if problem is None:
            return state
        print(f"checkpoint: skipping unreadable {path.name}: {problem}", file=sys.stderr)
    if found and not restart:
        raise Unreadable(f"none of the {len(found)} checkpoints in {checkpoint_dir(run_dir)} loads "
                         f"({', '.join(p.name for p in found)}; reasons above): set checkpoint.restart=true "
                         "to start this run over from step 0 in the same folder")
    if found:
        print("checkpoint: none loads; starting over from step 0 (checkpoint.restart=true)", file=sys.stderr)
    return None
