"""progressive.search (AutoProg's automated growth): the decision rule, the supernet's candidates,
recipe validation, and end to end on the demo .beton files: decisions logged and checkpointed, a run
resumed mid-search ending bitwise where the unbroken run ends, two gloo processes agreeing."""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from fastssl.config import PretrainConfig, load_config
from fastssl.errors import ConfigError
from fastssl.models import growth
from fastssl.train import checkpoint, pretrain, search
from tests.ddp_probe import torchrun
from tests.test_progressive_pretrain import _equal, _flatten

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/demo/pretrain_cpu.yaml"

# 5 epochs of 3 steps: depth 1; epochs 1-2 a supernet over depths 1/2/3 scored twice in epoch 2;
# epoch 3 the winner at 32 px; epoch 4 the full 4 blocks.
SEARCH_RUN = [
    "epochs=5", "data.res=32", "precision=fp32", "batch_size=32", "optim.warmup_epochs=0",
    "progressive.stages=[{epoch: 0, res: 16, mask_ratio: 0.5}, {epoch: 3, res: 32, mask_ratio: 0.75}]",
    "progressive.growth={op: mogrow, optimizer: carry, ema_decay: 0.9}",
    "progressive.search={stages: [{epoch: 0, depths: [1]}, {epoch: 1, depths: [1, 2, 3]}, {epoch: 4, depths: [4]}],"
    " search_epochs: 2, snapshots: 2, eval_images: 16, eval_batch: 8, ema_decay: 0.5}",
]


def demo_args(betons, run_dir, *extra):
    return [f"run_dir={run_dir}", f"data.train={betons.train}", f"data.val={betons.val}",
            "log.wandb=disabled", "log.progress=false", "log.recon_every_epochs=0", "data.num_workers=1", *extra]


def decisions(run_dir):
    rows = map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())
    return [r["search/decision"] for r in rows if "search/decision" in r]


# ---- the decision rule ---------------------------------------------------------------------------

def test_one_candidate_is_no_search():
    assert search.candidates([2, 3], have=4) == [4]
    assert search.candidates([1, 2, 3, 4], have=2) == [2, 3, 4]


def test_two_candidates_pick_the_lower_loss_times_time():
    d = search.decide([2, 4], [1.0, 0.7], [1.0, 2.0])
    assert d["score"] == [1.0, 1.4] and d["winner"] == 0 and d["fit"] is None
    assert search.decide([2, 4], [1.0, 0.4], [1.0, 2.0])["winner"] == 1


def test_three_candidates_fit_a_power_law():
    """L = 2 T^-0.5 exactly: w = 0.5 and every score L T^0.5 equals a; ties go to the shallowest. A
    faster-falling loss than the fit on the deepest makes it win."""
    times = [1.0, 4.0, 9.0]
    d = search.decide([2, 3, 4], [2 * t ** -0.5 for t in times], times)
    assert d["fit"]["b"] == pytest.approx(-0.5) and d["fit"]["a"] == pytest.approx(2.0)
    assert d["winner"] == 0
    d = search.decide([2, 3, 4], [2.0, 1.0, 0.5], times)
    assert d["winner"] == 2 and d["fit"]["b"] < 0
    assert search.decide([2, 3, 4], [2.0, 1.0, 0.5], [t * 1e9 for t in times])["winner"] == 2  # FLOPs scale


def test_a_failed_fit_falls_back_to_loss_times_time(monkeypatch):
    import scipy.optimize

    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(scipy.optimize, "curve_fit", no_convergence)
    with pytest.warns(RuntimeWarning, match="fit L=a\\*T\\^b failed"):
        d = search.decide([2, 3, 4], [2.0, 1.0, 0.9], [1.0, 2.0, 3.0])
    assert d["fit"] is None and d["score"] == [2.0, 2.0, pytest.approx(2.7)] and d["winner"] == 0
    with pytest.warns(RuntimeWarning):  # equal times cannot be fitted either
        assert search.decide([2, 3, 4], [2.0, 1.0, 0.9], [1.0, 1.0, 1.0])["winner"] == 2


def test_candidate_draws_are_a_function_of_seed_and_step():
    draws = [search.uniform_candidate(0, s, 3) for s in range(300)]
    assert draws == [search.uniform_candidate(0, s, 3) for s in range(300)]
    assert {draws.count(c) for c in range(3)} and min(draws.count(c) for c in range(3)) > 70
    assert draws != [search.uniform_candidate(1, s, 3) for s in range(300)]


def test_autoprog_growth_map():
    assert growth.sources("mogrow", 6, 8, "autoprog") == [0, 1, 2, 3, 4, 4, 5, 5]
    assert growth.sources("mogrow", 6, 8) == [0, 0, 1, 2, 3, 3, 4, 5]
    assert growth.sources("interleave", 2, 4, "autoprog") == [0, 0, 1, 1]


@pytest.mark.parametrize("layer_map", ["floor", "autoprog"])
def test_supernet_candidates_nest_and_the_current_depth_is_the_pre_growth_network(layer_map):
    """Grown from 2 to 4 blocks by MoGrow: the depth-2 candidate skips both copies and computes what
    the network computed before the growth; each candidate's plan holds the shallower ones'."""
    from fastssl.models import build_mae
    from fastssl.run.dist import DistInfo
    from fastssl.train import optim
    from fastssl.train.progressive import Stage

    cfg = load_config(PretrainConfig, RECIPE, [
        "optim.warmup_epochs=0", f"progressive.growth={{op: mogrow, optimizer: carry, map: {layer_map}}}",
        "progressive.search.stages=[{epoch: 0, depths: [2]}, {epoch: 1, depths: [2, 3, 4]}]",
        "progressive.search.snapshots=2"])
    build = lambda: build_mae("micro", patch_size=8)  # noqa: E731
    torch.manual_seed(0)
    model = build()
    opt = optim.adamw(model, 1e-3, 0.05, (0.9, 0.95), torch.device("cpu"))
    hook = search.SearchGrowth(model, opt, cfg, DistInfo(), steps_per_epoch=3, build=build)
    stage = Stage(res=32, mask_ratio=0.75)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    hook.enter(stage, 0)
    assert model.layer_plan == [0, 1]
    hook.after_step(1)
    model.eval()
    with torch.no_grad():  # a change the blocks' EMA has not followed: MoGrow's copies differ from block 0
        model.blocks[0].attn.proj.weight.add_(0.1)
        before = model(imgs, mask_ratio=0.75, noise=noise)[1]
    assert hook.enter(stage, 3)  # the supernet: a new structure for DDP and compile
    plans = hook.supernet["plans"]
    assert hook.supernet["depths"] == [2, 3, 4] and hook.unused_params
    assert set(plans[0]) < set(plans[1]) < set(plans[2]) == {0, 1, 2, 3}
    assert all(p.requires_grad for b in model.blocks[:4] for p in b.parameters())
    model.layer_plan = plans[0]
    with torch.no_grad():
        assert torch.equal(model(imgs, mask_ratio=0.75, noise=noise)[1], before)
    scored = hook._scored_model()
    assert hook._times(scored, imgs, noise) == sorted(hook._times(scored, imgs, noise))  # FLOPs grow with depth
    hook.scfg.time = "measured"
    assert all(t > 0 for t in hook._times(scored, imgs, noise))  # seconds of fwd + bwd per candidate


def test_flops_range_and_a_runs_choice(tmp_path, capsys):
    """`python -m fastssl.flops` on the demo search recipe: the shallowest and deepest schedules, and
    the one a run folder's log.jsonl recorded."""
    from fastssl.train import flops

    lines = [{"step": 0, "search/stage": 0, "search/winner": 1}, {"step": 132, "search/stage": 1, "search/winner": 2},
             {"step": 242, "search/stage": 2, "search/winner": 4}, {"step": 330, "search/stage": 3, "search/winner": 4}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = str(ROOT / "recipes/demo/pretrain_cpu_search.yaml")
    flops.main([recipe, "--images", "1408", "--json", "--run", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    depths = {k: [s["depth"] for s in v["stages"]] for k, v in out.items()}
    assert depths == {"shallowest": [1, 1, 2, 4], "deepest": [1, 3, 4, 4], "run": [1, 2, 4, 4]}
    assert out["shallowest"]["total"] < out["run"]["total"] < out["deepest"]["total"]
    assert 0 < out["run"]["supernet"] < out["run"]["total"] and out["run"]["scoring"] > 0
    with pytest.raises(SystemExit) as e:
        flops.main([recipe, "--run", str(tmp_path / "none")])
    assert e.value.code == 2 and "no log.jsonl there" in capsys.readouterr().err


# ---- the recipe ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("progressive.search.stages=[{epoch: 1, depths: [2]}]", "progressive.search.stages[0].epoch=1: the first"),
    ("progressive.search.stages=[{epoch: 0, depths: [1, 5]}]", "progressive.search.stages[0].depths=[1, 5]: must"),
    ("progressive.search.stages=[{epoch: 0, depths: [1]}, {epoch: 2, depths: [2, 3]}]",
     "progressive.search.stages[1].epoch=2: searches inside the LR warm-up (optim.warmup_epochs=4)"),
    ("progressive.search.stages=[{epoch: 0, depths: [1]}, {epoch: 39, depths: [2, 3]}]",
     "progressive.search.stages[1].epoch=39: its 2 search epoch(s) must end by the next stage (epoch 40)"),
    ("progressive.stages=[{epoch: 0, depth: 2}]", "progressive.stages[0].depth=2: progressive.search picks"),
    ("progressive.growth.op=gated", "progressive.growth.op='gated': the search's supernet"),
    ("progressive.search.time=wallclock", "progressive.search.time"),
    ("progressive.elastic_depth={max_depth: 4}", "progressive.elastic_depth='{...}': progressive.search chooses"),
])
def test_bad_search_recipes_name_the_key(override, message):
    base = ["progressive.search.stages=[{epoch: 0, depths: [1]}, {epoch: 10, depths: [2, 3]}]"]
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, RECIPE, [*base, override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_search_recipes_load():
    for name in ("recipes/demo/pretrain_cpu_search.yaml", "recipes/mae_vit_base_800ep_autoprog_search.yaml"):
        assert load_config(PretrainConfig, ROOT / name).progressive.search.stages


# ---- end to end ----------------------------------------------------------------------------------

def test_search_run_decides_logs_and_resumes_mid_search_bitwise(demo_betons, tmp_path, capsys):
    """The unbroken run decides stage 1 among depths 1/2/3 at the end of epoch 2 and grows to 4 at
    epoch 4. Resumed before the scoring (the decision recomputed from scratch: deterministic), after
    one of two snapshots (a partial score in the checkpoint) and after the decision (before the cut),
    each ends with the unbroken run's weights, optimizer state, EMAs and decisions."""
    def run(run_dir):
        cfg = load_config(PretrainConfig, RECIPE, demo_args(
            demo_betons, run_dir, *SEARCH_RUN, "checkpoint.every_steps=1", "checkpoint.keep_last=100"))
        pretrain.run(cfg)
        return checkpoint.load_latest(run_dir)

    straight = run(tmp_path / "straight")
    made = decisions(tmp_path / "straight")
    assert [(d["stage"], d["depths"]) for d in made] == [(0, [1]), (1, [1, 2, 3]), (2, [4])]
    searched = made[1]
    assert searched["step"] == 9 and len(searched["loss"]) == 3 and searched["fit"] is not None
    assert all(x > 0 for x in searched["loss"]) and searched["time"] == sorted(searched["time"])
    assert straight["progressive"]["layer_plan"] == [0, 1, 2, 3]
    kept = straight["progressive"]["search"]["decisions"]
    assert [d["winner"] for d in kept] == [d["winner"] for d in made] and all(d["applied"] for d in kept)
    ckpts = checkpoint.list_checkpoints(tmp_path / "straight")
    at = {p: torch.load(p, weights_only=True) for p in ckpts}
    by_step = {at[p]["progress"]["step"]: p for p in ckpts if at[p]["progress"]["micro"]}
    assert at[by_step[8]]["progressive"]["search"]["supernet"]["snapshots"] == 1
    for step in (7, 8, 9):
        broken = tmp_path / f"broken{step}"
        checkpoint.checkpoint_dir(broken).mkdir(parents=True)
        for p in ckpts[: ckpts.index(by_step[step]) + 1]:
            shutil.copy(p, checkpoint.checkpoint_dir(broken) / p.name)
        shutil.copy(tmp_path / "straight" / "log.jsonl", broken / "log.jsonl")
        capsys.readouterr()
        resumed = run(broken)
        assert f"resumed from {checkpoint.checkpoint_dir(broken) / by_step[step].name}" in capsys.readouterr().out
        for part in ("model", "optimizer", "progressive"):
            a, b = _flatten(straight[part]), _flatten(resumed[part])
            assert a.keys() == b.keys()
            differ = [k for k in a if not _equal(a[k], b[k]) and not k.rstrip(".").endswith(("began", "seconds"))]
            assert not differ, f"{part} differs after resuming at step {step}: {differ[:5]}"


def test_the_cut_keeps_a_deeper_winners_trained_blocks(demo_betons, tmp_path, monkeypatch):
    """The winner (forced: the deepest of 1/2/3) is cut out of the supernet and trains on: from the
    decision to epoch 4's growth its blocks are the supernet's, moved by one optimizer step each,
    never grown again (grown_at stays the supernet's step 3)."""
    decide = search.decide
    monkeypatch.setattr(search, "decide", lambda d, loss, t: {**decide(d, loss, t), "winner": len(d) - 1})
    cfg = load_config(PretrainConfig, RECIPE, demo_args(
        demo_betons, tmp_path, *SEARCH_RUN, "checkpoint.every_steps=1", "checkpoint.keep_last=100"))
    pretrain.run(cfg)
    at = {s["progress"]["step"]: s for s in map(lambda p: torch.load(p, weights_only=True),
                                                  checkpoint.list_checkpoints(tmp_path)) if s["progress"]["micro"]}
    plan = decisions(tmp_path)[1]["plan"]
    assert len(plan) == 3 and at[9]["progressive"]["search"]["decisions"][1]["applied"] is False
    for step in (10, 11):
        assert at[step]["progressive"]["layer_plan"] == [0, 1, 2] and at[step]["progressive"]["grown_at"] == 3
    before, after = at[9]["model"], at[10]["model"]
    for j, b in enumerate(plan):
        w0, w1 = before[f"blocks.{b}.mlp.fc1.weight"], after[f"blocks.{j}.mlp.fc1.weight"]
        # one AdamW step moves each weight by about lr (~1e-4 here), a re-grown block by far more
        assert (w1 - w0).abs().max() < 1e-3, f"position {j} is not block {b} of the supernet"


def test_two_gloo_processes_agree_on_every_decision(demo_betons, tmp_path):
    """2 CPU processes: the evaluation set split between them and the loss summed, rank 0's pick
    broadcast; both end with the same weights, and the supernet's skipped blocks did not stall DDP."""
    run_dir = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = torchrun("tests.ddp_probe", str(tmp_path), str(RECIPE),
                 *demo_args(demo_betons, run_dir, *SEARCH_RUN, "checkpoint.every_epochs=5"),
                 port=port, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"
    made = decisions(run_dir)
    assert [d["depths"] for d in made] == [[1], [1, 2, 3], [4]]
    assert checkpoint.load_latest(run_dir)["progressive"]["layer_plan"] == [0, 1, 2, 3]
