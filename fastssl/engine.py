"""The training loop shared by pretraining and evaluation heads.

One optimizer step = `accum_steps` micro-batches (a stage may split the same global batch into other
micro-batches: `progressive.batch_split`); the LR follows a global per-step schedule; bf16
autocast without a scaler (fp16 gets a GradScaler); DDP with no_sync on all but the last micro-batch;
atomic checkpoints that a killed run resumes from bitwise-exactly (CPU): the data order and
augmentations are functions of (seed, epoch, index), and every micro-batch reseeds torch's RNG from
(seed, position, rank), so nothing depends on what the process did before the resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastssl import atomic, checkpoint, dist, optim, stop
from fastssl.config import RunConfig, to_dict
from fastssl.flops import device_peak_flops
from fastssl.logger import RunLogger
from fastssl.progressive import Schedule, Stage, batch_split


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last checkpoint on disk predates it."""


def _nonfinite_advice(cfg: RunConfig) -> str:
    """Which checkpoint a rerun resumes from (each is written after a finite-loss check), and what
    fits the run's precision: fp16 overflows where bf16, with fp32's exponent range, does not."""
    latest = checkpoint.latest_valid(cfg.run_dir)
    where = (f"the newest checkpoint, {latest}, predates it" if latest is not None
             else "no checkpoint was written before it")
    advice = ("lower optim.blr or use precision=bf16 (fp16 overflows where bf16 does not)"
              if cfg.precision == "fp16"
              else f"lower optim.blr, lengthen optim.warmup_epochs or set optim.clip_grad "
                   f"(the run is already in {cfg.precision})")
    return f"{where}: {advice}"


class EpochLoader(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterable: ...
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...
    def set_resolution(self, res: int) -> None: ...
    def set_batch_size(self, batch_size: int) -> None: ...


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> object: ...


# (model as called in the step, images, labels, stage) -> scalar loss
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Stage], torch.Tensor]


class StageHook(Protocol):
    """Applies stages to the model (e.g. `progressive.DepthGrowth`); its state is checkpointed."""

    def enter(self, stage: Stage, step: int) -> bool: ...  # True: module structure changed
    def after_step(self, step: int) -> None: ...
    def lr_factor(self, step: int) -> float: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress
    micro: int = 0  # micro-batches of that epoch already trained on
    micro_batch: int = 0  # their size per process (0: unknown, a checkpoint older than per-stage sizes)
    step: int = 0  # optimizer steps since the start of training


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_run_dir(cfg: RunConfig, info: dist.DistInfo) -> Path:
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    dist.barrier()
    return run_dir


def seed_position(seed: int, position: int, info: dist.DistInfo) -> None:
    """Masking noise and drop path of each micro-batch depend only on where it is in training."""
    s = (seed * 1_000_003 + position) * 4099 + info.rank
    # Only the generators this process draws from: torch.manual_seed also seeds every other backend,
    # and while CUDA is uninitialised (any CPU run) it records a stack trace per call, ~0.5 ms a step.
    torch.default_generator.manual_seed(s)
    if info.device.type == "cuda":
        torch.cuda.manual_seed(s)


class LoaderWait:
    """Seconds the training thread spent blocked on the loader since the last `take()`, whose share
    of wall time says how loader-bound a run is. ffcv's pipeline thread does not block on the GPU
    (its batch slots are guarded by CUDA events), so this is time the loader was behind."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        try:
            while True:
                t = time.perf_counter()
                batch = next(it, None)
                self.seconds += time.perf_counter() - t
                if batch is None:
                    return
                yield batch
        finally:  # left early (the epoch's last partial window, a stop): the loader's epoch ends too
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def compiled(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """torch.compile with static shapes: a progressive run has a handful of stage shapes, each worth
    its own specialised graph (one compile per new stage; dynamic shapes would trade speed for
    nothing and break the position tables' constant folding)."""
    return torch.compile(model, backend=backend, dynamic=False)


def fit(
    cfg: RunConfig,
    info: dist.DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: EpochLoader,
    loss_fn: LossFn,
    schedule: Schedule,
    logger: RunLogger,
    on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
    extra_state: dict[str, Stateful] | None = None,
    stages: StageHook | None = None,
    flops_per_image: Callable[[Stage], float] | None = None,
) -> Progress:
    """Train to `cfg.epochs`, resuming from the run folder. `extra_state` objects (an EMA, a best-
    metric tracker) are saved in every checkpoint under their names and restored on resume. With
    `flops_per_image` (training FLOPs at a stage) and a known device peak, each log line has the MFU."""
    extra_state = extra_state or {}
    cfg.check_batches(len(loader))
    micro_per_epoch = (len(loader) // cfg.accum_steps) * cfg.accum_steps
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    # Reseeding positions leave room for the most micro-batches any epoch has, so they never
    # collide across stages; with one split throughout they are epoch * micro_per_epoch + i.
    max_accum = max(batch_split(schedule(e), cfg, info.world_size)[1] for e in range(cfg.epochs))
    lr_at = optim.lr_schedule(cfg.optim, total_steps, warmup_steps, cfg.lr())
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")

    progress = Progress()
    resumed = checkpoint.load_latest(cfg.run_dir, restart=cfg.checkpoint.restart)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        progress = Progress(**resumed["progress"])
        for name, obj in extra_state.items():
            obj.load_state_dict(resumed[name])
        if stages is not None:
            stages.load_state_dict(resumed["progressive"])  # the layer plan before the first forward
        if info.is_main:
            print(f"resumed from {resumed['path']} (epoch {progress.epoch}, step {progress.step})")

    ddp = step_model = None  # built at the first stage, rebuilt after each structural change

    def save() -> None:
        if info.is_main:
            checkpoint.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "progress": vars(progress).copy(),
                    **({"progressive": stages.state_dict()} if stages is not None else {}),
                    "config": to_dict(cfg),
                    **{name: obj.state_dict() for name, obj in extra_state.items()},
                },
                cfg.run_dir, progress.step, cfg.checkpoint.keep_last,
            )
        dist.barrier()

    loss_sum = torch.zeros((), device=info.device)
    n_logged, t_log, flops_done = 0, time.perf_counter(), 0.0  # the current log window's
    waited = LoaderWait()
    peak = device_peak_flops(info.device, cfg.log.peak_tflops) if flops_per_image else None

    def check_and_log(force: bool = False) -> None:
        if n_logged == 0 or not (force or progress.step % cfg.log.every_steps == 0):
            return
        mean = dist.all_reduce_mean(loss_sum / n_logged).item()
        if not math.isfinite(mean):
            raise NonFiniteLoss(
                f"loss is {mean} at epoch {progress.epoch}, step {progress.step} "
                f"(lr {optimizer.param_groups[0]['lr']:.3g}); {_nonfinite_advice(cfg)}"
            )
        elapsed = max(time.perf_counter() - t_log, 1e-9)
        metrics = {"train/loss": mean, "lr": optimizer.param_groups[0]["lr"], "epoch": progress.epoch,
                   "img_per_s": n_logged * cfg.batch_size / elapsed,
                   "data_wait": min(waited.take() / elapsed, 1.0)}
        if peak is not None:
            metrics["mfu"] = flops_done / elapsed / (peak * info.world_size)
        logger.log(metrics, progress.step)
        loss_sum.zero_()
        start_window()

    def start_window() -> None:  # after evaluation and checkpoints: rates measure training alone
        nonlocal n_logged, t_log, flops_done
        n_logged, t_log, flops_done = 0, time.perf_counter(), 0.0
        waited.take()

    logged_stage = None
    for epoch in range(progress.epoch, cfg.epochs):
        progress.epoch = epoch
        stage = schedule(epoch)
        micro_batch, accum = batch_split(stage, cfg, info.world_size)
        micro_per_epoch = steps_per_epoch * accum
        if progress.micro and progress.micro_batch and progress.micro_batch != micro_batch:
            # resumed mid-epoch with a recipe whose split changed: continue after the same samples
            progress.micro = progress.micro * progress.micro_batch // micro_batch
        progress.micro_batch = micro_batch
        changed = stages is not None and stages.enter(stage, progress.step)
        if step_model is None or changed:
            # DDP registers hooks on the parameters that need grads now; compiled code assumed the
            # old structure: both are rebuilt after growth (recompiles once per new shape after it).
            ddp = step_model = None
            if cfg.compile:
                torch._dynamo.reset()
            ddp = DistributedDataParallel(model) if info.distributed else model
            step_model = compiled(ddp) if cfg.compile else ddp
        if stage != logged_stage:
            logger.log({**{f"stage/{k}": v for k, v in vars(stage).items() if v is not None},
                        "stage/micro_batch": micro_batch, "stage/accum_steps": accum}, progress.step)
            logged_stage = stage
        loader.set_batch_size(micro_batch)
        loader.set_resolution(stage.res)
        loader.set_epoch(epoch, start_batch=progress.micro)  # after a mid-epoch resume: the rest
        model.train()
        bar = _progress_bar(info, cfg, micro_per_epoch, progress.micro, epoch)
        step_flops = flops_per_image(stage) * cfg.batch_size if flops_per_image else 0.0
        start_window()
        for i, (imgs, labels) in enumerate(waited.timed(loader), start=progress.micro):
            if i >= micro_per_epoch:
                break  # a partial accumulation window at the epoch end would skew the step
            seed_position(cfg.seed, epoch * steps_per_epoch * max_accum + i, info)
            last_micro = (i + 1) % accum == 0
            if i % accum == 0:
                factor = stages.lr_factor(progress.step) if stages is not None else 1.0
                optim.set_lr(optimizer, lr_at(progress.step) * factor)
            sync = contextlib.nullcontext() if last_micro or not info.distributed else ddp.no_sync()
            with sync:
                with autocast(cfg.precision, info.device):
                    loss = loss_fn(step_model, imgs, labels, stage)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
            progress.micro = i + 1
            if bar is not None:
                bar.update(1)
            if not last_micro:
                continue
            if cfg.optim.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            if stages is not None:
                stages.after_step(progress.step)
            n_logged += 1
            flops_done += step_flops
            check_and_log()
            if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0:
                check_and_log(force=True)
                save()
                start_window()
            if stop.agreed(info.device):  # a timeout or preemption signal: the requeued job resumes here
                check_and_log(force=True)
                save()
                raise stop.StopRequested(f"stopped on a signal at step {progress.step}; checkpoint saved")
        if bar is not None:
            bar.close()
        check_and_log(force=True)
        progress.epoch, progress.micro = epoch + 1, 0
        if on_epoch_end is not None:
            logger.log(on_epoch_end(epoch, model), progress.step)
        last = epoch + 1 == cfg.epochs
        if last or (cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0):
            save()
    return progress


def _progress_bar(info: dist.DistInfo, cfg: RunConfig, total: int, done: int, epoch: int):
    if not (info.is_main and cfg.log.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                dynamic_ncols=True, leave=False)
