"""torch.compile across a resolution ramp (aot_eager, a cheap CPU backend standing in for inductor):
one graph per stage, however many stages, and a recompile limit hit within a stage is an error."""
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from fastssl.config import RunConfig
from fastssl.run import dist
from fastssl.train import engine, progressive
from fastssl.train.logger import RunLogger

RAMP = [8 + 2 * i for i in range(10)]  # 10 shapes: more than dynamo's recompile limit of 8


class RampLoader:
    """Random images at the resolution the stage sets, 2 batches an epoch."""

    def __init__(self):
        self.res, self.batch = RAMP[0], 2

    def __len__(self):
        return 2

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def set_resolution(self, res):
        self.res = res

    def set_batch_size(self, batch_size):
        self.batch = batch_size

    def __iter__(self):
        for _ in range(self.start, len(self)):
            yield torch.randn(self.batch, 3, self.res, self.res), torch.randn(self.batch, 1)


def loss(m, x, y, stage):
    return ((m(x) - y) ** 2).mean()


@pytest.fixture
def graphs(monkeypatch, tmp_path):
    """The graphs the backend is asked to compile, with aot_eager behind it; a clean dynamo and an
    inductor cache folder per test."""
    compiled = []

    def counting_backend(gm, inputs):
        compiled.append(tuple(tuple(i.shape) for i in inputs if isinstance(i, torch.Tensor)))
        return lookup_backend("aot_eager")(gm, inputs)

    monkeypatch.setattr(engine, "compiled", functools.partial(engine.compiled, backend=counting_backend))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    counters.clear()
    # config.patch, not monkeypatch: undoing a monkeypatched dynamo option leaves it unreadable
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False):
        yield compiled
    torch._dynamo.reset()


def test_a_ramp_longer_than_the_recompile_limit_compiles_each_stage_once(graphs, tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path), epochs=len(RAMP), batch_size=2, precision="fp32", compile=True)
    cfg.log.progress = False
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    stages = [progressive.Stage(res=r) for r in RAMP]
    engine.fit(cfg, dist.DistInfo(), model, torch.optim.SGD(model.parameters(), lr=0.01), RampLoader(), loss,
               lambda epoch: stages[epoch], RunLogger(tmp_path, {}, enabled=False, wandb="disabled", project="t"))
    resolutions = [shape[-1] for graph in graphs for shape in graph if shape[:2] == (2, 3)]  # the images
    assert resolutions == RAMP  # one graph per stage, in order: none of them fell back to eager
    assert counters["stats"]["unique_graphs"] == len(RAMP)
    assert not counters["recompile_limit"] and not counters["frames"].get("cache_limit", 0)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile_cache")  # a requeue finds it


def test_a_recompile_limit_hit_is_a_one_line_error(tmp_path):
    # Shapes that change at every step within one stage: the 9th compile hits the limit.
    (tmp_path / "r.yaml").write_text(f"run_dir: {tmp_path / 'run'}\ncompile: true\n")
    script = textwrap.dedent(f"""
        import torch
        from fastssl.config import RunConfig
        from fastssl.run import cli
        from fastssl.train import engine

        def run(cfg):
            m = engine.compiled(torch.nn.Linear(4, 1), backend="eager")
            for n in range(1, 12):
                m(torch.randn(n, 4))

        cli.main(RunConfig, run, "t", "t", [{str(tmp_path / "r.yaml")!r}])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1
    # dynamo's own warning comes first; then the error, on one line, and no traceback
    assert r.stderr.splitlines()[-1].startswith("error: torch.compile recompiled one stage's step more than ")
    assert "Traceback" not in r.stderr


def test_compiled_ddp_growth_on_two_ranks_compiles_once_per_stage(demo_betons, tmp_path):
    """2 gloo processes, compile=true (aot_eager), a growth from 1 to 4 blocks with a resolution and
    micro-batch change: both ranks end with the same weights, and each stage's step was compiled
    once (DDP's bucket split makes it one forward graph per bucket: one bucket for this model)."""
    from tests import ddp_probe
    from tests.test_progressive_pretrain import ROOT, demo_args

    r = ddp_probe.torchrun(
        "tests.ddp_compile_probe", str(tmp_path), str(ROOT / "recipes/demo/pretrain_cpu_fast.yaml"),
        *demo_args(demo_betons, tmp_path / "run", "batch_size=32", "epochs=2", "precision=fp32", "compile=true",
                   "progressive.stages=[{epoch: 0, res: 16, mask_ratio: 0.5, depth: 1},"
                   " {epoch: 1, res: 32, mask_ratio: 0.75, depth: 4, micro_batch: 8}]"),
        port=29735, env={**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [__import__("json").loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for rk in ranks:
        assert [g[0][-1] for g in rk["graphs"]] == [16, 32]  # one graph per stage, each at its resolution
        assert rk["unique_graphs"] == 2 and not rk["recompile_limit"]


def test_a_compiled_masked_width_growth_recompiles_once_when_its_masks_open(graphs, demo_betons, tmp_path):
    """compile=true through a masked width growth (micro -> midi): the masks are buffers written in
    place, so their ramp recompiles nothing; opening them fully swaps in plain modules (the same
    parameters), one recompile within the stage; the run finishes and midi trains on."""
    from fastssl.config import PretrainConfig, load_config
    from fastssl.train import checkpoint, pretrain
    from tests.test_progressive_pretrain import ROOT, demo_args

    cfg = load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml", demo_args(
        demo_betons, tmp_path / "run", "batch_size=16", "epochs=2", "precision=fp32", "compile=true",
        "data.res=16", "optim.warmup_epochs=0", "progressive.growth={op: interleave, width: masked, mask_steps: 3}",
        "progressive.stages=[{epoch: 0, depth: 4}, {epoch: 1, size: midi, depth: 8}]"))
    pretrain.run(cfg)
    assert checkpoint.load_latest(tmp_path / "run")["model"]["blocks.7.attn.qkv.weight"].shape == (480, 160)
    # micro; midi with masks ramping (no graph per mask value); midi plain once open: one recompile
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["recompile_limit"]


def test_a_compiled_search_compiles_each_candidate_once(graphs, demo_betons, tmp_path):
    """compile=true through AutoProg's search: the supernet's steps switch among 3 candidate plans
    (one graph each, reused when a candidate comes back), then the winner and the full depth."""
    from fastssl.config import PretrainConfig, load_config
    from fastssl.train import pretrain
    from tests.test_search import RECIPE, SEARCH_RUN, decisions
    from tests.test_search import demo_args as search_args

    cfg = load_config(PretrainConfig, RECIPE, search_args(demo_betons, tmp_path, *SEARCH_RUN, "compile=true"))
    pretrain.run(cfg)
    assert [d["depths"] for d in decisions(tmp_path)] == [[1], [1, 2, 3], [4]]
    # depth 1; the supernet's 3 candidates; the winner at 32 px; 4 blocks at 32 px
    assert counters["stats"]["unique_graphs"] == 1 + 3 + 1 + 1
    assert not counters["recompile_limit"]
