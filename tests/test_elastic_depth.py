"""Apollo's elastic depth (LVPS draws, shared blocks) and interpolation growth, on a micro MAE."""
import copy
import json
import math
import os
import random
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastssl.config import ConfigError, ElasticDepthConfig, GrowthConfig, PretrainConfig, load_config
from fastssl.models import build_mae, growth
from fastssl.train import elastic_depth, engine, flops, optim
from fastssl.train.depth_growth import DepthGrowth
from fastssl.train.progressive import Stage
from tests import ddp_probe
from tests.test_progressive_pretrain import assert_same, demo_args, resume_at

ROOT = Path(__file__).resolve().parents[1]
APOLLO = ROOT / "recipes/demo/pretrain_cpu_apollo.yaml"


def test_lvps_form():
    """Depths round(linspace(N, max, K)) without duplicates; p ∝ exp(-u / T), u the depth's place in [N, max]."""
    d = elastic_depth.lvps(3, 12, 4, 0.5)
    assert d.depths == (3, 6, 9, 12)
    assert math.isclose(sum(d.probs), 1.0)
    assert all(a > b for a, b in zip(d.probs, d.probs[1:]))  # low values first
    assert math.isclose(d.probs[-1] / d.probs[0], math.exp(-1 / 0.5))
    assert elastic_depth.lvps(2, 4, 4, 0.5).depths == (2, 3, 4)
    assert elastic_depth.lvps(12, 12, 4, 0.5).depths == (12,)
    hot = elastic_depth.lvps(1, 4, 4, 1e6)
    assert max(hot.probs) - min(hot.probs) < 1e-5  # high temperature: uniform


def test_depth_draw_is_a_pure_function_of_seed_and_step():
    """The same (seed, step) gives the same depth in any order and any instance; the frequencies
    over many steps are the distribution's; another seed gives another sequence."""
    cfg = ElasticDepthConfig(max_depth=12, num_depths=4, temperature=0.5)
    a, b = elastic_depth.ElasticDepth(cfg, 12, seed=7), elastic_depth.ElasticDepth(cfg, 12, seed=7)
    steps = list(range(4000))
    forward = [len(a.plan([0, 1, 2], t)) for t in steps]
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    backward = dict(zip(shuffled, (len(b.plan([0, 1, 2], t)) for t in shuffled)))
    assert forward == [backward[t] for t in steps]
    dist = a.distribution(3)
    for depth, p in zip(dist.depths, dist.probs):
        assert abs(forward.count(depth) / len(steps) - p) < 0.025
    other = elastic_depth.ElasticDepth(cfg, 12, seed=8)
    assert forward != [len(other.plan([0, 1, 2], t)) for t in steps]


def test_sharing_map_neighbours_share_every_block_in_order():
    assert elastic_depth.sharing_plan([0, 1, 2], 6) == [0, 0, 1, 1, 2, 2]
    assert elastic_depth.sharing_plan([0, 1], 3) == [0, 0, 1]
    assert elastic_depth.sharing_plan([0, 1, 2], 3) == [0, 1, 2]
    for n in range(1, 7):
        for depth in range(n, 13):
            plan = elastic_depth.sharing_plan(list(range(n)), depth)
            assert plan == sorted(plan) and set(plan) == set(range(n))
    with pytest.raises(ValueError):
        elastic_depth.sharing_plan([0, 1, 2], 2)


def test_shared_block_is_one_tensor_whose_gradient_sums_its_positions():
    """Blocks 0, 1 run at positions [0, 0, 1, 1]: each block's gradient equals the sum of the
    gradients of four separate copies at those positions; AdamW keeps one state per parameter."""
    torch.manual_seed(0)
    model = build_mae("micro", patch_size=8)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 4)
    model.layer_plan = elastic_depth.sharing_plan([0, 1], 4)
    model(imgs, mask_ratio=0.5, noise=noise)[0].backward()

    unrolled = copy.deepcopy(model)
    unrolled.zero_grad(set_to_none=True)
    for pos, block in enumerate(model.layer_plan):  # four distinct blocks holding the shared weights
        unrolled.blocks[pos].load_state_dict(model.blocks[block].state_dict())
    unrolled.layer_plan = [0, 1, 2, 3]
    unrolled(imgs, mask_ratio=0.5, noise=noise)[0].backward()
    for name, p in model.blocks[0].named_parameters():
        parts = [dict(unrolled.blocks[pos].named_parameters())[name].grad for pos in (0, 1)]
        torch.testing.assert_close(p.grad, parts[0] + parts[1], rtol=1e-4, atol=1e-6)
    for name, p in model.blocks[1].named_parameters():
        parts = [dict(unrolled.blocks[pos].named_parameters())[name].grad for pos in (2, 3)]
        torch.testing.assert_close(p.grad, parts[0] + parts[1], rtol=1e-4, atol=1e-6)

    growth.apply_plan(model, [0, 1])  # blocks 2, 3 frozen: no grad, no AdamW state
    model.zero_grad(set_to_none=True)
    model.layer_plan = elastic_depth.sharing_plan([0, 1], 4)
    opt = optim.adamw(model, 1e-3, 0.05, (0.9, 0.95), torch.device("cpu"))
    model(imgs, mask_ratio=0.5, noise=noise)[0].backward()
    opt.step()
    stepped = {id(p) for p in opt.state}
    assert all(id(p) in stepped for b in (0, 1) for p in model.blocks[b].parameters())
    assert not any(id(p) in stepped for b in (2, 3) for p in model.blocks[b].parameters())


def _random_blocks(depth: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_mae("micro", patch_size=8, depth=depth)
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("old, new", [(1, 4), (2, 4), (3, 6), (3, 12), (6, 12)])
def test_interpolate_growth_keeps_the_depth_mean_and_the_end_blocks(old, new):
    """For L' = r L, every parameter's mean over depth is unchanged, the first and last blocks are
    kept, and an interior block is the documented mix of its two neighbours."""
    model = _random_blocks(new)
    growth.apply_plan(model, list(range(old)))
    before = copy.deepcopy(model.blocks.state_dict())
    moves = growth.grow(model, "interpolate", new)
    after = model.blocks.state_dict()
    assert model.layer_plan == list(range(new)) and len(moves) == new
    names = {k.partition(".")[2] for k in before}
    for name in names:
        mean_before = torch.stack([before[f"{i}.{name}"] for i in range(old)]).mean(0)
        mean_after = torch.stack([after[f"{j}.{name}"] for j in range(new)]).mean(0)
        torch.testing.assert_close(mean_after, mean_before, rtol=1e-5, atol=1e-5)
        assert torch.equal(after[f"0.{name}"], before[f"0.{name}"])
        assert torch.equal(after[f"{new - 1}.{name}"], before[f"{old - 1}.{name}"])
    if old > 1:  # position 1 sits at x = 1.5 old/new - 0.5 of the old stack (clamped at 0)
        x = max(1.5 * old / new - 0.5, 0.0)
        lo, a = int(x), x - int(x)
        for name in names:
            want = (1 - a) * before[f"{lo}.{name}"] + a * before[f"{lo + 1}.{name}"]
            torch.testing.assert_close(after[f"1.{name}"], want)


def test_interpolate_growth_of_equal_blocks_is_function_preserving():
    """What weight sharing trains (one block at every position) grows into copies of it: the grown
    encoder computes what the shared one did at that depth."""
    model = _random_blocks(4)
    with torch.no_grad():
        for j in (1, 2, 3):
            model.blocks[j].load_state_dict(model.blocks[0].state_dict())
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 4)
    growth.apply_plan(model, [0])
    model.layer_plan = elastic_depth.sharing_plan([0], 4)
    shared = model.forward_encoder(imgs, 0.5, noise)[0]
    model.layer_plan = [0]
    growth.grow(model, "interpolate", 4)
    torch.testing.assert_close(model.forward_encoder(imgs, 0.5, noise)[0], shared)


def test_recipe_errors_name_the_key(tmp_path):
    for override, key in [("progressive.elastic_depth.max_depth=2", "max_depth=2"),
                          ("progressive.elastic_depth.num_depths=0", "num_depths=0"),
                          ("progressive.elastic_depth.temperature=0", "temperature=0")]:
        with pytest.raises(ConfigError, match=key):
            load_config(PretrainConfig, APOLLO, [override, "data.train=x.beton"])


def test_one_compiled_graph_per_depth():
    """Nine depths (more than dynamo's default of 8 entries per frame) with the limit set from them:
    each depth compiles once, at its first step (past the 8th, a depth over the limit would run
    eager and leave the graph count behind); no later step recompiles."""
    # torch._dynamo.config.patch restores the limit afterwards (monkeypatch's undo of this aliased
    # option leaves it unreadable for the tests that run next)
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        torch.manual_seed(0)
        model = build_mae("micro", patch_size=8, depth=10)
        growth.apply_plan(model, [0, 1])
        elastic = elastic_depth.ElasticDepth(ElasticDepthConfig(num_depths=9, temperature=2.0), 10, seed=0)
        depths = elastic.distribution(2).depths
        assert len(depths) == 9
        elastic_depth.set_recompile_limit(len(depths))
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        step_model = engine.compiled(model, backend="eager")
        imgs = torch.randn(2, 3, 16, 16)
        seen, graphs = set(), []
        schedule = [*depths, *(len(elastic.plan([0, 1], t)) for t in range(6))]  # every depth, then draws
        for depth in schedule:
            model.layer_plan = elastic_depth.sharing_plan([0, 1], depth)
            step_model(imgs, mask_ratio=0.5)[0].backward()
            graphs.append(counters["stats"]["unique_graphs"])
            assert graphs[-1] == len(seen | {depth}), f"depth {depth} after {sorted(seen)}: {graphs}"
            seen.add(depth)
        torch._dynamo.reset()


def test_expected_flops_match_the_per_step_average_of_a_long_draw():
    """The stage FLOPs `fastssl.flops` prints for the demo Apollo recipe are within 2 % of the mean of
    the per-step FLOPs the training loop counts (at each step's executed depth) over 20000 steps."""
    cfg = load_config(PretrainConfig, APOLLO, ["data.train=x.beton"])
    rows = flops.recipe_flops(cfg, images=1)["stages"]
    model = build_mae("micro", patch_size=8)
    opt = optim.adamw(model, 1e-3, 0.05, (0.9, 0.95), torch.device("cpu"))
    elastic = elastic_depth.ElasticDepth(cfg.progressive.elastic_depth, len(model.blocks), cfg.seed)
    hook = DepthGrowth(model, opt, GrowthConfig(op="interpolate"), 1, elastic)
    for row in rows[:2]:  # the two elastic stages (1 and 2 physical blocks)
        stage = Stage(res=row["res"], mask_ratio=row["mask_ratio"], depth=row["depth"])
        step = row["epochs"][0] * 100_000
        hook.enter(stage, step)
        per_step = []
        for step in range(step, step + 20_000):
            per_step.append(flops.train_flops_per_image(cfg.model.size, cfg.model.patch_size,
                                                        replace(stage, depth=len(model.layer_plan))))
            hook.after_step(step + 1)
        expected = row["flops"] / (row["epochs"][1] - row["epochs"][0])
        assert abs(sum(per_step) / len(per_step) / expected - 1) < 0.02
        assert set(hook.take_depths()) == set(row["lvps"]["depths"])


def logged(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


# 3 steps per epoch on the test data: stage 0 (1 block, depths 1-4) for 4 steps, stage 1 (2 blocks,
# depths 2-4) after an interpolation growth
ELASTIC_RUN = ["precision=fp32", "epochs=3", "data.res=32", "checkpoint.every_epochs=1", "checkpoint.every_steps=1",
               "checkpoint.keep_last=100", "log.every_steps=1",
               "progressive.stages=[{epoch: 0, depth: 1, micro_batch: 16}, {epoch: 2, depth: 2, micro_batch: 8}]"]


def test_resume_mid_stage_is_bitwise_exact(demo_betons, tmp_path, capsys):
    """Killed mid-stage (step 4: epoch 1, its first step done) and after the growth (step 7, mid
    epoch 2): the resumed runs draw the same depths and end with the unbroken run's weights and
    optimizer state; the log holds every step's depth."""
    from fastssl.train import checkpoint, pretrain

    def run(run_dir):
        pretrain.run(load_config(PretrainConfig, APOLLO, demo_args(demo_betons, run_dir, *ELASTIC_RUN)))
        return checkpoint.load_latest(run_dir)

    straight = run(tmp_path / "straight")
    depths = [d for r in logged(tmp_path / "straight") for d in r.get("depths", [])]
    assert len(depths) == 9 and set(depths[:6]) <= {1, 2, 3, 4} and set(depths[6:]) <= {2, 3, 4}
    assert len(set(depths)) > 1  # the depth changed between steps
    assert straight["progressive"]["layer_plan"] == [0, 1]  # the physical plan, not a step's draw
    ckpts = checkpoint.list_checkpoints(tmp_path / "straight")
    for last in (ckpts[3], ckpts[6]):
        broken = tmp_path / f"broken_{last.name}"
        resumed = resume_at(ckpts, last, broken, run, capsys)
        step = torch.load(last, weights_only=True)["progress"]["step"]
        assert [d for r in logged(broken) for d in r.get("depths", [])] == depths[step:]
        assert_same(straight, resumed, ("model", "optimizer"), f"after resuming at {last.name}")


def test_ddp_two_gloo_processes_run_the_same_depths(demo_betons, tmp_path):
    """2 CPU processes (gloo): every step runs the same drawn depth on both ranks (the draw is a
    function of (seed, step), not of the rank), and both end with the same weights."""
    with socket.socket() as sock:  # other test sessions may share the machine: no fixed port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = ddp_probe.torchrun(
        "tests.ddp_elastic_probe", str(tmp_path), str(APOLLO),
        *demo_args(demo_betons, tmp_path / "run", "precision=fp32", "epochs=2", "data.res=32",
                   "checkpoint.every_epochs=0", "progressive.stages=[{epoch: 0, depth: 1}, {epoch: 1, depth: 2}]"),
        port=port, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {rep["world"] for rep in reports} == {2} and reports[0]["steps"] == 6
    assert reports[0]["depths"] == reports[1]["depths"] and len(reports[0]["depths"]) == 6
    assert len(set(reports[0]["depths"])) > 1
    assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"

