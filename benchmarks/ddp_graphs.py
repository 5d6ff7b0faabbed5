"""How many graphs a compiled DDP step is split into (dynamo's DDPOptimizer cuts the forward at
DDP's bucket boundaries so each bucket's all-reduce overlaps the backward), per model size.

    python -m benchmarks.ddp_graphs [--sizes micro,base,large]

One process, a world-1 gloo group (the split depends on the parameters and the bucket size, not on
the world size), aot_eager behind a counting backend, one forward + backward at 32 px, batch 2:
the count is that of any stage (each new stage compiles the same split again).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as tdist
from torch._dynamo.backends.registry import lookup_backend
from torch.nn.parallel import DistributedDataParallel

from fastssl.models import build_mae
from fastssl.train import engine

from .common import print_table, write_results


def count_graphs(size: str) -> dict:
    graphs = []

    def counting_backend(gm, inputs):
        graphs.append(len(gm.graph.nodes))
        return lookup_backend("aot_eager")(gm, inputs)

    torch._dynamo.reset()
    model = build_mae(size, img_size=32)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True, forward_sync_buffers=False)
    step = engine.compiled(ddp, backend=counting_backend)
    step(torch.randn(2, 3, 32, 32), mask_ratio=0.75)[0].backward()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"size": size, "params_m": params / 1e6, "fp32_grads_mb": params * 4 / 2**20,
            "bucket_cap_mb": ddp.bucket_bytes_cap / 2**20, "graphs": len(graphs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="micro,base,large")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tdist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        rows = [count_graphs(s) for s in args.sizes.split(",")]
        tdist.destroy_process_group()
    print_table("compiled DDP: forward graphs per stage", ["size", "params (M)", "fp32 grads (MB)", "bucket cap (MB)",
                                                           "graphs"],
                [[r["size"], f"{r['params_m']:.1f}", f"{r['fp32_grads_mb']:.0f}", f"{r['bucket_cap_mb']:.0f}",
                  r["graphs"]] for r in rows])
    write_results("ddp_graphs", {"rows": rows})


if __name__ == "__main__":
    main()
