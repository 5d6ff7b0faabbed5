"""Stop requests: a signal (Slurm's USR2 before a timeout or a preemption) asks the training loop to
save a checkpoint at the next optimizer-step boundary and leave by raising `StopRequested`.

Nothing happens until `arm` installs the handler, so plain runs pay nothing; an armed distributed run
all-reduces one flag per step, because ranks may get the signal on either side of a step boundary and
must all stop at the same one.
"""
from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as tdist

_armed = False
_requested = False


class StopRequested(Exception):
    """Training stopped on a signal after saving its checkpoint; a rerun resumes from it."""


def arm(signum: int = signal.SIGUSR2) -> Any:
    """Make `signum` request a stop; returns the handler it replaces."""
    global _armed
    _armed = True
    return signal.signal(signum, request)


def request(signum: int | None = None, frame: Any = None) -> None:
    global _requested
    _requested = True


def agreed(device: torch.device) -> bool:
    """True on every rank as soon as any rank has been asked to stop (a collective when distributed)."""
    if not _armed:
        return False
    if not tdist.is_initialized():
        return _requested
    flag = torch.tensor(float(_requested), device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item())
