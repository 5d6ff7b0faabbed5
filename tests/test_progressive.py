"""Progressive schedules, depth growth operators, optimizer policies at growth, FLOPs accounting."""
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastssl.config import ConfigError, PretrainConfig, RampConfig, load_config
from fastssl.models import build_mae, growth, len_keep
from fastssl.run import cli
from fastssl.train import depth_growth, engine, flops, optim, progressive

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def cfg_of(*overrides, recipe=RECIPES / "mae_vit_base_800ep.yaml") -> PretrainConfig:
    return load_config(PretrainConfig, recipe, list(overrides))


# ---- schedules -----------------------------------------------------------------------------------

def test_ramp_rounds_to_multiples_of_32_like_ffcv_imagenet():
    ramp = RampConfig(min_res=160, max_res=192, start_ramp=65, end_ramp=76)
    got = [progressive.ramp_res(e, ramp) for e in (0, 65, 70, 71, 76, 87)]
    assert got == [160, 160, 160, 192, 192, 192]  # 174.5 -> 160, 177.5 -> 192


def test_stages_are_looked_up_by_range():
    s = progressive.from_config(cfg_of(recipe=RECIPES / "mae_vit_base_800ep_autoprog.yaml"))
    assert [(s(e).res, s(e).depth) for e in (0, 199, 200, 450, 799)] == \
        [(128, 6), (128, 6), (160, 8), (192, 10), (224, 12)]
    assert [(a, b) for a, b, _ in s.segments(800)] == [(0, 200), (200, 400), (400, 600), (600, 800)]


def test_coupled_mask_keeps_visible_tokens_constant():
    s = progressive.from_config(cfg_of(recipe=RECIPES / "mae_vit_base_800ep_dailymae.yaml"))
    seen = {(s(e).res, len_keep((s(e).res // 16) ** 2, s(e).mask_ratio)) for e in range(800)}
    assert seen == {(160, 49), (192, 49), (224, 49)}
    assert s(0).mask_ratio == pytest.approx(0.51) and s(300).mask_ratio == pytest.approx(0.66, abs=0.01)


def test_ramp_with_depth_stages_and_coupling():
    s = progressive.from_config(cfg_of(
        "progressive.ramp={min_res: 160, max_res: 224, start_ramp: 10, end_ramp: 20}",
        "progressive.couple_mask=true", "progressive.stages=[{epoch: 0, depth: 6}, {epoch: 15, depth: 12}]"))
    assert (s(0).res, s(0).depth) == (160, 6) and (s(19).res, s(19).depth) == (224, 12)
    assert all(len_keep((s(e).res // 16) ** 2, s(e).mask_ratio) == 49 for e in range(30))


@pytest.mark.parametrize("override, message", [
    ("progressive.stages=[{epoch: 0, depth: 8}, {epoch: 10, depth: 6}]", "stages[1].depth=6: depth may not shrink"),
    ("progressive.stages=[{epoch: 0, res: 224}, {epoch: 10, res: 192}]", "stages[1].res=192: resolution may not shrink"),
    ("progressive.stages=[{epoch: 0, depth: 13}]", "stages[0].depth=13: must be in 0..12"),
    ("progressive.stages=[{epoch: 0, res: 200}]", "stages[0].res=200: must be a positive multiple of model.patch_size=16"),
    ("progressive.stages=[{epoch: 0}, {epoch: 20}, {epoch: 10}]", "stages[2].epoch=10: stages out of order"),
    ("progressive.stages=[{epoch: 5}]", "stages[0].epoch=5: the first stage must start at epoch 0"),
    ("progressive.stages=[{epoch: 0, depth: 0}, {epoch: 9, depth: 12}]", "progressive.growth.op='stack'"),
    ("progressive.ramp={min_res: 224, max_res: 160}", "ramp.max_res=160: must be >= min_res=224"),
    ("progressive.ramp={min_res: 150, max_res: 224}", "ramp.min_res=150: must be a positive multiple"),
    ("progressive.stages=[{epoch: 0, micro_batch: 384}]", "stages[0].micro_batch=384: must be > 0 and divide batch_size=4096"),
])
def test_bad_schedules_are_one_line_config_errors(override, message):
    extra = ["progressive.growth.op=stack"] if "stack" in message else []
    with pytest.raises(ConfigError) as e:
        cfg_of(override, *extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_schedule_exits_2_before_anything_runs(tmp_path, capsys):
    from fastssl.train import pretrain

    with pytest.raises(SystemExit) as e:
        cli.main(PretrainConfig, pretrain.run, "p", "d", [str(RECIPES / "mae_vit_base_800ep.yaml"),
                 f"run_dir={tmp_path / 'run'}", "progressive.stages=[{epoch: 0, depth: 13}]"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: progressive.stages[0].depth=13")
    assert not (tmp_path / "run").exists()


def test_stage_micro_batch_keeps_the_global_batch():
    cfg = cfg_of("accum_steps=2", "progressive.stages=[{epoch: 0, res: 128, micro_batch: 512}, {epoch: 10}, "
                 "{epoch: 20, res: 224, micro_batch: 128}]")
    s = progressive.from_config(cfg)
    splits = [progressive.batch_split(s(e), cfg, world_size=8) for e in (0, 15, 20)]
    assert splits == [(512, 1), (512, 1), (128, 4)]  # null inherits; 8 x micro x accum = 4096 throughout
    assert progressive.batch_split(progressive.Stage(224), cfg, world_size=8) == (256, 2)  # the recipe's
    cfg.validate_world(8)
    with pytest.raises(ConfigError) as e:
        cfg.validate_world(16)  # 256 per process: a micro-batch of 512 cannot split it
    assert str(e.value) == ("progressive.stages[0].micro_batch=512: must divide the per-process batch "
                            "batch_size / world_size = 4096 / 16 = 256 (allowed: 1, 2, 4, 8, 16, 32, 64, 128, 256)")
    # FLOPs per image do not depend on how a batch is split
    plain = cfg_of("accum_steps=2", "progressive.stages=[{epoch: 0, res: 128}, {epoch: 20, res: 224}]")
    assert flops.recipe_flops(cfg)["total"] == flops.recipe_flops(plain)["total"]


# ---- growth --------------------------------------------------------------------------------------

def micro(depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_mae("micro", patch_size=8)
    growth.apply_plan(model, list(range(depth)))
    return model


def fixed_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 16, generator=g)


def fixed_loss(model, seed=1) -> torch.Tensor:
    imgs, noise = fixed_inputs(seed)
    return model(imgs, mask_ratio=0.5, noise=noise)[0]


def train_a_little(model, steps=3):
    opt = optim.adamw(model, 1e-2, 0.05, (0.9, 0.95), torch.device("cpu"))
    for i in range(steps):
        fixed_loss(model, seed=10 + i).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("op", ["zero", "gated"])
def test_zero_and_gated_growth_preserve_the_loss(op):
    model = micro(2)
    train_a_little(model)  # so the old blocks are not at their init
    before = fixed_loss(model)
    moves = growth.grow(model, op, 4)
    if op == "gated":
        growth.set_gates(model, {m.block: 0.0 for m in moves if m.source is None})
    after = fixed_loss(model)
    assert model.layer_plan == [0, 1, 2, 3]
    assert abs(after.item() - before.item()) <= 1e-6 * abs(before.item())
    if op == "gated":  # the gate is what preserves it: open, the new blocks change the output
        imgs, noise = fixed_inputs(1)
        closed = model.forward_encoder(imgs, 0.5, noise)[0]
        growth.set_gates(model, {2: 1.0, 3: 1.0})
        opened = model.forward_encoder(imgs, 0.5, noise)[0]
        assert (opened - closed).abs().max() > 1e-2


@pytest.mark.parametrize("op, plan_sources", [
    ("stack", [0, 1, 0, 1]),
    ("interleave", [0, 0, 1, 1]),
])
def test_copying_growth_maps_positions_to_old_layers(op, plan_sources):
    model = micro(2)
    train_a_little(model)
    old = [{k: v.clone() for k, v in model.blocks[i].state_dict().items()} for i in range(2)]
    moves = growth.grow(model, op, 4)
    assert [m.source for m in moves] == plan_sources
    assert [m.continues for m in moves] == [True, True, False, False] if op == "stack" else [True, False, True, False]
    for j, s in enumerate(plan_sources):
        assert all(torch.equal(v, old[s][k]) for k, v in model.blocks[j].state_dict().items())
    assert all(p.requires_grad for b in model.blocks for p in b.parameters())


def test_mogrow_copies_new_layers_from_the_ema():
    model = micro(2)
    ema = growth.BlockEMA(model)
    opt = optim.adamw(model, 1e-2, 0.05, (0.9, 0.95), torch.device("cpu"))
    for i in range(3):
        fixed_loss(model, seed=10 + i).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, 0.5)
    online0 = {k: v.clone() for k, v in model.blocks[0].state_dict().items()}
    averaged0 = ema.block(0)
    assert not torch.equal(online0["attn.qkv.weight"], averaged0["attn.qkv.weight"])
    growth.grow(model, "mogrow", 4, ema)  # interleave: 0 <- 0 (itself), 1 <- 0 (a copy from the EMA)
    assert torch.equal(model.blocks[0].attn.qkv.weight, online0["attn.qkv.weight"])
    assert torch.equal(model.blocks[1].attn.qkv.weight, averaged0["attn.qkv.weight"])
    assert torch.equal(ema.block(1)["attn.qkv.weight"], averaged0["attn.qkv.weight"])


def test_inactive_blocks_get_no_updates_and_no_weight_decay():
    model = micro(2)
    frozen = [p.clone() for p in model.blocks[3].parameters()]
    train_a_little(model)
    assert all(not p.requires_grad for p in model.blocks[3].parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.blocks[3].parameters()))
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, micro(2).blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("policy", ["reset", "carry", "copy"])
def test_optimizer_state_policies_at_growth(policy):
    model = micro(2)
    opt = train_a_little(model)
    b0 = dict(opt.state[model.blocks[0].mlp.fc1.weight])
    head = model.decoder_pred.weight
    moves = growth.grow(model, "interleave", 4)  # blocks: 0 <- 0 (itself), 1 <- 0 (copy), 2 <- 1 (moved), 3 <- 1
    moved_from_1 = {k: v.clone() for k, v in opt.state[model.blocks[1].mlp.fc1.weight].items()}
    optim.regrow_state(opt, model.blocks, moves, policy)
    state = [opt.state.get(model.blocks[i].mlp.fc1.weight, {}) for i in range(4)]
    if policy == "reset":
        assert not opt.state
        return
    assert opt.state[head]  # non-block parameters keep theirs
    assert torch.equal(state[0]["exp_avg"], b0["exp_avg"]) and state[0]["step"] == b0["step"]
    assert torch.equal(state[2]["exp_avg_sq"], moved_from_1["exp_avg_sq"])
    if policy == "carry":
        assert state[1] == {} and state[3] == {}
    else:
        assert torch.equal(state[1]["exp_avg"], b0["exp_avg"]) and state[1]["exp_avg"] is not b0["exp_avg"]
        assert torch.equal(state[3]["exp_avg"], moved_from_1["exp_avg"])
    opt.step()  # the grown model keeps training


def test_depth_growth_hook_ramps_gates_and_rewarms_the_lr():
    model = micro(4)
    opt = optim.adamw(model, 1e-3, 0.05, (0.9, 0.95), torch.device("cpu"))
    cfg = cfg_of("progressive.growth={op: gated, gate_steps: 4, rewarmup_steps: 2}").progressive.growth
    hook = depth_growth.DepthGrowth(model, opt, cfg, start_depth=2)
    assert model.layer_plan == [0, 1] and hook.lr_factor(0) == 1.0
    assert hook.enter(progressive.Stage(32, 0.5, depth=4), step=10)
    assert model.gated_blocks == {2, 3} and model.block_gate[2].item() == 0.0
    hook.after_step(12)
    assert model.block_gate[3].item() == 0.5 and hook.lr_factor(10) == 0.5 and hook.lr_factor(11) == 1.0
    state = hook.state_dict()
    assert state["layer_plan"] == [0, 1, 2, 3] and state["gate_start"] == {2: 10, 3: 10}
    with pytest.raises(ConfigError, match="depth may not shrink"):
        hook.enter(progressive.Stage(32, 0.5, depth=3), step=13)


def test_wsd_lr_is_stable_then_decays():
    lr = optim.lr_schedule(cfg_of("optim.schedule=wsd", "optim.decay_frac=0.25").optim, 100, 10, 1.0)
    assert [lr(s) for s in (0, 5, 10, 74, 75)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert lr(85) == pytest.approx(0.6) and lr(100) == 0.0


# ---- FLOPs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, patch, res, mask_ratio, depth", [
    ("base", 16, 224, 0.75, 12), ("base", 16, 160, 0.51, 6), ("micro", 8, 48, 0.56, 1), ("micro", 8, 32, 0.5, 0),
])
def test_flops_match_torch_flop_counter(size, patch, res, mask_ratio, depth):
    model = build_mae(size, patch_size=patch).to("meta")  # shapes only: counts without computing
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # FlopCounterMode has no formula for CPU's fused attention kernel
    model.layer_plan = list(range(depth))
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(2, 3, res, res, device="meta"), mask_ratio=mask_ratio)[0].backward()
    ours = flops.train_flops_per_image(size, patch, progressive.Stage(res, mask_ratio, depth))
    assert ours == pytest.approx(counter.get_total_flops() / 2, rel=0.02)


def test_fast_recipe_meets_its_flops_goal(capsys):
    for name, lo, hi in (("mae_vit_base_800ep_fast", 0.0, 0.40), ("mae_vit_base_800ep_autoprog", 0.5, 0.7),
                         ("mae_vit_base_800ep_dailymae", 0.85, 0.95), ("mae_vit_base_800ep", 1.0, 1.0)):
        ratio = flops.recipe_flops(cfg_of(recipe=RECIPES / f"{name}.yaml"))["ratio"]
        assert lo <= ratio <= hi, (name, ratio)
    flops.main([str(RECIPES / "mae_vit_base_800ep_fast.yaml")])
    out = capsys.readouterr().out
    assert "ratio 0.381x" in out and " 128  0.500      32     1" in out


def test_fast_recipe_keeps_the_visible_tokens_its_header_states():
    cfg = cfg_of(recipe=RECIPES / "mae_vit_base_800ep_fast.yaml")
    stages = [st for _, _, st in progressive.from_config(cfg, depth=12).segments(cfg.epochs)]
    # "~32 visible tokens at 128 px and DailyMAE's 49 from 160 px on"
    assert {st.res: len_keep((st.res // 16) ** 2, st.mask_ratio) for st in stages} == {128: 32, 160: 49, 192: 49, 224: 49}


def test_compiled_mae_recompiles_per_new_stage_not_per_step():
    # The stage (resolution, mask ratio) is the only thing that may change a compiled graph: the
    # position tables, masking and loss must not make torch.compile recompile on every step.
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = engine.compiled(micro(4), backend=counting_backend)
    per_stage = []
    for res, mask_ratio in ((32, 0.5), (48, 0.66), (64, 0.75)):
        before = len(graphs)
        model(torch.randn(2, 3, res, res), mask_ratio=mask_ratio)[0].backward()
        after_first = len(graphs)
        for _ in range(3):
            model(torch.randn(2, 3, res, res), mask_ratio=mask_ratio)[0].backward()
        assert len(graphs) == after_first, f"recompiled within the {res} px stage"
        per_stage.append(after_first - before)
    torch._dynamo.reset()
    assert per_stage == [1, 1, 1]  # one graph per stage, compiled once (no graph breaks)
