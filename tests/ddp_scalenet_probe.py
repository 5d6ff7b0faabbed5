"""Under 2-process DDP (for test_scalenet_ddp.py): a weight-shared parameter's gradient, then continued
pretraining of the expanded checkpoint.

`torchrun --nproc-per-node 2 -m tests.ddp_scalenet_probe OUT RECIPE init=CKPT key=value ...`

First one backward through `DistributedDataParallel(model)` (as the engine wraps it) on a different
batch per rank. Each rank also recomputes, without DDP, the untied model (the export: every position
its own copy, adapters merged) on both ranks' batches; the shared parameter's DDP gradient must be the
mean over ranks of the sum over the positions that use it. Writes OUT/grad<r>.json with the largest
difference, then runs `fastssl.pretrain` and writes OUT/rank<r>.json as ddp_probe does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fastssl.config import PretrainConfig, load_config
from fastssl.models import build_mae, scalenet
from fastssl.models.checkpoint_filter import raw_model_state
from fastssl.run import dist
from fastssl.train import pretrain

from tests.ddp_probe import _recording_fit
from tests.test_scalenet import _perturb_adapters

RES, BATCH = 32, 4


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, 3, RES, RES, generator=g), torch.rand(BATCH, (RES // 8) ** 2, generator=g)


def shared_grad_error(init: str, info: dist.DistInfo) -> dict:
    torch.manual_seed(0)
    model = build_mae("micro", patch_size=8)
    state = raw_model_state(torch.load(init, weights_only=True))
    scalenet.restore(model, state)
    model.load_state_dict(state)
    _perturb_adapters(model)  # non-zero `up`, so that gradients flow through the adapters too
    sources = model.scalenet_spec["sources"]

    untied = build_mae("micro", patch_size=8, depth=len(sources))
    untied.load_state_dict(scalenet.export_state_dict(model))
    expected: dict[str, torch.Tensor] = {}
    for r in range(info.world_size):
        untied.zero_grad()
        imgs, noise = batch(r)
        untied(imgs, noise=noise)[0].backward()
        for j, s in enumerate(sources):
            for n, p in untied.blocks[j].named_parameters():
                expected[f"{s}.{n}"] = expected.get(f"{s}.{n}", 0) + p.grad / info.world_size

    imgs, noise = batch(info.rank)
    ddp = DistributedDataParallel(model)  # held: its reducer must outlive the backward
    ddp(imgs, noise=noise)[0].backward()
    errors = {}
    for s in sorted(set(sources)):
        owner = model.blocks[sources.index(s)]
        for n, p in owner.named_parameters():
            if not scalenet.is_adapter(n):
                errors[f"{s}.{n}"] = ((p.grad - expected[f"{s}.{n}"]).abs().max()
                                      / expected[f"{s}.{n}"].abs().max()).item()
    return {"max_rel_error": max(errors.values()), "checked": len(errors)}


if __name__ == "__main__":
    out, recipe, *overrides = sys.argv[1:]
    cfg = load_config(PretrainConfig, recipe, overrides)
    info = dist.init(cfg.device)  # pretrain.run joins this same group
    Path(out, f"grad{info.rank}.json").write_text(json.dumps(shared_grad_error(cfg.init, info)))
    report: dict = {}
    _recording_fit(report)
    pretrain.run(cfg)
    Path(out, f"rank{report['rank']}.json").write_text(json.dumps(report))
