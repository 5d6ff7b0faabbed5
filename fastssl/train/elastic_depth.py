"""Apollo's per-step elastic depth ("Preparing Lessons for Progressive Training on Language Models",
Pan et al., AAAI 2024): while a stage holds N physical blocks, every optimizer step runs the encoder at
a depth L >= N drawn by low-value-prioritised sampling (LVPS), the L positions sharing the N blocks
through an interpolation map, so shallow weights also learn what high positions do before growth.

The distribution (the paper's exact formula is not in the sources this project could read, so this
is a documented low-value-weighted form with a temperature):

    depths   D = round(linspace(N, L_max, num_depths)), duplicates dropped (a handful: one compiled
               graph each)
    p(L)    ∝ exp(-u(L) / temperature),  u(L) = (L - N) / (L_max - N) in [0, 1]

so the shallowest depth is the most likely, L_max the least (by e^(-1/temperature) relative to N);
temperature -> inf is uniform, -> 0 always N. A stage with N = L_max runs N every step.

The draw of step t is a pure function of (seed, t) (a SplitMix64 hash, no RNG state), so a resumed
run and every DDP rank run the same depth at the same step.

Sharing map: position j of L runs physical position floor(j N / L) (the nearest-neighbour form of
interpolating N blocks to L: neighbouring positions share a block, block order is kept, every block
runs at least once, so the set of trained parameters, DDP's hooks and AdamW's state per block are the
same at every depth). Autograd sums a shared block's gradient over the positions it runs at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from fastssl.errors import ConfigError

if TYPE_CHECKING:  # the config validates through this module, so it is read here as types only
    from fastssl.config import ElasticDepthConfig

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class LVPS:
    """Low-value-prioritised sampling over a few depths for `physical` blocks."""

    physical: int
    depths: tuple[int, ...]
    probs: tuple[float, ...]

    def draw(self, seed: int, step: int) -> int:
        """The depth of optimizer step `step` (inverse CDF of one hashed uniform)."""
        u, acc = uniform(seed, step), 0.0
        for depth, p in zip(self.depths, self.probs):
            acc += p
            if u < acc:
                return depth
        return self.depths[-1]  # u within rounding of 1

    def expected(self, f: Callable[[int], float]) -> float:
        """E[f(L)] over the distribution (e.g. FLOPs per image at depth L)."""
        return sum(p * f(d) for d, p in zip(self.depths, self.probs))


def candidate_depths(physical: int, max_depth: int, num_depths: int) -> tuple[int, ...]:
    if max_depth <= physical or num_depths == 1:
        return (physical,)
    step = (max_depth - physical) / (num_depths - 1)
    return tuple(sorted({round(physical + k * step) for k in range(num_depths)}))


def lvps(physical: int, max_depth: int, num_depths: int, temperature: float) -> LVPS:
    depths = candidate_depths(physical, max_depth, num_depths)
    span = max(max_depth - physical, 1)
    weights = [math.exp(-(d - physical) / span / temperature) for d in depths]
    total = sum(weights)
    return LVPS(physical, depths, tuple(w / total for w in weights))


def uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) from (seed, step): SplitMix64's finaliser of a combined key."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def sharing_plan(physical_plan: list[int], depth: int) -> list[int]:
    """The executed plan of `depth` positions over the blocks of `physical_plan` (floor(j N / L))."""
    n = len(physical_plan)
    if depth < n:
        raise ValueError(f"elastic depth {depth} is below the {n} physical blocks")
    return [physical_plan[j * n // depth] for j in range(depth)]


def set_recompile_limit(num_depths: int) -> None:
    """One compiled graph per depth of a stage (the engine resets dynamo at every stage change):
    allow that many cache entries per frame, so no depth falls back to eager."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, num_depths)


class ElasticDepth:
    """The LVPS of each physical depth for a run (`progressive.elastic_depth`), and each step's plan."""

    def __init__(self, cfg: ElasticDepthConfig, full_depth: int, seed: int):
        self.max_depth = cfg.max_depth or full_depth
        self.num_depths, self.temperature, self.seed = cfg.num_depths, cfg.temperature, seed

    def distribution(self, physical: int) -> LVPS:
        return lvps(physical, self.max_depth, self.num_depths, self.temperature)

    def plan(self, physical_plan: list[int], step: int) -> list[int]:
        """What optimizer step `step` runs while the stage holds `physical_plan`."""
        return sharing_plan(physical_plan, self.distribution(len(physical_plan)).draw(self.seed, step))


def check(cfg: ElasticDepthConfig, full_depth: int, stage_depths: list[int]) -> None:
    """One-line ConfigErrors for `progressive.elastic_depth` (stage_depths: physical, in order)."""
    key = "progressive.elastic_depth"
    if cfg.max_depth is not None and not max(stage_depths) <= cfg.max_depth <= full_depth:
        raise ConfigError(f"{key}.max_depth={cfg.max_depth!r}: must be in {max(stage_depths)}..{full_depth} "
                          f"(the deepest stage's depth .. the encoder's blocks)")
    if cfg.num_depths < 1:
        raise ConfigError(f"{key}.num_depths={cfg.num_depths!r}: must be >= 1")
    if not cfg.temperature > 0:
        raise ConfigError(f"{key}.temperature={cfg.temperature!r}: must be > 0")
    if min(stage_depths) < 1:
        raise ConfigError(f"{key}: a stage of depth 0 has no block to share; start at depth >= 1")
