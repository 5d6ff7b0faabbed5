"""Two gloo ranks through a stop and a resume: `torchrun --nproc-per-node 2 -m tests.stop_probe OUT`
writes OUT/rank<r>.json (for test_stop.py) with, in turn,
'fit': `engine.fit` armed, the calls that read a tensor's value on the host (a device sync on a GPU)
counted by the optimizer step they follow, rank 1 sending itself USR2 during step SIGNAL_STEP;
'watch': `stop.watch` over shards of unequal length, then a stop agreed after it;
'between': `stop.requested_anywhere` with a poll's reduction in flight, before and after rank 1 asks;
'resume': `engine.load_agreed` on OUT/resume while rank 1's file system lags, then cannot read.
`count_host_reads` runs in-process too.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from fastssl.config import RunConfig
from fastssl.run import dist
from fastssl.train import checkpoint, engine, progressive, stop
from fastssl.train.logger import RunLogger
from tests.test_engine import TensorLoader, mse

HOST_READS = ("item", "__bool__", "tolist", "cpu", "numpy", "nonzero")
LOG_EVERY = 4
STEPS = 12
SIGNAL_STEP = 5


@contextlib.contextmanager
def counting(reads: collections.Counter, step: list[int]):
    """Count each host read of a tensor under the number of optimizer steps taken before it."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        real = saved[name]

        def read(self, *a, **k):
            reads[step[0]] += 1
            return real(self, *a, **k)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)


def count_host_reads(run_dir: Path, info: dist.DistInfo, signal_step: int | None = None) -> dict:
    """{'reads': {step: host reads after it}, 'stopped_at': step or None, 'checkpoints': [...]}."""
    cfg = RunConfig(run_dir=str(run_dir), epochs=1, batch_size=2 * info.world_size, precision="fp32")
    cfg.log.progress, cfg.log.every_steps = False, LOG_EVERY
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step, reads = [0], collections.Counter()
    real_step = opt.step

    def counted_step(*a, **k):
        out = real_step(*a, **k)
        step[0] += 1
        if step[0] == signal_step:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    opt.step = counted_step
    n = 2 * STEPS
    g = torch.Generator().manual_seed(info.rank)
    loader = TensorLoader(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g), batch=2)
    logger = RunLogger(run_dir, {}, enabled=False, wandb="disabled", project="t")
    stop.arm(signal.SIGUSR2)
    stopped_at = None
    with counting(reads, step):
        try:
            engine.fit(cfg, info, model, opt, loader, mse, progressive.constant(32), logger)
        except stop.StopRequested:
            stopped_at = step[0]
    return {"reads": dict(reads), "stopped_at": stopped_at,
            "checkpoints": [p.name for p in checkpoint.list_checkpoints(run_dir)]}


def watched(info: dist.DistInfo) -> dict:
    """Rank r watches a loop of 4 + r batches (shards a batch apart) with no stop; then rank 0 asks to
    stop: {'seen': batches seen, 'polls': polls until every rank agreed} (the same on both ranks only
    if the loop left their polls in step)."""
    stop.arm(signal.SIGUSR2)
    seen = list(stop.watch(list(range(4 + info.rank))))
    if info.rank == 0:
        stop.request()
    polls = 1
    while not stop.agreed() and polls < 5:
        polls += 1
    return {"seen": len(seen), "polls": polls}


def between_runs(info: dist.DistInfo) -> list[bool]:
    """[requested_anywhere() before rank 1 asks, after]: as between a family's members, the last
    step's poll left its reduction in flight."""
    stop._requested = False
    stop.arm(signal.SIGUSR2)
    stop.agreed()
    before = stop.requested_anywhere()
    if info.rank == 1:
        stop.request()
    return [before, stop.requested_anywhere()]


def resumed(info: dist.DistInfo, run_dir: Path) -> dict:
    """{'lagging': the step each rank loaded while rank 1 lists only the older checkpoint,
    'unreadable': the one-line error each rank stopped with while rank 1 cannot read rank 0's choice}."""
    cfg, report = RunConfig(run_dir=str(run_dir)), {}
    if info.rank == 1:
        listed = checkpoint.list_checkpoints
        checkpoint.list_checkpoints = lambda d: listed(d)[:1]
    report["lagging"] = engine.load_agreed(cfg, info)["step"]
    if info.rank == 1:
        checkpoint.load = lambda path: (None, "FileNotFoundError: not synced yet")
    try:
        engine.load_agreed(cfg, info)
    except checkpoint.Unreadable as e:
        report["unreadable"] = str(e)
    return report


if __name__ == "__main__":
    out = Path(sys.argv[1])
    info = dist.init("cpu")
    report = {"fit": count_host_reads(out / "run", info, SIGNAL_STEP if info.rank == 1 else None)}
    stop._requested = False  # the next scenario starts unasked
    report["watch"] = watched(info)
    report["between"] = between_runs(info)
    report["resume"] = resumed(info, out / "resume")
    (out / f"rank{info.rank}.json").write_text(json.dumps(report))
