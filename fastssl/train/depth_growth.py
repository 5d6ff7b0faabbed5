"""The stage hook of progressive depth and width: applies each stage's size, depth and drop path to
the model and its optimizer as the engine enters it (`engine.StageHook`), and with Apollo's elastic
depth each step's executed plan over the stage's physical blocks (`elastic_depth.py`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from fastssl.errors import ConfigError
from fastssl.models import growth, width
from fastssl.models.sizes import get_size
from fastssl.train import optim
from fastssl.train.elastic_depth import ElasticDepth
from fastssl.train.progressive import Stage

if TYPE_CHECKING:  # types only: config imports the stage checks, which import this hook
    from fastssl.config import GrowthConfig


class DepthGrowth:
    """Applies each stage's depth and drop path to an MAE and its AdamW, and keeps what growth needs
    (gate ramps, the EMA for `mogrow`, the last growth step for re-warmup) in its state dict.

    All blocks of a size exist from the start; only `model.layer_plan` runs, the rest are frozen (no
    grads, so no weight decay, and DDP, rebuilt after each change, never waits for them). With
    `elastic`, the stage's physical plan (what growth and checkpoints see) differs from the executed
    one: each step runs the LVPS draw of that step over the same blocks, so nothing structural changes
    per step.

    A stage with a wider `size` replaces the model and the optimizer (`width.widen`, then a new
    optimizer from `make_optimizer` holding the old state mapped channel by channel); the engine
    takes them from `model` and `optimizer`. The state dict holds the grown model's structure (size,
    blocks, position channels, masks), so a resume rebuilds it before loading the weights.
    """

    unused_params = False  # every trainable parameter gets a gradient in every step (DDP's default)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: GrowthConfig,
                 start_depth: int | None, elastic: ElasticDepth | None = None, size: str | None = None,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None, seed: int = 0):
        self.model, self.optimizer, self.cfg, self.elastic = model, optimizer, cfg, elastic
        self.size, self.make_optimizer, self.seed = size, make_optimizer, seed
        self.ran: list[int] = []  # executed depth of each step since the last `take_depths`
        self.gate_start: dict[int, int] = {}  # block -> step its gate began to ramp
        self.grown_at = -1  # optimizer step of the last growth
        self.widened_at = -1  # optimizer step of the last masked width growth: its masks ramp from there
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
        if stage.size is not None and stage.size != self.size:
            self._widen(stage.size, step)
            changed = True
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
        self._set_masks(step)
        self._set_plan(step)
        return changed

    def _set_plan(self, step: int) -> None:
        if self.elastic is not None:
            self.model.layer_plan = self.elastic.plan(self.physical, step)

    def _widen(self, size: str, step: int) -> None:
        if self.make_optimizer is None:
            raise ConfigError(f"progressive: a stage sets size={size!r}, but this run cannot change the model size")
        if hasattr(self.model, "width_masked"):
            raise ConfigError(f"progressive.growth.mask_steps={self.cfg.mask_steps}: the masks of the width "
                              f"growth at step {self.widened_at} are still opening at step {step}, where a stage "
                              f"grows to size {size!r}; lower mask_steps or start that stage later")
        new, mapping = width.widen(self.model, size, self.cfg.width, seed=self.seed + step,
                                   blocks=get_size(size).depth)
        optimizer = self._optimizer_for(new)
        width.map_optimizer_state(self.optimizer, self.model, optimizer, new, mapping)
        self.model, self.optimizer, self.size = new, optimizer, size
        if self.ema is not None:  # the old shadow has the old widths: it restarts at the grown weights
            self.ema = growth.BlockEMA(new)
        self.physical = list(new.layer_plan)
        if self.cfg.width == "masked":
            self.widened_at = step

    def _optimizer_for(self, model: nn.Module) -> torch.optim.Optimizer:
        """Every block in the optimizer, as at the start of a run; then the plan freezes the idle ones."""
        plan = list(model.layer_plan)
        growth.apply_plan(model, list(range(len(model.blocks))))
        optimizer = self.make_optimizer(model)
        growth.apply_plan(model, plan)
        return optimizer

    def _set_masks(self, step: int) -> None:
        if hasattr(self.model, "width_masked"):  # opening fully makes the modules plain ones again
            width.set_mask(self.model, width.ramp(step - self.widened_at, self.cfg.mask_steps))

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
        self._set_masks(step)

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
                "grown_at": self.grown_at, "ema": self.ema.state_dict() if self.ema is not None else None,
                "size": self.size, "blocks": len(self.model.blocks), "width": width.spec(self.model),
                "widened_at": self.widened_at}

    def load_state_dict(self, state: dict) -> None:
        """Before the weights load (`engine.TrainState`): a width-grown model and its optimizer are
        rebuilt in the saved shapes first."""
        size = state.get("size", self.size)  # checkpoints from before width stages have none
        if size != self.size:
            self.model = width.rebuilt(self.model, size, int(state["blocks"]), state["width"])
            self.optimizer, self.size = self._optimizer_for(self.model), size
            if self.ema is not None:
                self.ema = growth.BlockEMA(self.model)
        elif state.get("width") is not None:  # position channels (and masks) of a model grown before this run
            width.restore(self.model, {width.SPEC_KEY: state["width"]})
        self.widened_at = int(state.get("widened_at", -1))
        self.physical = [int(i) for i in state["layer_plan"]]
        growth.apply_plan(self.model, self.physical)  # the step's elastic plan: at `enter`
        self.gate_start = {int(k): int(v) for k, v in state["gate_start"].items()}
        self.grown_at = int(state["grown_at"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
