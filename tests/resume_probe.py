"""Rank 1 sees a lagging file system: `torchrun --nproc-per-node 2 -m tests.resume_probe RUN_DIR OUT`
resumes twice through `engine.load_agreed` and writes OUT/rank<r>.json (for test_stop.py):
'lagging': the step each rank loaded while rank 1 lists only the older checkpoint;
'unreadable': the one-line error each rank stopped with while rank 1 cannot read rank 0's choice.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fastssl.config import RunConfig
from fastssl.run import dist
from fastssl.train import checkpoint, engine

if __name__ == "__main__":
    run_dir, out = sys.argv[1:]
    info = dist.init("cpu")
    cfg = RunConfig(run_dir=run_dir)
    report = {}
    if info.rank == 1:
        listed = checkpoint.list_checkpoints
        checkpoint.list_checkpoints = lambda d: listed(d)[:1]
    report["lagging"] = engine.load_agreed(cfg, info)["step"]
    if info.rank == 1:
        checkpoint.load = lambda path: (None, "FileNotFoundError: not synced yet")
    try:
        engine.load_agreed(cfg, info)
    except checkpoint.Unreadable as e:
        report["unreadable"] = str(e)
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(report))
