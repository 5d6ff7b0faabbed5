"""Parameter groups, optimizers and learning-rate schedules."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from fastssl.models import scalenet

if TYPE_CHECKING:  # types only: config validates search recipes through modules that import this one
    from fastssl.config import OptimConfig

# Position tables are not weights in the decay sense. The tokens: MAE's pretraining decays them (its
# add_weight_decay skips only 1-D parameters and biases; cls_token and mask_token are 3-D), its
# fine-tuning does not (timm's no_weight_decay names cls_token), hence `decay_tokens`.
NO_DECAY_NAMES = ("pos_embed", "decoder_pos_embed")
TOKEN_NAMES = ("cls_token", "mask_token")


def _decays(name: str, p: nn.Parameter, decay_tokens: bool = False) -> bool:
    leaf = name.split(".")[-1]
    return p.ndim > 1 and leaf not in NO_DECAY_NAMES and (decay_tokens or leaf not in TOKEN_NAMES)


def param_groups(model: nn.Module, weight_decay: float, adapter_lr_scale: float = 1.0,
                 decay_tokens: bool = False) -> list[dict]:
    """Decayed matrices, and biases / norm weights / scales (and the tokens unless `decay_tokens`)
    with no decay; ScaleNet adapters (if any) in two more groups of the same split, at
    `adapter_lr_scale` times the LR."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(False, True): [], (False, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((scalenet.is_adapter(name), _decays(name, p, decay_tokens)), []).append(p)
    order = [(False, True), (False, False), (True, True), (True, False)]  # stable across runs: resume
    return [
        {"params": groups[adapter, decay], "weight_decay": weight_decay if decay else 0.0,
         **({"lr_scale": adapter_lr_scale} if adapter else {})}
        for adapter, decay in order if (adapter, decay) in groups
    ]


def vit_layer_id(name: str, depth: int) -> int:
    """MAE/BEiT layer index: embeddings 0, block i -> i + 1, everything after the blocks depth + 1."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay (MAE fine-tuning): layer l trains at layer_decay ** (depth + 1 - l) x lr,
    so the head gets the full lr and the patch embedding the smallest; `lr_scale` is read by `set_lr`.
    Weight decay as in `param_groups`."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decays = vit_layer_id(name, depth), _decays(name, p)
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
          device: torch.device, layer_decay: float | None = None,
          adapter_lr_scale: float = 1.0, decay_tokens: bool = False) -> torch.optim.AdamW:
    groups = (param_groups(model, weight_decay, adapter_lr_scale, decay_tokens) if layer_decay is None
              else layer_decay_groups(model, weight_decay, layer_decay))
    # The fused kernel is one launch for all parameters on CUDA; on CPU the foreach path is fastest.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


class LARS(torch.optim.Optimizer):
    """LARS (You et al.) as used by MAE's linear probe: SGD momentum with a layer-wise trust ratio.

    Biases and norm parameters (ndim <= 1) skip the trust ratio and weight decay.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where(
                        (param_norm > 0.0) & (update_norm > 0.0),
                        g["trust_coefficient"] * param_norm / update_norm, torch.ones_like(param_norm),
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Per-iteration linear warmup then half-cosine to min_lr (MAE's schedule, stepped every iteration)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def wsd_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float,
           decay_frac: float) -> float:
    """Warmup-stable-decay: linear warmup, constant base_lr, linear decay to min_lr over the last
    `decay_frac` of training (the schedule of zero/one-layer progressive training)."""
    decay_start = total_steps - round(decay_frac * total_steps)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step < decay_start:
        return base_lr
    t = (step - decay_start) / max(1, total_steps - decay_start)
    return base_lr + (min_lr - base_lr) * min(1.0, t)


def lr_schedule(cfg: OptimConfig, total_steps: int, warmup_steps: int, base_lr: float) -> Callable[[int], float]:
    """The recipe's per-step LR, global in steps: progressive stages and growth never restart it."""
    if cfg.schedule == "wsd":
        return lambda step: wsd_lr(step, total_steps, warmup_steps, base_lr, cfg.min_lr, cfg.decay_frac)
    return lambda step: cosine_lr(step, total_steps, warmup_steps, base_lr, cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


@torch.no_grad()
def regrow_state(optimizer: torch.optim.Optimizer, blocks: nn.ModuleList, moves: Iterable, policy: str) -> None:
    """Optimizer state after depth growth (`models.growth.grow`'s moves: block <- source block).

    reset: a fresh optimizer for every parameter (AutoProg, StackingBERT); carry: a block that is its
    source, relocated, keeps its moments and step, copies and fresh blocks start empty (MSG); copy:
    every copy takes its source's moments and step.
    """
    if policy == "reset":
        optimizer.state.clear()
        return
    moves = list(moves)
    params = [list(b.parameters()) for b in blocks]

    def copied(state: dict) -> dict:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

    before = {m.source: [copied(optimizer.state.get(p, {})) for p in params[m.source]]
              for m in moves if m.source is not None}
    for m in moves:
        keep = m.source is not None and (policy == "copy" or m.continues)
        for k, p in enumerate(params[m.block]):
            if keep and before[m.source][k]:
                optimizer.state[p] = copied(before[m.source][k])
            else:
                optimizer.state.pop(p, None)
