"""Stop requests: a signal (Slurm's USR2 before a timeout or a preemption) asks the training loop to
save a checkpoint at the next optimizer-step boundary and leave by raising `StopRequested`.

Nothing happens until `arm` installs the handler, so plain runs pay nothing. Ranks may get the signal
on either side of a step boundary and must all stop at the same one, so an armed distributed run
agrees on the flag with a one-float all-reduce per step, over a gloo (CPU) group of its own and
asynchronous: poll k starts a reduction and poll k+1 reads it. The device is never synchronised (an
all-reduce on the training group plus `.item()` would stop the CPU from queuing step k+1 while step k
runs) and the CPU does not wait on the network either; a stop lands one step after the signal.
"""
from __future__ import annotations

import signal
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as tdist

_armed = False
_requested = False


class StopRequested(Exception):
    """Training stopped on a signal after saving its checkpoint; a rerun resumes from it."""


def arm(signum: int = signal.SIGUSR2) -> Any:
    """Make `signum` request a stop; returns the handler it replaces. Every rank arms, or none: an
    armed distributed run takes part in one collective per poll."""
    global _armed, _agreement
    _armed, _agreement = True, None  # the agreement's group belongs to the process group of this run
    return signal.signal(signum, request)


def request(signum: int | None = None, frame: Any = None) -> None:
    global _requested
    _requested = True


class SizedIterable(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator: ...


class _Agreement:
    """The rank-wide OR of the flag, one poll behind, on a gloo group: only CPU memory is touched."""

    def __init__(self) -> None:
        self.group = tdist.new_group(backend="gloo")  # collective: every rank builds it at first use
        self.view = np.zeros(1, dtype=np.float32)  # the reduced value, read without a tensor op
        self.flag = torch.from_numpy(self.view)
        self.pending: Any = None

    def poll(self) -> bool:
        agreed = False
        if self.pending is not None:
            self.pending.wait()  # started a whole step ago: done, unless a rank is that far behind
            self.pending = None
            agreed = bool(self.view[0] > 0)
        if not agreed:  # every rank reads the same sum: all start the next one, or none does
            self.view[0] = float(_requested)
            self.pending = tdist.all_reduce(self.flag, op=tdist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def now(self) -> bool:
        """The rank-wide OR of the flag as it is now (a blocking CPU all-reduce, between runs)."""
        if self.pending is not None:  # a poll's reduction still in flight: the same group's, first
            self.pending.wait()
            self.pending = None
        t = torch.tensor([float(_requested)])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.group)
        return bool(t[0] > 0)

    def fewest(self, n: int) -> int:
        """The smallest `n` over the ranks (a blocking CPU all-reduce, once per loop)."""
        t = torch.tensor([n])
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN, group=self.group)
        return int(t[0])


_agreement: _Agreement | None = None


def _distributed_agreement() -> _Agreement | None:
    """The armed distributed run's agreement (created on first use, by every rank), else None."""
    global _agreement
    if not (_armed and tdist.is_initialized()):
        return None
    if _agreement is None:
        _agreement = _Agreement()
    return _agreement


def agreed() -> bool:
    """True on every rank at the same poll once any rank has been asked to stop. Distributed, each
    call is a collective: every rank polls at the same points of the run."""
    if not _armed:
        return False
    agreement = _distributed_agreement()
    return _requested if agreement is None else agreement.poll()


def requested_anywhere() -> bool:
    """True on every rank if any rank has been asked to stop by now, polled or not: at a boundary
    between runs (a family's members), where a request after the last step's poll must not wait
    for the next run's first step. Distributed, a collective."""
    if not _armed:
        return False
    agreement = _distributed_agreement()
    return _requested if agreement is None else agreement.now()


class Interrupted(StopRequested):
    """A stop was agreed inside epoch-end work (`watch`): the training loop saves and stops; an
    evaluation on its own stops with nothing to save (the requeued job runs it again)."""


def watch(loader: SizedIterable) -> Iterator:
    """`loader`'s batches, polling for a stop after each: long epoch-end loops (a kNN pass over the
    train split, evaluation, caching features) leave early enough for the checkpoint to be written
    inside Slurm's warning. Every rank polls after the same batches: the first `len - 1` of the
    shortest shard's (a distributed eval loader leaves out its last batch on the ranks where it
    would hold only padding, and cached features' shards may differ by a batch)."""
    polls = len(loader) - 1
    agreement = _distributed_agreement()
    if agreement is not None:
        polls = agreement.fewest(polls)
    for i, batch in enumerate(loader):
        yield batch
        if i < polls and agreed():
            raise Interrupted
