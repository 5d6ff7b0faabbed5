"""Runs a pretrain in each of N processes and reports what each rank ended with (for test_slurm.py).

Through Slurm: `run_job(recipe, overrides)` is what a submitit job calls (it goes through fastssl.run.job).
Through torchrun: `torchrun --nproc-per-node 2 -m tests.ddp_probe OUT RECIPE key=value ...` writes
OUT/rank<r>.json.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from fastssl.train import engine


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue  # a ScaleNet spec
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _recording_growth(report: dict):
    """report['grown']: the weights each growth (a stage whose `enter` changed the model) left,
    before any training: a run that trains on has other weights at the end."""
    from fastssl.train.depth_growth import DepthGrowth

    real_enter = DepthGrowth.enter

    def enter(self, stage, step):
        changed = real_enter(self, stage, step)
        if changed:
            report.setdefault("grown", []).append(_weights_hash(self.model))
        return changed

    DepthGrowth.enter = enter


def _recording_fit(report: dict):
    real_fit = engine.fit

    def fit(cfg, info, model, optimizer, loader, *args, **kwargs):
        progress = real_fit(cfg, info, model, optimizer, loader, *args, **kwargs)
        stages = kwargs.get("stages")
        final = model if stages is None else stages.model  # a width growth replaces the model
        report.update(rank=info.rank, world=info.world_size, per_process_batch=loader.batch_size,
                      accum_steps=cfg.accum_steps, global_batch=cfg.batch_size, steps=progress.step,
                      weights=_weights_hash(final), embed_dim=final.cls_token.shape[-1])
        return progress

    engine.fit = fit


def torchrun(module: str, *args: str, port: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m MODULE ARGS` from the repo root (gloo on CPU)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", module, *args], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
        text=True, timeout=180)


def run_job(recipe: str, overrides: list[str]) -> dict:
    from fastssl.run.job import Job

    report: dict = {}
    _recording_fit(report)
    Job("pretrain", recipe, overrides)()
    return report


if __name__ == "__main__":
    from fastssl.train import pretrain
    from fastssl.config import PretrainConfig, load_config

    out, recipe, *overrides = sys.argv[1:]
    report: dict = {}
    _recording_fit(report)
    _recording_growth(report)
    pretrain.run(load_config(PretrainConfig, recipe, overrides))
    Path(out, f"rank{report['rank']}.json").write_text(json.dumps(report))
