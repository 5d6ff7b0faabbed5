"""Pretrains under torchrun and reports, per rank, the encoder depth each optimizer step ran (for
test_elastic_depth.py): `torchrun --nproc-per-node 2 -m tests.ddp_elastic_probe OUT RECIPE key=value ...`
writes OUT/rank<r>.json as ddp_probe does, with `depths` added."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fastssl.config import PretrainConfig, load_config
from fastssl.train import pretrain
from fastssl.train.depth_growth import DepthGrowth

from tests.ddp_probe import _recording_fit

if __name__ == "__main__":
    out, recipe, *overrides = sys.argv[1:]
    report: dict = {}
    _recording_fit(report)
    depths: list[int] = []
    after_step = DepthGrowth.after_step

    def recording_after_step(self: DepthGrowth, step: int) -> None:
        depths.append(len(self.model.layer_plan))  # what the step that just ended ran
        after_step(self, step)

    DepthGrowth.after_step = recording_after_step
    pretrain.run(load_config(PretrainConfig, recipe, overrides))
    Path(out, f"rank{report['rank']}.json").write_text(json.dumps({**report, "depths": depths}))
