"""Parameter groups, optimizers and learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

# Tokens and position tables are not weights in the decay sense (MAE and timm exclude them too).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed")


def _decays(name: str, p: nn.Parameter) -> bool:
    return p.ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and biases / norm weights / tokens with no decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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
          device: torch.device, layer_decay: float | None = None) -> torch.optim.AdamW:
    groups = (param_groups(model, weight_decay) if layer_decay is None
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
