"""Checkpoints that survive preemption: atomic writes, keep-last-k, resume from the newest that loads.

A file is `ckpt_<step>.pt` under `<run_dir>/checkpoints/`. It holds only tensors and plain Python
values so that `torch.load(weights_only=True)` can read it: no pickled code runs on resume.
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


def save(state: dict, run_dir: str | Path, step: int, keep_last: int) -> Path:
    folder = checkpoint_dir(run_dir)
    path = folder / f"ckpt_{step:09d}.pt"
    atomic_torch_save(state, path)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(run_dir: str | Path) -> dict | None:
    """The newest checkpoint that loads; a corrupt newest one (killed disk, bad node) is skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: fall back to the one before
            print(f"checkpoint: skipping unreadable {path.name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        state["path"] = str(path)
        return state
    return None
