"""Stage schedules: what the model and loader look like at a given epoch, and their validation
(`PretrainConfig.validate` builds the recipe's schedule, so every schedule mistake stops the run
before anything runs; `depth_growth.DepthGrowth` applies a stage to the model).

The engine asks `schedule(epoch)` at every epoch start, so a run resumed anywhere lands in the
stage its epoch belongs to. A fixed-size run is one stage for all epochs. Two forms, combinable:
ffcv-imagenet's linear resolution ramp, and explicit stages (resolution, depth, model size, mask
ratio, drop path, micro-batch) that start at given epochs. `couple_mask` picks each resolution's mask ratio so
that the visible tokens per image stay those of the final stage (DailyMAE: 160/.51, 192/.66,
224/.75 keep 49).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from fastssl.errors import ConfigError
from fastssl.models import growth, len_keep, max_views, width
from fastssl.models.sizes import get_size
from fastssl.train import elastic_depth

if TYPE_CHECKING:  # the config validates through this module, so it is read here as types only
    from fastssl.config import PretrainConfig, RampConfig, RunConfig


@dataclass(frozen=True)
class Stage:
    res: int
    mask_ratio: float = 0.0
    depth: int | None = None  # executed encoder blocks; None: all of them
    drop_path: float | None = None  # stochastic depth of the last block; None: as built
    micro_batch: int | None = None  # per process; None: the recipe's batch_size / (world x accum_steps)
    mask_views: int = 1  # disjoint masked views per image
    size: str | None = None  # the model size (a wider one: width growth); None: as built


Schedule = Callable[[int], Stage]


def constant(res: int, mask_ratio: float = 0.0) -> Schedule:
    stage = Stage(res=res, mask_ratio=mask_ratio)
    return lambda epoch: stage


def batch_split(stage: Stage, cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) in `stage`. Their product is the same in every
    stage, so the global batch, the steps per epoch and the LR schedule do not depend on the split."""
    micro = stage.micro_batch or cfg.micro_batch(world_size)
    return micro, cfg.batch_size // world_size // micro


def ramp_res(epoch: int, ramp: RampConfig) -> int:
    """ffcv-imagenet's `get_resolution`: linear from min_res at start_ramp to max_res at end_ramp,
    rounded to a multiple of `ramp.step`."""
    if epoch <= ramp.start_ramp:
        res = ramp.min_res
    elif epoch >= ramp.end_ramp:
        res = ramp.max_res
    else:
        t = (epoch - ramp.start_ramp) / (ramp.end_ramp - ramp.start_ramp)
        res = ramp.min_res + t * (ramp.max_res - ramp.min_res)
    return int(round(res / ramp.step)) * ramp.step


def coupled_mask_ratio(num_patches: int, visible: int) -> float:
    """The mask ratio that keeps exactly `visible` of `num_patches` tokens under MAE's rounding."""
    ratio = 1.0 - visible / num_patches
    while len_keep(num_patches, ratio) < visible:  # 1 - v/n may round to one token fewer
        ratio -= 1e-12
    return ratio


class Piecewise:
    """Explicit stages looked up by epoch range, resolution from a ramp if there is one."""

    def __init__(self, starts: list[int], stages: list[Stage], ramp: RampConfig | None,
                 visible: int | None, patch_size: int):
        self.starts, self.stages, self.ramp = starts, stages, ramp
        self.visible, self.patch_size = visible, patch_size

    def __call__(self, epoch: int) -> Stage:
        stage = self.stages[bisect.bisect_right(self.starts, epoch) - 1]
        if self.ramp is not None:
            stage = replace(stage, res=ramp_res(epoch, self.ramp))
        if self.visible is not None:
            stage = replace(stage, mask_ratio=coupled_mask_ratio((stage.res // self.patch_size) ** 2, self.visible))
        return stage

    def segments(self, epochs: int) -> list[tuple[int, int, Stage]]:
        """(first epoch, end epoch, stage) for each run of equal stages in [0, epochs)."""
        out: list[tuple[int, int, Stage]] = []
        for e in range(epochs):
            s = self(e)
            if out and out[-1][2] == s:
                out[-1] = (out[-1][0], e + 1, s)
            else:
                out.append((e, e + 1, s))
        return out


def _err(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {allowed}")


def from_config(cfg: PretrainConfig, depth: int | None = None) -> Piecewise:
    """The recipe's schedule; every mistake is a one-line ConfigError naming the key. `depth`: the
    encoder's full depth when it is not the size's (a ScaleNet-expanded `init`)."""
    p, patch = cfg.progressive, cfg.model.patch_size
    full_depth = depth or cfg.model.depth or get_size(cfg.model.size).depth
    items = p.stage_list()
    starts, stages = [], []
    size, blocks = cfg.model.size, full_depth  # the model's, as the stages so far leave it
    prev = Stage(res=cfg.data.res, mask_ratio=cfg.mask_ratio, depth=full_depth, drop_path=cfg.model.drop_path,
                 mask_views=cfg.mask_views)
    for i, it in enumerate(items):
        key = f"progressive.stages[{i}]"
        if i == 0 and it.epoch != 0:
            raise _err(f"{key}.epoch", it.epoch, "the first stage must start at epoch 0")
        if i > 0 and it.epoch <= starts[-1]:
            raise _err(f"{key}.epoch", it.epoch, f"stages out of order: must be > the previous stage's {starts[-1]}")
        if it.epoch >= cfg.epochs:
            raise _err(f"{key}.epoch", it.epoch, f"must be < epochs={cfg.epochs}")
        if it.res is not None and p.ramp is not None:
            raise _err(f"{key}.res", it.res, "progressive.ramp sets the resolution; drop one of them")
        if it.mask_ratio is not None and p.couple_mask:
            raise _err(f"{key}.mask_ratio", it.mask_ratio, "progressive.couple_mask sets the mask ratio; drop one of them")
        if it.size is not None and it.size != size:
            try:
                width.check_sizes(p.growth.width, get_size(size), get_size(it.size))
            except ValueError as e:
                raise _err(f"{key}.size", it.size, f"cannot grow from {size}: {e}") from None
            if get_size(it.size).depth < blocks:
                raise _err(f"{key}.size", it.size, f"has {get_size(it.size).depth} encoder blocks, fewer than "
                                                   f"the model's {blocks}")
            if p.elastic_depth is not None or p.search.stages:
                raise _err(f"{key}.size", it.size, "width growth does not combine with progressive.elastic_depth "
                                                   "or progressive.search (both share blocks of one width); drop one")
            size, blocks = it.size, get_size(it.size).depth
        res = it.res if it.res is not None else prev.res
        depth = it.depth if it.depth is not None else prev.depth
        if res <= 0 or res % patch:
            raise _err(f"{key}.res", res, f"must be a positive multiple of model.patch_size={patch}")
        if i and res < prev.res:
            raise _err(f"{key}.res", res, f"resolution may not shrink (previous stage: {prev.res})")
        if not 0 <= depth <= blocks:
            raise _err(f"{key}.depth", depth, f"must be in 0..{blocks} (size {size})")
        if i and depth < prev.depth:
            raise _err(f"{key}.depth", depth, f"depth may not shrink (previous stage: {prev.depth})")
        if it.mask_ratio is not None and not 0.0 <= it.mask_ratio < 1.0:
            raise _err(f"{key}.mask_ratio", it.mask_ratio, "must be in [0, 1)")
        if it.drop_path is not None and not 0.0 <= it.drop_path < 1.0:
            raise _err(f"{key}.drop_path", it.drop_path, "must be in [0, 1)")
        if it.micro_batch is not None and not (it.micro_batch > 0 and cfg.batch_size % it.micro_batch == 0):
            # the per-process batch (batch_size / world_size) is checked once the world is known
            raise _err(f"{key}.micro_batch", it.micro_batch, f"must be > 0 and divide batch_size={cfg.batch_size}")
        stage = Stage(res=res, depth=depth,
                      mask_ratio=it.mask_ratio if it.mask_ratio is not None else prev.mask_ratio,
                      drop_path=it.drop_path if it.drop_path is not None else prev.drop_path,
                      micro_batch=it.micro_batch if it.micro_batch is not None else prev.micro_batch,
                      mask_views=cfg.mask_views, size=it.size if it.size is not None else prev.size)
        if i and depth > prev.depth and prev.depth == 0 and p.growth.op in growth.COPYING_OPS:
            raise _err("progressive.growth.op", p.growth.op,
                       f"copies existing blocks, but stage {i - 1} has none (depth 0): use zero or gated")
        starts.append(it.epoch)
        stages.append(stage)
        prev = stage
    if p.ramp is not None:
        r = p.ramp
        if r.step <= 0 or r.step % patch:
            raise _err("progressive.ramp.step", r.step, f"must be a positive multiple of model.patch_size={patch}")
        for name in ("min_res", "max_res"):
            v = getattr(r, name)
            if v <= 0 or v % r.step:
                raise _err(f"progressive.ramp.{name}", v, f"must be a positive multiple of progressive.ramp.step={r.step}")
        if r.min_res > r.max_res:
            raise _err("progressive.ramp.max_res", r.max_res, f"must be >= min_res={r.min_res} (resolution may not shrink)")
        if not 0 <= r.start_ramp <= r.end_ramp:
            raise _err("progressive.ramp.end_ramp", r.end_ramp, f"must be >= start_ramp={r.start_ramp} >= 0")
    g = p.growth
    if g.rewarmup_steps < 0:
        raise _err("progressive.growth.rewarmup_steps", g.rewarmup_steps, "must be >= 0")
    if g.gate_steps <= 0:
        raise _err("progressive.growth.gate_steps", g.gate_steps, "must be > 0")
    if g.mask_steps <= 0:
        raise _err("progressive.growth.mask_steps", g.mask_steps, "must be > 0")
    if not 0.0 < g.ema_decay < 1.0:
        raise _err("progressive.growth.ema_decay", g.ema_decay, "must be in (0, 1)")
    if p.elastic_depth is not None:
        elastic_depth.check(p.elastic_depth, full_depth, [st.depth for st in stages])
    visible = None
    schedule = Piecewise(starts, stages, p.ramp, None, patch)
    if p.couple_mask:
        final = schedule(cfg.epochs - 1)
        visible = len_keep((final.res // patch) ** 2, final.mask_ratio)
        smallest = schedule(0).res
        if (smallest // patch) ** 2 < visible:
            raise _err("progressive.couple_mask", True,
                       f"res {smallest} has {(smallest // patch) ** 2} patches, fewer than the {visible} "
                       f"visible tokens of the final stage")
        schedule.visible = visible
    for first, _, st in schedule.segments(cfg.epochs):  # the encoder needs at least one visible token
        if len_keep((st.res // patch) ** 2, st.mask_ratio) < 1:
            key = ("progressive.ramp.min_res" if p.ramp is not None
                   else f"progressive.stages[{bisect.bisect_right(starts, first) - 1}].res" if p.stages
                   else "data.res")
            raise _err(key, st.res, f"at mask ratio {st.mask_ratio}, its {(st.res // patch) ** 2} patch(es) of "
                                    f"{patch} px leave no visible token (from epoch {first}); raise the resolution "
                                    "or lower the mask ratio")
    for start, end, stage in schedule.segments(cfg.epochs):  # the ramp and couple_mask change n too
        patches = (stage.res // patch) ** 2
        if cfg.mask_views * len_keep(patches, stage.mask_ratio) > patches:
            raise _err("mask_views", cfg.mask_views,
                       f"epochs {start}-{end - 1} keep {len_keep(patches, stage.mask_ratio)} of {patches} tokens "
                       f"visible (res {stage.res}, mask_ratio {stage.mask_ratio:.4g}): at most "
                       f"{max_views(patches, stage.mask_ratio)} disjoint views")
    return schedule


def check_search(cfg: PretrainConfig, full_depth: int) -> None:
    """Every `progressive.search` mistake (`train/search.py`) as a one-line ConfigError naming the key."""
    s, p = cfg.progressive.search, cfg.progressive
    if not s.stages:
        return

    def need(ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            raise _err(key, value, allowed)

    need(s.search_epochs >= 1, "progressive.search.search_epochs", s.search_epochs, "must be >= 1")
    need(s.snapshots >= 1, "progressive.search.snapshots", s.snapshots, "must be >= 1")
    need(s.eval_images >= 1, "progressive.search.eval_images", s.eval_images, "must be >= 1")
    need(s.eval_batch >= 1, "progressive.search.eval_batch", s.eval_batch, "must be >= 1")
    need(0.0 < s.ema_decay < 1.0, "progressive.search.ema_decay", s.ema_decay, "must be in (0, 1)")
    need(p.elastic_depth is None, "progressive.elastic_depth", "{...}",
         "progressive.search chooses one depth per stage, elastic depth draws one per step; set one of them")
    need(p.growth.op != "gated", "progressive.growth.op", p.growth.op,
         "the search's supernet skips blocks, which gates do not follow: use mogrow, interleave, stack or zero")
    for i, st in enumerate(p.stages):
        need(st.depth is None, f"progressive.stages[{i}].depth", st.depth,
             "progressive.search picks the depth; drop it (or drop progressive.search)")
    for i, st in enumerate(s.stages):
        key = f"progressive.search.stages[{i}]"
        end = s.stages[i + 1].epoch if i + 1 < len(s.stages) else cfg.epochs
        need(i > 0 or st.epoch == 0, f"{key}.epoch", st.epoch, "the first search stage must start at epoch 0")
        need(i == 0 or st.epoch > s.stages[i - 1].epoch, f"{key}.epoch", st.epoch,
             f"stages out of order: must be > the previous stage's {s.stages[i - 1].epoch if i else 0}")
        need(st.epoch < cfg.epochs, f"{key}.epoch", st.epoch, f"must be < epochs={cfg.epochs}")
        need(bool(st.depths) and all(1 <= d <= full_depth for d in st.depths), f"{key}.depths", st.depths,
             f"must list encoder depths in 1..{full_depth}")
        if len(set(st.depths)) < 2:
            continue
        need(st.epoch + s.search_epochs <= end, f"{key}.epoch", st.epoch,
             f"its {s.search_epochs} search epoch(s) must end by the next stage (epoch {end})")
        need(s.in_warmup or st.epoch >= cfg.optim.warmup_epochs, f"{key}.epoch", st.epoch,
             f"searches inside the LR warm-up (optim.warmup_epochs={cfg.optim.warmup_epochs:g}); start it at "
             f">= {cfg.optim.warmup_epochs:g} or set progressive.search.in_warmup=true")
