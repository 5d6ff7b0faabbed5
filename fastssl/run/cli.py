"""What every `python -m fastssl.X RECIPE key=value ...` entry point shares: parsing and one-line
errors (`main`), and the set-up around a run (`start`, the loaders, `run_folder`)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from fastssl import atomic
from fastssl.config import RunConfig, load_config, to_dict
from fastssl.data import beton, jpeg_crop, make_eval_loader, make_pretrain_loader
from fastssl.errors import ConfigError, NonFiniteLoss
from fastssl.run import dist
from fastssl.train import checkpoint, stop
from fastssl.train.logger import RunLogger

C = TypeVar("C", bound=RunConfig)
STOPPED = 75  # the exit status of a run stopped on a signal after its checkpoint (sysexits' EX_TEMPFAIL)


def parse(cls: type[C], prog: str, description: str, argv: list[str] | None) -> C:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4 epochs=10")
    args = parser.parse_args(argv)
    return load_config(cls, args.recipe, args.overrides)


def main(cls: type[C], run: Callable[[C], object], prog: str, description: str,
         argv: list[str] | None = None) -> None:
    """Parse, validate, run; a user mistake is one line on stderr and exit 2, never a traceback."""
    try:
        cfg = parse(cls, prog, description, argv)
        cfg.check_run_dir()
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # as argparse does for bad arguments
    except (NonFiniteLoss, checkpoint.Unreadable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except stop.StopRequested as e:  # a submitit job never gets here: fastssl.run.job requeues it
        print(e, file=sys.stderr, flush=True)
        requeue_slurm_job()
        sys.exit(STOPPED)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        print(f"error: torch.compile recompiled one stage's step more than "
              f"torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit} times (its input "
              "shapes or guards change from step to step); rerun with compile=false, which resumes from "
              "the newest checkpoint", file=sys.stderr)
        sys.exit(1)


def requeue_slurm_job() -> None:
    """Inside a Slurm job (the sbatch templates' route), rank 0 puts the job back in the queue after
    the stop's checkpoint; Slurm ends every task, and the requeued job resumes from it."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"requeued Slurm job {job}" if r.returncode == 0 else
          f"could not requeue Slurm job {job} (is --requeue set?): {r.stderr.strip()}", file=sys.stderr, flush=True)


def require_beton(key: str, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path!r}: no such file")
    problem = beton.what_is_wrong(path)
    if problem is not None:
        raise ConfigError(f"{key}={path!r}: {problem}")


def start(cfg: RunConfig, split_batch: bool = True,
          check: Callable[[dist.DistInfo], None] | None = None) -> dist.DistInfo:
    """Distributed init, then the checks that need it or the disk, before anything is built: the
    batch's split over the processes (`split_batch`: the run trains), the entry's own `check`, the
    .beton files. A run that trains names its JPEG decode first, and stops here if the crop-aware one
    it asks for is not built."""
    decode = jpeg_crop.describe(cfg.data.crop_decode) if split_batch else None
    info = dist.init(cfg.device)
    # Every entry, whichever way it was launched (sbatch templates, submitit, by hand): USR2, Slurm's
    # warning before the time limit or a preemption, saves a checkpoint and stops instead of killing.
    stop.arm(signal.SIGUSR2)
    if decode and info.is_main:
        print(f"data: {decode}", flush=True)
    if split_batch:
        cfg.validate_world(info.world_size)
    if check is not None:
        check(info)
    require_beton("data.train", cfg.data.train)
    if cfg.data.val:
        require_beton("data.val", cfg.data.val)
    return info


def train_loader(cfg: RunConfig, info: dist.DistInfo, **augment):
    """The recipe's training loader (random resized crop + flip; `augment`: e.g. its `scale`); a batch
    size that leaves fewer batches than one optimizer step stops here, before the run folder exists."""
    loader = make_pretrain_loader(
        cfg.data.train, batch_size=cfg.micro_batch(info.world_size), res=cfg.data.res,
        num_workers=cfg.data.num_workers, seed=cfg.seed, distributed=info.distributed, device=info.device,
        os_cache=cfg.data.os_cache, crop_decode=cfg.data.crop_decode, **augment,
    )
    cfg.check_batches(len(loader))
    return loader


def val_loader(cfg: RunConfig, info: dist.DistInfo):
    """The recipe's validation loader (centre crop), split over the processes."""
    return make_eval_loader(cfg.data.val, batch_size=cfg.micro_batch(info.world_size), res=cfg.data.res,
                            num_workers=cfg.data.num_workers, distributed=info.distributed, device=info.device)


@contextlib.contextmanager
def run_folder(cfg: RunConfig, info: dist.DistInfo) -> Iterator[tuple[Path, RunLogger]]:
    """The run folder with its config.json (rank 0 writes, all wait) and the run's logger, closed
    however the run ends."""
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    dist.barrier()
    logger = RunLogger(run_dir, to_dict(cfg), enabled=info.is_main, wandb=cfg.log.wandb, project=cfg.log.project)
    try:
        yield run_dir, logger
    finally:
        logger.close()
