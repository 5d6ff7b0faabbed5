"""Depth growth of an MAE encoder that holds all its blocks from the start and runs `layer_plan`.

Growing from L to L' executed blocks maps each new position j to an old position (`sources`):
- `stack`       j mod L: the whole stack copied on top (StackingBERT);
- `interleave`  floor(j L / L'): each layer duplicated in place (AutoProg); with map `autoprog`,
                AutoProg's own `new_idx`: the last L' - L layers duplicated in place;
- `interpolate` linear interpolation of the old blocks along depth (Apollo): position j sits at old
                coordinate x = clamp((j + 1/2) L / L' - 1/2, 0, L - 1), and every parameter and buffer
                of its block becomes (1 - a) W[floor x] + a W[floor x + 1], a = x - floor x. For an
                integer ratio L' = rL each old block's weights sum to r, so the depth-average of every
                parameter is preserved; the first and last blocks are kept, and a stack of equal blocks
                (what Apollo's weight sharing trains) grows into copies of that block;
- `mogrow`      interleave, the duplicates copied from an EMA of the weights (AutoProg's MoGrow);
- `zero`        old layers stay, new ones appended with zero `attn.proj` and `mlp.fc2`: for pre-norm
                blocks each is then the identity, so the grown model computes the same function;
- `gated`       old layers stay, new ones appended as h + m (block(h) - h) with m ramped 0 -> 1 (MSG):
                function-preserving whatever their weights.
Position j always lands in block j (the plan after growth is 0..L'-1), so an exported encoder is a
plain timm ViT; copies are real copies. Weight sharing (several positions, one block) is the plan's
business too (`train/elastic_depth.py` runs it per step), but no operator here makes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath
from torch import nn

COPYING_OPS = ("stack", "interleave", "interpolate", "mogrow")


@dataclass(frozen=True)
class Move:
    block: int  # the block that runs new position `block`
    source: int | None  # the block (before growth) whose weights it now holds; None: a fresh block
    continues: bool  # it *is* that source, relocated: keeps its optimizer state under `carry`


def _autoprog_map(old: int, new: int) -> list[int]:
    """AutoProg's `new_idx` (6 -> 8: [0,1,2,3,4,4,5,5]): the extra L' - L positions go to the last
    layers, one each from the top down, round-robin when there are more extras than layers."""
    copies = [1 + (new - old) // old + (i >= old - (new - old) % old) for i in range(old)]
    return [i for i, c in enumerate(copies) for _ in range(c)]


def sources(op: str, old: int, new: int, layer_map: str = "floor") -> list[int | None]:
    """New position -> old position it copies, or None for a fresh block."""
    if op == "stack":
        return [j % old for j in range(new)]
    if op in ("interleave", "mogrow"):
        return _autoprog_map(old, new) if layer_map == "autoprog" else [j * old // new for j in range(new)]
    if op == "interpolate":  # the nearer of the two mixed blocks: whose optimizer state it takes
        return [lo if a <= 0.5 else hi for lo, hi, a in interpolation(old, new)]
    if op in ("zero", "gated"):
        return [j if j < old else None for j in range(new)]
    raise ValueError(f"unknown growth op {op!r}; choose one of stack, interleave, interpolate, mogrow, zero, gated")


def interpolation(old: int, new: int) -> list[tuple[int, int, float]]:
    """New position -> (lower old position, upper old position, weight a of the upper) of `interpolate`."""
    out = []
    for j in range(new):
        x = min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1.0)
        lo = int(x)
        hi = min(lo + 1, old - 1)
        out.append((lo, hi, x - lo))
    return out


def apply_plan(model: nn.Module, plan: list[int]) -> None:
    """Run `plan`; blocks outside it are frozen, so they get no grads, no weight decay, no DDP hooks,
    and so are `model.frozen_params` (ScaleNet's shared weights when only adapters train)."""
    model.layer_plan = plan
    active = set(model.layer_plan)
    for i, blk in enumerate(model.blocks):
        blk.requires_grad_(i in active)
    for p in getattr(model, "frozen_params", ()):
        p.requires_grad_(False)


def _zero_residual(block: nn.Module) -> None:
    for layer in (block.attn.proj, block.mlp.fc2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def _lerp(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """(1 - w) a + w b per entry; w = 0 is an exact copy of a."""
    return {k: v.detach().clone() if w == 0.0 else torch.lerp(v, b[k], w) for k, v in a.items()}


def _clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


@torch.no_grad()
def grow(model: nn.Module, op: str, depth: int, ema: BlockEMA | None = None,
         layer_map: str = "floor") -> list[Move]:
    """Grow the executed encoder to `depth` blocks in place (same parameter objects, new values).

    Returns one Move per new position, for the optimizer-state policy (`optim.regrow_state`).
    """
    old_plan = list(model.layer_plan)
    if depth <= len(old_plan) or depth > len(model.blocks):
        raise ValueError(f"cannot grow from {len(old_plan)} to {depth} of {len(model.blocks)} blocks")
    if op in COPYING_OPS and not old_plan:
        raise ValueError(f"growth op {op!r} copies blocks, but the encoder has none; use zero or gated")
    if op == "mogrow" and ema is None:
        raise ValueError("growth op 'mogrow' needs the EMA of the blocks")
    moves, seen = [], set()
    for j, s in enumerate(sources(op, len(old_plan), depth, layer_map)):
        source = None if s is None else old_plan[s]
        moves.append(Move(j, source, source is not None and source not in seen))
        seen.add(source)
    mix = interpolation(len(old_plan), depth) if op == "interpolate" else None
    used = {m.source for m in moves} - {None}
    if mix is not None:
        used |= {old_plan[i] for lo, hi, _ in mix for i in (lo, hi)}
    weights = {b: _clone(model.blocks[b].state_dict()) for b in used}  # before anything is overwritten
    averaged = {b: ema.block(b) for b in used} if ema is not None else {}
    for m in moves:
        block = model.blocks[m.block]
        if m.source is None:
            if op == "zero":
                _zero_residual(block)
            continue
        if mix is not None:
            lo, hi, a = mix[m.block]
            block.load_state_dict(_lerp(weights[old_plan[lo]], weights[old_plan[hi]], a))
            continue
        copy_ema = op == "mogrow" and not m.continues
        block.load_state_dict(averaged[m.source] if copy_ema else weights[m.source])
        if ema is not None:
            ema.set_block(m.block, averaged[m.source])
    apply_plan(model, list(range(depth)))
    return moves


def set_gates(model: nn.Module, gates: dict[int, float]) -> None:
    """Block i adds gates[i] of its residual update; blocks not named run plainly."""
    model.gated_blocks = frozenset(gates)
    for i, m in gates.items():
        model.block_gate[i] = m


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly over the full depth to `rate` (timm's rule), by position."""
    rates = torch.linspace(0, rate, len(model.blocks)).tolist()
    for pos, i in enumerate(model.layer_plan):
        block, r = model.blocks[i], rates[pos]
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


class BlockEMA:
    """Exponential moving average of the encoder blocks (only executed ones move), for `mogrow`."""

    def __init__(self, model: nn.Module):
        self.shadow = _clone(model.blocks.state_dict())

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        active = {str(i) for i in model.layer_plan}
        live = model.blocks.state_dict()
        names = [k for k in self.shadow if k.partition(".")[0] in active]
        if names:
            torch._foreach_lerp_([self.shadow[k] for k in names], [live[k] for k in names], 1.0 - decay)

    def block(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"{i}."
        return _clone({k[len(prefix):]: v for k, v in self.shadow.items() if k.startswith(prefix)})

    def set_block(self, i: int, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[f"{i}.{k}"].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
