"""Top-1 / top-5 on a labelled loader, summed over processes, and the results file of an evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fastssl import atomic
from fastssl.run import dist
from fastssl.train import stop


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., B, C) scores, (B,) labels -> (..., 3): top-1 hits, top-5 hits, count."""
    top5 = scores.topk(min(5, scores.shape[-1]), dim=-1).indices
    hit = top5 == labels[:, None]
    n = torch.full(hit.shape[:-2], labels.numel(), device=scores.device)
    return torch.stack([hit[..., 0].sum(-1), hit.any(-1).sum(-1), n], dim=-1).float()


def to_metrics(counts: torch.Tensor, info: dist.DistInfo, prefix: str) -> list[dict]:
    """Summed (..., 3) counts of every process -> one metrics dict per leading index."""
    if info.distributed:
        torch.distributed.all_reduce(counts)
    return [{f"{prefix}/top1": 100 * c1 / n, f"{prefix}/top5": 100 * c5 / n, f"{prefix}/n": int(n)}
            for c1, c5, n in counts.reshape(-1, 3).tolist()]


@torch.no_grad()
def evaluate_heads(model: nn.Module, loader, info: dist.DistInfo, precision: str,
                   prefix: str = "val", keep: list | None = None) -> list[dict]:
    """Metrics per head of a model whose output is (B, C) logits, or (H, B, C) for H heads. `keep`:
    gets each batch's (top-1 classes (..., B), labels (B,)) on the CPU, for `write_predictions`."""
    was_training = model.training
    model.eval()
    counts = None
    for x, labels in stop.watch(loader):
        with dist.autocast(precision, info.device):
            logits = model(x)
        hits = topk_hits(logits.float(), labels)
        counts = hits if counts is None else counts + hits
        if keep is not None:
            keep.append((logits.argmax(-1).cpu(), labels.cpu()))
    model.train(was_training)
    return to_metrics(counts, info, prefix)


def evaluate(model: nn.Module, loader, info: dist.DistInfo, precision: str, prefix: str = "val") -> dict:
    return evaluate_heads(model, loader, info, precision, prefix)[0]


def write_predictions(run_dir: str | Path, kept: list, head: int, info: dist.DistInfo) -> Path | None:
    """`run_dir/predictions.pt` (rank 0, whole or not at all): {"pred", "label"}, (N,) int64 each, head
    `head`'s top-1 class and the label of every image `evaluate_heads` kept, every process's in rank
    order. Called on every process (a gather)."""
    pred = torch.cat([p.reshape(-1, p.shape[-1])[head] for p, _ in kept])
    label = torch.cat([y for _, y in kept])
    if info.distributed:
        parts: list = [None] * info.world_size
        torch.distributed.all_gather_object(parts, (pred, label))
        pred, label = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
    if not info.is_main:
        return None
    path = Path(run_dir) / "predictions.pt"
    with atomic.replacing(path) as tmp:
        torch.save({"pred": pred, "label": label}, tmp)
    return path


def agreement(a: str | Path, b: str | Path) -> float:
    """Share of images (in %) on which two `predictions.pt` files predict the same class; both must
    cover the same images in the same order (equal label sequences)."""
    pa, pb = (torch.load(p, weights_only=True) for p in (a, b))
    if not torch.equal(pa["label"], pb["label"]):
        raise ValueError(f"{a} and {b} do not cover the same images in the same order")
    return 100.0 * (pa["pred"] == pb["pred"]).double().mean().item()


def write_results(run_dir: str | Path, results: dict) -> Path:
    """`run_dir/results.json`, written whole or not at all."""
    return atomic.write_text(Path(run_dir) / "results.json", json.dumps(results, indent=2))
