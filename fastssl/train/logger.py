"""Metrics to a JSON-lines file (always) and to wandb (offline unless a key is configured)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def wandb_mode(requested: str) -> str:
    """`auto` goes online only with a key: an online init without network blocks for ~100 s."""
    if requested != "auto":
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    def __init__(self, run_dir: str | Path, config: dict, *, enabled: bool, wandb: str, project: str,
                 name: str | None = None):
        self.enabled = enabled
        self.run = None
        self._file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._file = open(run_dir / "log.jsonl", "a", buffering=1)
        mode = wandb_mode(wandb)
        if mode != "disabled":
            import wandb as wb  # lazy: GPU benchmark machines run without it

            self.run = wb.init(
                project=project, name=name or run_dir.name, dir=str(run_dir), config=config, mode=mode,
                id=_stable_id(run_dir), resume="allow", settings=wb.Settings(silent=True),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled or not metrics:  # e.g. an epoch hook with nothing due: no step-and-time-only line
            return
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def _stable_id(run_dir: Path) -> str:
    """One wandb run per run folder, so a requeued job continues the same curve."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
