"""`torchrun --nproc-per-node 2 -m tests.ddp_compile_probe OUT RECIPE key=value ...`: a compiled
pretrain (aot_eager behind a counting backend, standing in for inductor on CPU) whose OUT/rank<r>.json
adds to tests.ddp_probe's report the graphs the backend compiled (their image resolution, one entry
per graph) and dynamo's recompile-limit counters."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from fastssl.config import PretrainConfig, load_config
from fastssl.train import engine, pretrain
from tests.ddp_probe import _recording_fit

if __name__ == "__main__":
    out, recipe, *overrides = sys.argv[1:]
    graphs: list[list[int]] = []

    def counting_backend(gm, inputs):
        graphs.append([list(i.shape) for i in inputs if isinstance(i, torch.Tensor) and i.dim() == 4])
        return lookup_backend("aot_eager")(gm, inputs)

    engine.compiled = functools.partial(engine.compiled, backend=counting_backend)
    report: dict = {}
    _recording_fit(report)
    pretrain.run(load_config(PretrainConfig, recipe, overrides))
    report.update(graphs=graphs, unique_graphs=counters["stats"]["unique_graphs"],
                  recompile_limit=dict(counters["recompile_limit"]))
    Path(out, f"rank{report['rank']}.json").write_text(json.dumps(report))
