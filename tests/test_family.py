"""Width growth inside progressive stages, and model families (fastssl/train/family.py): resume
across a width growth bitwise, members written and loadable, FLOPs per member adding up."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from fastssl import export
from fastssl.config import FamilyConfig, LinProbeConfig, PretrainConfig, load_config
from fastssl.eval import linprobe
from fastssl.models import scalenet
from fastssl.train import checkpoint, family, flops, pretrain, stop
from fastssl.train.depth_growth import DepthGrowth
from tests import ddp_probe
from tests.test_progressive_pretrain import LINPROBE, assert_same, demo_args, logged, resume_at

ROOT = Path(__file__).resolve().parents[1]

WIDTH_RUN = ["epochs=4", "data.res=32", "precision=fp32", "checkpoint.every_epochs=1", "checkpoint.every_steps=1",
             "checkpoint.keep_last=100"]


@pytest.mark.parametrize("growth, stages", [
    ("{width: duplicate, op: interleave}",  # micro -> mini: 2x the width, depth 2 -> 4
     "[{epoch: 0, res: 16, depth: 2, mask_ratio: 0.5, micro_batch: 16},"
     " {epoch: 2, res: 32, size: mini, depth: 4, mask_ratio: 0.75, micro_batch: 8}]"),
    ("{width: masked, mask_steps: 4, op: gated, gate_steps: 4}",  # micro -> midi: 2.5x, depth 4 -> 8
     "[{epoch: 0, res: 16, mask_ratio: 0.5, micro_batch: 16},"
     " {epoch: 2, res: 32, size: midi, depth: 8, mask_ratio: 0.75, micro_batch: 8}]"),
])
def test_resume_across_a_width_growth_is_bitwise_exact(demo_betons, tmp_path, growth, stages, capsys):
    """Resume just before a stage that widens (and deepens) the model, and one step after it (masks
    and gates half open): both end with the unbroken run's weights and optimizer state."""
    def run(run_dir):
        cfg = load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml",
                          demo_args(demo_betons, run_dir, *WIDTH_RUN, f"progressive.growth={growth}",
                                    f"progressive.stages={stages}"))
        pretrain.run(cfg)
        return checkpoint.load_latest(run_dir)

    straight = run(tmp_path / "straight")
    ckpts = checkpoint.list_checkpoints(tmp_path / "straight")
    at = {p: torch.load(p, weights_only=True) for p in ckpts}
    before = next(p for p in ckpts if at[p]["progress"]["step"] == 6 and at[p]["progress"]["micro"] == 0)
    after = next(p for p in ckpts if at[p]["progress"]["step"] == 7)
    assert at[before]["model"]["cls_token"].shape[-1] == 64
    assert at[after]["model"]["cls_token"].shape[-1] == straight["model"]["cls_token"].shape[-1] > 64
    assert logged(tmp_path / "straight", "stage/size")[-1] in ("mini", "midi")
    for i, last in enumerate((before, after)):
        resumed = resume_at(ckpts, last, tmp_path / f"broken{i}", run, capsys)
        assert_same(straight, resumed, ("model", "optimizer", "progressive"), f"after resuming at {last.name}")


@pytest.mark.parametrize("growth, stages, size, dim", [
    ("{width: duplicate, op: interleave}",  # micro -> mini: 2x the width, depth 2 -> 4
     "[{epoch: 0, res: 16, depth: 2, micro_batch: 16}, {epoch: 1, res: 16, size: mini, depth: 4, micro_batch: 8}]",
     "mini", 128),
    ("{width: masked, mask_steps: 2, op: gated, gate_steps: 2}",  # micro -> midi: 2.5x, depth 4 -> 8
     "[{epoch: 0, res: 16, micro_batch: 16}, {epoch: 1, res: 16, size: midi, depth: 8, micro_batch: 8}]",
     "midi", 160),
])
def test_ddp_two_gloo_processes_agree_across_a_width_growth(demo_betons, tmp_path, growth, stages, size, dim):
    """2 CPU processes (gloo) through a mid-run stage that widens and deepens the model: DDP is
    rebuilt around the grown model (its hooks on the new parameters, so the ranks still average
    their gradients) and both ranks end with the same weights, at the new size, trained on after
    the growth."""
    with socket.socket() as sock:  # other test sessions may share the machine: no fixed port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = ddp_probe.torchrun(
        "tests.ddp_probe", str(tmp_path), str(ROOT / "recipes/demo/pretrain_cpu.yaml"),
        *demo_args(demo_betons, tmp_path / "run", "precision=fp32", "epochs=2", "data.res=16",
                   "checkpoint.every_epochs=0", f"progressive.growth={growth}", f"progressive.stages={stages}"),
        port=port, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {rep["world"] for rep in reports} == {2} and reports[0]["steps"] == 2 * (50 // 16)
    assert [rep["embed_dim"] for rep in reports] == [dim, dim]
    assert logged(tmp_path / "run", "stage/size")[-1] == size
    assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"
    assert reports[0]["grown"] == reports[1]["grown"]
    assert reports[0]["grown"][-1] != reports[0]["weights"], "the grown model did not train"


FAMILY = ROOT / "recipes/demo/pretrain_cpu_family.yaml"
FAMILY_RUN = ["data.res=16", "precision=fp32", "epochs=3", "optim.warmup_epochs=0.5", "checkpoint.every_epochs=1",
              "progressive.growth.mask_steps=2",
              "members=[{size: micro, epochs: 1}, {size: mini, epochs: 1, width: duplicate},"
              " {size: midi, epochs: 1, width: masked}]"]


def test_family_writes_every_member_and_each_loads_for_evaluation(demo_betons, tmp_path, capsys):
    """micro -> mini (duplicate) -> midi (masked, 4 -> 8 blocks), an epoch each: every member's
    checkpoint.pth is its run's final weights, the linear probe builds its encoder at its own size,
    and it exports strict into the timm ViT that computes what its MAE encoder computes."""
    run_dir = tmp_path / "family"
    cfg = load_config(FamilyConfig, FAMILY, demo_args(demo_betons, run_dir, *FAMILY_RUN))
    paths = family.run(cfg)
    assert paths == [run_dir / "members" / s / "checkpoint.pth" for s in ("micro", "mini", "midi")]
    for path, (size, dim, depth) in zip(paths, [("micro", 64, 4), ("mini", 128, 4), ("midi", 160, 8)]):
        member = torch.load(path, weights_only=True)
        final = checkpoint.load_latest(path.parent)
        assert "optimizer" not in member and final["progress"]["epoch"] == 1
        assert all(torch.equal(member["model"][k], v) for k, v in final["model"].items() if torch.is_tensor(v))
        encoder = linprobe.build_encoder(load_config(LinProbeConfig, LINPROBE, [
            f"init={path}", f"data.train={demo_betons.train}", f"data.val={demo_betons.val}", "data.res=16"])).eval()
        assert encoder.embed_dim == dim and len(encoder.blocks) == depth
        mae = scalenet.build_for(member["model"]).eval()
        small = torch.randn(2, 3, 16, 16)
        with torch.no_grad():  # at the probe's 16 px too: a grown member's table is regenerated, not resampled
            torch.testing.assert_close(encoder(small), mae.forward_encoder(small, 0.0)[0][:, 0], atol=1e-5, rtol=1e-5)
        # at the stored grid (224 px): a grown member's table is its first width's channels, which
        # export keeps as a learned table (resampled, not regenerated, at another grid)
        meta = export.export(str(path), str(tmp_path / f"{size}.safetensors"))
        vit = VisionTransformer(**json.loads(meta["timm_kwargs"])).eval()
        vit.load_state_dict(load_file(tmp_path / f"{size}.safetensors"), strict=True)
        imgs = torch.randn(1, 3, 224, 224)
        with torch.no_grad():  # mask ratio 0 in patch order: the whole image
            ours = mae.forward_encoder(imgs, 0.0, torch.arange(784.0)[None])[0]
            torch.testing.assert_close(vit.forward_features(imgs), ours, atol=1e-5, rtol=1e-5)
    grown = torch.load(paths[1], weights_only=True)["model"]["blocks.0.attn.qkv.weight"]
    assert grown.shape == (3 * 128, 128)
    stamps = [p.stat().st_mtime_ns for p in paths]
    capsys.readouterr()
    family.run(cfg)  # a restart after the end: every member is done, nothing trains again
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert "member" not in capsys.readouterr().out


TWO_MEMBERS = ["epochs=2", "members=[{size: micro, epochs: 1}, {size: mini, epochs: 1, width: duplicate}]"]


@pytest.mark.usefixtures("disarmed")
def test_a_stopped_family_writes_no_member_and_starts_none_then_resumes_exactly(demo_betons, tmp_path, monkeypatch):
    """A stop (Slurm's USR2) mid-member leaves after the member's checkpoint, as a pretraining does;
    one asked for after the member's last step still leaves before its checkpoint.pth and the next
    member. The restarted family ends with the unbroken one's members."""
    def cfg(name):
        return load_config(FamilyConfig, FAMILY, demo_args(demo_betons, tmp_path / name, *FAMILY_RUN, *TWO_MEMBERS))

    straight = family.run(cfg("straight"))
    run_dir = tmp_path / "stopped"
    micro = run_dir / "members" / "micro"
    after_step = DepthGrowth.after_step

    def ask_at_step_1(self, step):
        after_step(self, step)
        if step == 1:
            stop.request()

    monkeypatch.setattr(DepthGrowth, "after_step", ask_at_step_1)
    with pytest.raises(stop.StopRequested, match="at step 1"):
        family.run(cfg("stopped"))
    assert checkpoint.load_latest(micro)["progress"]["step"] == 1
    assert not (micro / "checkpoint.pth").exists() and not (run_dir / "members" / "mini").exists()

    monkeypatch.setattr(DepthGrowth, "after_step", after_step)
    monkeypatch.setattr(stop, "_requested", False)  # the requeued job starts unasked
    member_run = pretrain.run

    def ask_after_the_run(member):
        member_run(member)
        stop.request()  # after the last step's poll, e.g. during the final checkpoint's write

    monkeypatch.setattr(pretrain, "run", ask_after_the_run)
    with pytest.raises(stop.StopRequested, match="after member micro's last step"):
        family.run(cfg("stopped"))
    assert checkpoint.load_latest(micro)["progress"]["epoch"] == 1  # micro's training is done
    assert not (micro / "checkpoint.pth").exists() and not (run_dir / "members" / "mini").exists()

    monkeypatch.setattr(pretrain, "run", member_run)
    monkeypatch.setattr(stop, "_requested", False)
    for ours, theirs in zip(family.run(cfg("stopped")), straight):
        assert_same(torch.load(theirs, weights_only=True), torch.load(ours, weights_only=True), ("model",), ours)


def test_family_flops_per_member_add_up(capsys):
    """Each member's FLOPs are its own run's (grown at its size from epoch 0), they sum to the total,
    and at one resolution a member costs what it costs alone for the same epochs."""
    cfg = load_config(FamilyConfig, FAMILY)
    out = flops.family_flops(cfg, images=1000)
    per_member = [flops.recipe_flops(cfg.member(k), images=1000)["total"] for k in range(len(cfg.members))]
    assert [r["flops"] for r in out["members"]] == per_member
    assert out["total"] == sum(per_member) == pytest.approx(out["alone_own_epochs"])
    assert out["members"][2]["alone_all_epochs"] == pytest.approx(3 * out["members"][2]["flops"])
    assert out["largest_alone"] == out["members"][2]["alone_all_epochs"]
    assert per_member[0] < per_member[1] < per_member[2]
    flops.main([str(FAMILY), "--images", "1408"])
    printed = capsys.readouterr().out
    assert "micro -> mini -> midi" in printed and "(1.000x)" in printed


@pytest.mark.parametrize("override, message", [
    ("members=[{size: mini, epochs: 15}, {size: micro, epochs: 15}]", "members[1].size='micro': cannot grow from mini"),
    ("members=[{size: mini, epochs: 15}, {size: midi, epochs: 15, width: duplicate}]",
     "duplicate needs integer width ratios"),
    ("members=[{size: micro, epochs: 15}, {size: small, epochs: 15}]", "head dims"),
    ("progressive.elastic_depth={num_depths: 2}", "progressive.elastic_depth='{...}': a family's members grow in width"),
    ("progressive.search.stages=[{epoch: 0, depths: [2]}]",
     "progressive.search.stages='[...]': a family's members grow in width"),
])
def test_bad_family_is_a_one_line_error_before_anything_runs(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        family.main([str(FAMILY), f"run_dir={run_dir}", override])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not run_dir.exists()
