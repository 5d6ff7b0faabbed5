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
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastssl.config import RunConfig, to_dict
from fastssl.errors import NonFiniteLoss
from fastssl.run import dist
from fastssl.train import checkpoint, optim, stop
from fastssl.train.flops import device_peak_flops
from fastssl.train.logger import RunLogger
from fastssl.train.progressive import Schedule, Stage, batch_split


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
    """Applies stages to the model (e.g. `depth_growth.DepthGrowth`); its state is checkpointed.
    `model` and `optimizer` are what training runs: a width growth replaces both."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    unused_params: bool  # some trainable parameters may get no gradient in a step (a supernet)

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


def seed_position(seed: int, position: int, info: dist.DistInfo) -> None:
    """Masking noise and drop path of each micro-batch depend only on where it is in training."""
    s = (seed * 1_000_003 + position) * 4099 + info.rank
    # Only the generators this process draws from: torch.manual_seed also seeds every other backend,
    # and while CUDA is uninitialised (any CPU run) it records a stack trace per call, every step.
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
    its own specialised graph (dynamic shapes would trade speed for nothing and break the position
    tables' constant folding). `fit` resets dynamo at every new stage, so the recompile limit (8 per
    code object) only counts recompiles within a stage, which are a bug: hitting it raises rather
    than leaving the rest of the run silently eager."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(model, backend=backend, dynamic=False)


def use_compile_cache(run_dir: str | Path) -> None:
    """Inductor's on-disk cache (FX graphs, AOT autograd, Triton kernels) under the run folder, unless
    TORCHINDUCTOR_CACHE_DIR names one (a cache shared by runs): a requeued job, on whichever node,
    finds its graphs there instead of recompiling each from scratch (the default is the node's /tmp)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(run_dir) / "compile_cache"))


@dataclass
class TrainState:
    """What a checkpoint holds and a resume restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stages: StageHook | None
    extra: dict[str, Stateful]  # an EMA, a best-metric tracker: saved under their names
    progress: Progress = field(default_factory=Progress)

    def state_dict(self, cfg: RunConfig) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": vars(self.progress).copy(),
            **({"progressive": self.stages.state_dict()} if self.stages is not None else {}),
            "config": to_dict(cfg),
            **{name: obj.state_dict() for name, obj in self.extra.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if self.stages is not None:  # first: the model's structure (a width growth), its layer plan
            self.stages.load_state_dict(state["progressive"])
            self.model, self.optimizer = self.stages.model, self.stages.optimizer
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        for name, obj in self.extra.items():
            obj.load_state_dict(state[name])


def load_agreed(cfg: RunConfig, info: dist.DistInfo) -> dict | None:
    """The run folder's newest valid checkpoint as rank 0 sees it, loaded by every rank: on a shared
    file system still syncing, ranks picking their own newest could resume from different steps and
    silently diverge. A rank that cannot read rank 0's choice stops them all, with one message."""
    chosen: dict | None = None
    failure = None
    if info.is_main:
        try:
            chosen = checkpoint.load_latest(cfg.run_dir, restart=cfg.checkpoint.restart)
        except checkpoint.Unreadable as e:
            failure = str(e)
    if not info.distributed:
        if failure:
            raise checkpoint.Unreadable(failure)
        return chosen
    path, failure = dist.broadcast_object((chosen["path"] if chosen else None, failure))
    if failure:
        raise checkpoint.Unreadable(failure)
    problem = None
    if path is not None and not info.is_main:
        chosen, problem = checkpoint.load(Path(path))
    problems = [(rank, p) for rank, p in enumerate(dist.all_gather_object(problem)) if p is not None]
    if problems:
        rank, p = problems[0]
        raise checkpoint.Unreadable(f"rank {rank} cannot read {path}, the checkpoint rank 0 resumes from "
                                    f"({p}; {len(problems)} rank(s) in all): is the file system shared "
                                    "and in sync on every node?")
    return chosen


def resume(cfg: RunConfig, info: dist.DistInfo, state: TrainState) -> None:
    """From the run folder's newest valid checkpoint (rank 0's choice), if it has one."""
    resumed = load_agreed(cfg, info)
    if resumed is None:
        return
    state.load_state_dict(resumed)
    if info.is_main:
        print(f"resumed from {resumed['path']} (epoch {state.progress.epoch}, step {state.progress.step})")


def save(cfg: RunConfig, info: dist.DistInfo, state: TrainState) -> None:
    if info.is_main:
        checkpoint.save(state.state_dict(cfg), cfg.run_dir, state.progress.step, cfg.checkpoint.keep_last)
    dist.barrier()


def build_step_model(cfg: RunConfig, info: dist.DistInfo, model: nn.Module,
                     find_unused: bool = False) -> tuple[nn.Module, nn.Module]:
    """(DDP wrapper or the model, what the step calls: that, compiled if asked). DDP registers hooks on
    the parameters that need grads now and compiled code assumes the module structure, so both are
    built again after growth (recompiling once per new shape after it). `find_unused`: steps may leave
    some trainable parameters without a gradient (a supernet's skipped blocks)."""
    if cfg.compile:
        use_compile_cache(cfg.run_dir)
        torch._dynamo.reset()
    # gradient_as_bucket_view: after each backward the .grad tensors are views into DDP's all-reduce
    # buckets, so from backward to the optimizer step there is one fp32 gradient copy less (0.45 GB
    # for MAE ViT-B, 1.3 GB for ViT-L; with zero_grad(set_to_none=True) a gradient is still allocated
    # briefly before the reducer copies it into its bucket). forward_sync_buffers=False (torch's
    # new name for broadcast_buffers=False): no broadcast of the buffers from rank 0 before each
    # forward; the only ones (`block_gate`, the width masks) are set from the step count and the
    # checkpoint, identically on every rank (and DDP still syncs them once, when it is built).
    # Compiled, the step is split at bucket boundaries (dynamo's DDPOptimizer) so each bucket's
    # all-reduce overlaps the rest of the backward: 17 graphs per stage for MAE ViT-B, 41 for ViT-L
    # (python -m benchmarks.ddp_graphs), each counted once, not as a recompile.
    ddp = (DistributedDataParallel(model, find_unused_parameters=find_unused,
                                   gradient_as_bucket_view=True, forward_sync_buffers=False)
           if info.distributed else model)
    return ddp, compiled(ddp) if cfg.compile else ddp


class LogWindow:
    """The training since the last log line: summed loss (on the device: `.item()` only when a line
    is written), optimizer steps, FLOPs and time blocked on the loader."""

    def __init__(self, cfg: RunConfig, info: dist.DistInfo, logger: RunLogger, peak_flops: float | None):
        self.cfg, self.info, self.logger, self.peak_flops = cfg, info, logger, peak_flops
        self.loss_sum = torch.zeros((), device=info.device)
        self.waited = LoaderWait()
        self.restart()

    def restart(self) -> None:
        """After evaluation, hooks and checkpoint writes too, so rates measure training alone."""
        self.steps, self.flops, self.started = 0, 0.0, time.perf_counter()
        self.waited.take()

    def add_step(self, flops: float) -> None:
        self.steps += 1
        self.flops += flops

    def write(self, state: TrainState, force: bool = False) -> None:
        """A log line every `log.every_steps` steps (or now, with `force`); a non-finite loss stops."""
        progress, optimizer = state.progress, state.optimizer
        if self.steps == 0 or not (force or progress.step % self.cfg.log.every_steps == 0):
            return
        mean = dist.all_reduce_mean(self.loss_sum / self.steps).item()
        if not math.isfinite(mean):
            raise NonFiniteLoss(
                f"loss is {mean} at epoch {progress.epoch}, step {progress.step} "
                f"(lr {optimizer.param_groups[0]['lr']:.3g}); {_nonfinite_advice(self.cfg)}"
            )
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {"train/loss": mean, "lr": optimizer.param_groups[0]["lr"], "epoch": progress.epoch,
                   "img_per_s": self.steps * self.cfg.batch_size / elapsed,
                   "data_wait": min(self.waited.take() / elapsed, 1.0)}
        if self.peak_flops is not None:
            metrics["mfu"] = self.flops / elapsed / (self.peak_flops * self.info.world_size)
        self.logger.log(metrics, progress.step)
        self.loss_sum.zero_()
        self.restart()


def forward_backward(cfg: RunConfig, info: dist.DistInfo, ddp: nn.Module, step_model: nn.Module,
                     loss_fn: LossFn, imgs: torch.Tensor, labels: torch.Tensor, stage: Stage, accum: int,
                     sync: bool, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """One micro-batch of the accumulation window; DDP all-reduces gradients only when `sync` (the
    window's last). Returns its share of the window's loss, detached."""
    no_sync = contextlib.nullcontext() if sync or not info.distributed else ddp.no_sync()
    with no_sync:
        with dist.autocast(cfg.precision, info.device):
            loss = loss_fn(step_model, imgs, labels, stage)
        scaler.scale(loss / accum).backward()
    return loss.detach().float() / accum


def optimizer_step(cfg: RunConfig, state: TrainState) -> None:
    """Clip, step, zero the gradients; the step count and the stage hook move on."""
    optimizer, scaler = state.optimizer, state.scaler
    if cfg.optim.clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.progress.step += 1
    if state.stages is not None:
        state.stages.after_step(state.progress.step)


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

    state = TrainState(model, optimizer, scaler, stages, extra_state or {})
    resume(cfg, info, state)
    model, optimizer, progress = state.model, state.optimizer, state.progress
    ddp = step_model = None  # built at the first stage, rebuilt after each structural change
    window = LogWindow(cfg, info, logger, device_peak_flops(info.device, cfg.log.peak_tflops)
                       if flops_per_image else None)
    logged_stage = compiled_for = None
    for epoch in range(progress.epoch, cfg.epochs):
        # the epoch's stage: its micro-batch split, the model's structure, the loader's shapes
        progress.epoch = epoch
        stage = schedule(epoch)
        micro_batch, accum = batch_split(stage, cfg, info.world_size)
        micro_per_epoch = steps_per_epoch * accum
        if progress.micro and progress.micro_batch and progress.micro_batch != micro_batch:
            # resumed mid-epoch with a recipe whose split changed: continue after the same samples
            progress.micro = progress.micro * progress.micro_batch // micro_batch
        progress.micro_batch = micro_batch
        changed = stages is not None and stages.enter(stage, progress.step)
        if changed:  # a width growth: a new model and optimizer
            model, optimizer = state.model, state.optimizer = stages.model, stages.optimizer
        if step_model is None or changed:
            ddp = step_model = None  # the old wrapper's hooks go before the new one's are registered
            ddp, step_model = build_step_model(cfg, info, model, getattr(stages, "unused_params", False))
        elif cfg.compile and (stage, micro_batch) != compiled_for:
            torch._dynamo.reset()  # new shapes: their graphs are compiled afresh, not counted as recompiles
        compiled_for = (stage, micro_batch)
        if stage != logged_stage:
            logger.log({**{f"stage/{k}": v for k, v in vars(stage).items() if v is not None},
                        "stage/micro_batch": micro_batch, "stage/accum_steps": accum}, progress.step)
            logged_stage = stage
        loader.set_batch_size(micro_batch)
        loader.set_resolution(stage.res)
        loader.set_epoch(epoch, start_batch=progress.micro)  # after a mid-epoch resume: the rest
        model.train()
        bar = _progress_bar(info, cfg, micro_per_epoch, progress.micro, epoch)
        window.restart()

        for i, (imgs, labels) in enumerate(window.waited.timed(loader), start=progress.micro):
            if i >= micro_per_epoch:
                break  # a partial accumulation window at the epoch end would skew the step
            seed_position(cfg.seed, epoch * steps_per_epoch * max_accum + i, info)
            if i % accum == 0:  # a new accumulation window
                factor = stages.lr_factor(progress.step) if stages is not None else 1.0
                optim.set_lr(optimizer, lr_at(progress.step) * factor)
                # per step: a stage hook may change the executed depth every step (elastic depth)
                step_flops = flops_per_image(stage) * cfg.batch_size if flops_per_image else 0.0
            last_micro = (i + 1) % accum == 0
            window.loss_sum += forward_backward(cfg, info, ddp, step_model, loss_fn, imgs, labels, stage,
                                                accum, last_micro, scaler)
            progress.micro = i + 1
            if bar is not None:
                bar.update(1)
            if not last_micro:
                continue
            optimizer_step(cfg, state)
            window.add_step(step_flops)
            window.write(state)
            if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0:
                window.write(state, force=True)
                save(cfg, info, state)
                window.restart()
            if stop.agreed():  # a timeout or preemption signal: the requeued job resumes here
                window.write(state, force=True)
                save(cfg, info, state)
                raise stop.StopRequested(f"stopped on a signal at step {progress.step}; checkpoint saved")

        if bar is not None:
            bar.close()
        window.write(state, force=True)
        progress.epoch, progress.micro = epoch + 1, 0
        if on_epoch_end is not None:
            try:
                logger.log(on_epoch_end(epoch, model), progress.step)
            except stop.Interrupted:  # the epoch's training counts; its evaluation is cut short
                save(cfg, info, state)
                raise stop.StopRequested(f"stopped on a signal after epoch {epoch + 1} (its epoch-end "
                                         f"evaluation cut short); checkpoint saved") from None
        if epoch + 1 == cfg.epochs or (cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0):
            save(cfg, info, state)
    return progress


def _progress_bar(info: dist.DistInfo, cfg: RunConfig, total: int, done: int, epoch: int):
    if not (info.is_main and cfg.log.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                dynamic_ncols=True, leave=False)
