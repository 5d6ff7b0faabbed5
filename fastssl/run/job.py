"""What a submitted job runs on each of its tasks: one process per GPU (or CPU stand-in).

`Job(entry, recipe, overrides)()` takes rank, world and master from submitit's distributed
environment, copies the .beton files to the node if asked, and runs the entry point. On USR2 (Slurm's warning
before a timeout, or a preemption) the training loop saves at the next step boundary; then rank 0
hands over to submitit's own handler, which re-pickles this job and requeues it, and the requeued
job resumes from that checkpoint. A real error is not caught here: the job fails and stays failed.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import typing
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import submitit

from fastssl.config import ConfigError, load_config
from fastssl.run import dist
from fastssl.train import checkpoint, family, stop

ENTRIES = ("pretrain", "family", "finetune", "linprobe", "knn")
# an ImageNet .beton (~70-340 GB) copied from a slow (~100 MB/s) shared file system, then re-hashed locally
STAGING_TIMEOUT = timedelta(hours=2)


def entry_module(entry: str) -> ModuleType:
    if entry == "expand":  # argparse, not a recipe; one process on the CPU
        raise ConfigError("entry 'expand': not a Slurm job (a CPU step of seconds); run python -m fastssl.expand "
                          "CKPT --depth L --out CKPT2 directly, then submit pretrain with init=CKPT2")
    if entry not in ENTRIES:
        raise ConfigError(f"entry {entry!r}: must be one of {', '.join(ENTRIES)}")
    try:
        return importlib.import_module(f"fastssl.{entry}")
    except ModuleNotFoundError as e:
        if e.name != f"fastssl.{entry}":
            raise
        raise ConfigError(f"entry {entry!r}: fastssl.{entry} is not in this checkout") from None


def config_class(module: ModuleType) -> type:
    """The config type an entry point's `run(cfg)` takes."""
    return typing.get_type_hints(module.run)["cfg"]


def resolve_init(overrides: list[str]) -> list[str]:
    """`init=RUN_DIR` (what a `--then` chain passes) -> that run's newest checkpoint; of a family's
    run folder, its largest finished member's `members/<size>/checkpoint.pth`."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "init" and value and Path(value).is_dir():
            item = f"init={_newest_checkpoint(value)}"
        out.append(item)
    return out


def _newest_checkpoint(run_dir: str) -> Path:
    if family.is_family(run_dir):
        found = family.largest_member(run_dir)
        if found is None:
            raise ConfigError(f"init={run_dir!r}: a family run folder without a finished member "
                              "(members/<size>/checkpoint.pth)")
        return found
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"init={run_dir!r}: a run folder without checkpoints")
    return found[-1]


class Job(submitit.helpers.Checkpointable):
    # Checkpointable.checkpoint re-submits this same object: the state is the run folder's checkpoint.

    def __init__(self, entry: str, recipe: str, overrides: list[str], stage_dir: str | None = None):
        self.entry = entry
        self.recipe = recipe
        self.overrides = list(overrides)
        self.stage_dir = stage_dir  # "$TMPDIR" is expanded on the node

    def __call__(self) -> Any:
        dist.export_submitit_env()
        module = entry_module(self.entry)
        cfg = load_config(config_class(module), self.recipe, resolve_init(self.overrides))
        if self.stage_dir:
            self._copy_to_node(cfg)
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # the entry's start-up arms the stop over it
        try:
            return module.run(cfg)
        except stop.StopRequested as e:
            print(e, flush=True)
            if int(os.environ.get("RANK", "0")) == 0:
                if callable(submitit_handler):
                    submitit_handler(signal.SIGUSR2, None)  # re-pickles, `scontrol requeue`s, exits
                raise  # not requeued: no submitit job around this process
            time.sleep(600)  # the requeue ends this task; rank 0 failing ends it too (--kill-on-bad-exit)
            sys.exit(1)

    def _copy_to_node(self, cfg) -> None:
        from fastssl.run.copy_to_node import copy_to_node

        folder = os.path.expandvars(self.stage_dir)
        if "$" in folder:
            raise ConfigError(f"--stage-dir {self.stage_dir!r}: a variable in it is not set on this node")
        # The process group first, then the copy, then a barrier (rather than an init timeout sized
        # for staging): the ranks reach init together, as nothing slow comes before it, and the wait
        # for the slowest node's copy (whose SHA-256 re-reads it all) is a barrier allowed
        # STAGING_TIMEOUT, where a node late to init made the job fail as a real error, not requeue.
        # A longer init timeout would also be every training collective's: a hang found hours late.
        dist.init(cfg.device)
        cfg.data.train = str(copy_to_node(cfg.data.train, folder))
        if cfg.data.val:
            cfg.data.val = str(copy_to_node(cfg.data.val, folder))
        dist.wait_for_all(STAGING_TIMEOUT)
