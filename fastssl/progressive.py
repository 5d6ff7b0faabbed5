"""Stage schedules: what the model and loader look like at a given epoch.

The engine asks `schedule(epoch)` at every epoch start, so a run resumed anywhere lands in the
stage its epoch belongs to. A fixed-size run is one stage for all epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    res: int
    mask_ratio: float = 0.0


Schedule = Callable[[int], Stage]


def constant(res: int, mask_ratio: float = 0.0) -> Schedule:
    stage = Stage(res=res, mask_ratio=mask_ratio)
    return lambda epoch: stage
