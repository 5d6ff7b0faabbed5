"""Evaluates a seeded micro ViT over eval loaders as fine-tuning (fastssl.eval.metrics), the kNN monitor
(fastssl.knn) and the linear probe's feature cache (fastssl.linprobe) do.

`torchrun --nproc-per-node 2 -m tests.eval_probe OUT TRAIN VAL` writes OUT/rank<r>.json; `measure` is
the same in one process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fastssl.eval import knn, linprobe, metrics
from fastssl.run import dist
from fastssl.config import KNNConfig
from fastssl.data import make_eval_loader
from fastssl.models import build_vit_encoder


def measure(train: str, val: str, info: dist.DistInfo) -> dict:
    torch.manual_seed(0)
    vit = build_vit_encoder("micro", num_classes=10, patch_size=8, img_size=32)
    # batch 3: with 19 val images on 2 processes, rank 1's last batch is ffcv's padding alone
    kw = dict(batch_size=3, res=32, num_workers=1, distributed=info.distributed)
    result = metrics.evaluate(vit, make_eval_loader(val, **kw), info, "fp32")
    vit.reset_classifier(0)
    result.update(knn.knn_eval(vit, make_eval_loader(train, **kw), make_eval_loader(val, **kw), 10, info, "fp32",
                               KNNConfig(k=5)))
    _, labels = linprobe.extract_features(vit, make_eval_loader(val, **kw), 1, info, "fp32", torch.float32)
    result["cached_val_rows"] = labels.shape[1]  # this process's
    return result


if __name__ == "__main__":
    out, train, val = sys.argv[1:]
    info = dist.init("cpu")
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(measure(train, val, info)))
    dist.shutdown()
