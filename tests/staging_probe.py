"""Stages a recipe's .beton files in each process as a submitted job does, rank r into OUT/node<r>
(torchrun's two processes stand in for two nodes; rank 1 is the slow one), and writes OUT/rank<r>.json:
whether the process group existed while it copied and how many files the other rank had staged when
its own staging returned.

`torchrun --nproc-per-node 2 -m tests.staging_probe OUT RECIPE key=value ...`
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed

from fastssl.run import copy_to_node as node_copy
from fastssl.run import dist, job
from fastssl.config import load_config

if __name__ == "__main__":
    out, recipe, *overrides = sys.argv[1:]
    rank = int(os.environ["RANK"])
    report = {"group_up": []}
    real_copy = node_copy.copy_to_node

    def stage(src, dest_dir):
        report["group_up"].append(torch.distributed.is_initialized())
        if rank == 1:
            time.sleep(2)  # a node whose copy takes longer
        return real_copy(src, dest_dir)

    node_copy.copy_to_node = stage
    entry = job.Job("pretrain", recipe, overrides, stage_dir=str(Path(out, f"node{rank}")))
    entry._copy_to_node(load_config(job.config_class(job.entry_module("pretrain")), recipe, overrides))
    report["other_staged"] = len(list(Path(out, f"node{1 - rank}").glob("*.beton.json")))  # written last
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.shutdown()
