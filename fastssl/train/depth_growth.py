"""The stage hook of progressive depth: applies each stage's depth and drop path to the model and
its optimizer as the engine enters it (`engine.StageHook`), and with Apollo's elastic depth each
step's executed plan over the stage's physical blocks (`elastic_depth.py`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fastssl.errors import ConfigError
from fastssl.models import growth
from fastssl.train import optim
from fastssl.train.elastic_depth import ElasticDepth
from fastssl.train.progressive import Stage

if TYPE_CHECKING:  # types only: config imports the stage checks, which import this hook
    from fastssl.config import GrowthConfig


class DepthGrowth:
    """Applies each stage's depth and drop path to an MAE and its AdamW, and keeps what growth needs
    (gate ramps, the EMA for `mogrow`, the last growth step for re-warmup) in its state dict.

    All blocks exist from the start; only `model.layer_plan` runs, the rest are frozen (no grads, so
    no weight decay, and DDP, rebuilt after each change, never waits for them). With `elastic`, the
    stage's physical plan (what growth and checkpoints see) differs from the executed one: each step
    runs the LVPS draw of that step over the same blocks, so nothing structural changes per step.
    """

    unused_params = False  # every trainable parameter gets a gradient in every step (DDP's default)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: GrowthConfig,
                 start_depth: int | None, elastic: ElasticDepth | None = None):
        self.model, self.optimizer, self.cfg, self.elastic = model, optimizer, cfg, elastic
        self.ran: list[int] = []  # executed depth of each step since the last `take_depths`
        self.gate_start: dict[int, int] = {}  # block -> step its gate began to ramp
        self.grown_at = -1  # optimizer step of the last growth
        self.drop_path: float | None = None
        self.stage: Stage | None = None
        depth = len(model.blocks) if start_depth is None else start_depth
        self.physical = list(range(depth))
        growth.apply_plan(model, self.physical)
        self.ema = growth.BlockEMA(model) if cfg.op == "mogrow" else None

    def enter(self, stage: Stage, step: int) -> bool:
        """Apply `stage` at optimizer step `step`; True when the module structure changed (the
        engine then rebuilds DDP and recompiles)."""
        self.stage, changed = stage, False
        depth = len(self.model.blocks) if stage.depth is None else stage.depth
        have = len(self.physical)
        if depth < have:
            raise ConfigError(f"progressive: the checkpoint's encoder runs {have} blocks but the schedule "
                              f"asks for {depth}; depth may not shrink")
        if depth > have:
            self.model.layer_plan = self.physical  # growth reads the physical blocks, not a shared plan
            moves = growth.grow(self.model, self.cfg.op, depth, self.ema, self.cfg.map)
            self.physical = list(self.model.layer_plan)
            optim.regrow_state(self.optimizer, self.model.blocks, moves, self.cfg.optimizer)
            if self.cfg.op == "gated":
                self.gate_start.update({m.block: step for m in moves if m.source is None})
            self.grown_at = step
            changed = True
        if stage.drop_path is not None and (changed or stage.drop_path != self.drop_path):  # new blocks too
            # by physical position: a per-step plan would swap DropPath modules (a recompile each step)
            self.model.layer_plan = self.physical
            growth.set_drop_path(self.model, stage.drop_path)
            self.drop_path = stage.drop_path
            changed = True
        self._set_gates(step)
        self._set_plan(step)
        return changed

    def _set_plan(self, step: int) -> None:
        if self.elastic is not None:
            self.model.layer_plan = self.elastic.plan(self.physical, step)

    def _set_gates(self, step: int) -> None:
        gates = {b: min(1.0, (step - s) / self.cfg.gate_steps) for b, s in self.gate_start.items()}
        growth.set_gates(self.model, gates)

    def after_step(self, step: int) -> None:
        """After optimizer step `step - 1`: the EMA follows the weights, gates move to `step`'s value,
        the executed plan to `step`'s draw."""
        if self.elastic is not None:
            self.ran.append(len(self.model.layer_plan))
            self._set_plan(step)
        if self.ema is not None:
            self.ema.update(self.model, self.cfg.ema_decay)
        if self.gate_start:
            self._set_gates(step)

    def take_depths(self) -> list[int]:
        """The executed depth of each optimizer step since the last call, in order (elastic runs)."""
        ran, self.ran = self.ran, []
        return ran

    def lr_factor(self, step: int) -> float:
        if self.grown_at < 0 or not self.cfg.rewarmup_steps:
            return 1.0
        return min(1.0, (step - self.grown_at + 1) / self.cfg.rewarmup_steps)

    def state_dict(self) -> dict:
        return {"stage": vars(self.stage).copy() if self.stage else None,  # for people: resume recomputes it
                "layer_plan": list(self.physical), "gate_start": dict(self.gate_start),
                "grown_at": self.grown_at, "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.physical = [int(i) for i in state["layer_plan"]]
        growth.apply_plan(self.model, self.physical)  # the step's elastic plan: at `enter`
        self.gate_start = {int(k): int(v) for k, v in state["gate_start"].items()}
        self.grown_at = int(state["grown_at"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
