"""Progressive pretraining end to end on the demo .beton files: the CPU demo recipes, and resume
across a growth and a micro-batch change that ends bitwise where an unbroken run ends."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastssl import export
from fastssl.config import LinProbeConfig, PretrainConfig, load_config
from fastssl.eval import linprobe
from fastssl.models import build_mae
from fastssl.train import checkpoint, pretrain

ROOT = Path(__file__).resolve().parents[1]
LINPROBE = ROOT / "recipes/demo/linprobe_cpu.yaml"


def demo_args(betons, run_dir, *extra):
    return [f"run_dir={run_dir}", f"data.train={betons.train}", f"data.val={betons.val}", "batch_size=32",
            "log.wandb=disabled", "log.progress=false", "log.recon_every_epochs=0", "data.num_workers=1",
            *extra]


def logged(run_dir, key):
    rows = map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())
    return [r[key] for r in rows if key in r]


@pytest.mark.parametrize("recipe, stages", [
    ("pretrain_cpu.yaml", [(64, 4)]),
    ("pretrain_cpu_fast.yaml", [(32, 1), (48, 1), (64, 4)]),
])
def test_cpu_demo_recipes_run(demo_betons, tmp_path, recipe, stages):
    """Both demo recipes, their full epochs on the test's demo data (3 steps per epoch)."""
    run_dir = tmp_path / "run"
    cfg = load_config(PretrainConfig, ROOT / "recipes/demo" / recipe,
                      demo_args(demo_betons, run_dir, "checkpoint.every_epochs=0", "precision=fp32"))
    progress = pretrain.run(cfg)
    assert progress.epoch == cfg.epochs
    state = checkpoint.load_latest(run_dir)
    assert state["progressive"]["layer_plan"] == [0, 1, 2, 3]
    seen = list(dict.fromkeys(zip(logged(run_dir, "stage/res"), logged(run_dir, "stage/depth"))))
    assert seen == stages
    losses = logged(run_dir, "train/loss")
    assert all(0 < x < 10 for x in losses) and losses[-1] < losses[0]


GROWTH_RUN = ["epochs=4", "data.res=32", "precision=fp32", "checkpoint.every_epochs=1", "checkpoint.every_steps=1", "checkpoint.keep_last=100",
              "progressive.stages=[{epoch: 0, res: 16, depth: 1, mask_ratio: 0.5, micro_batch: 16},"
              " {epoch: 2, res: 32, depth: 4, mask_ratio: 0.75, drop_path: 0.1, micro_batch: 8}]"]


@pytest.mark.parametrize("growth", [
    "{op: gated, optimizer: copy, gate_steps: 4, rewarmup_steps: 2}",
    "{op: mogrow, optimizer: carry, ema_decay: 0.9}",
])
def test_resume_across_growth_is_bitwise_exact(demo_betons, tmp_path, growth, capsys):
    """Resume just before the growth (epoch end) and just after it (mid-epoch, gates half open), where
    the micro-batch also drops from 16 to 8 (accumulation 2 -> 4, the same 32 per step): both end
    with the unbroken run's weights, optimizer state and EMA."""
    def run(run_dir):
        cfg = load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml",
                          demo_args(demo_betons, run_dir, *GROWTH_RUN, f"progressive.growth={growth}"))
        pretrain.run(cfg)
        return checkpoint.load_latest(run_dir)

    straight = run(tmp_path / "straight")
    ckpts = checkpoint.list_checkpoints(tmp_path / "straight")
    assert len(ckpts) == 12  # 3 steps per epoch
    assert logged(tmp_path / "straight", "stage/accum_steps") == [2, 4]
    at = {p: torch.load(p, weights_only=True) for p in ckpts}
    before = next(p for p in ckpts if at[p]["progress"] == {"epoch": 2, "micro": 0, "micro_batch": 16, "step": 6})
    after = next(p for p in ckpts if at[p]["progress"] == {"epoch": 2, "micro": 4, "micro_batch": 8, "step": 7})
    assert at[before]["progressive"]["layer_plan"] == [0] and at[after]["progressive"]["layer_plan"] == [0, 1, 2, 3]
    for i, last in enumerate((before, after)):
        resumed = resume_at(ckpts, last, tmp_path / f"broken{i}", run, capsys)
        assert_same(straight, resumed, ("model", "optimizer"), f"after resuming at {last.name}")
        pa, pb = straight["progressive"], resumed["progressive"]
        assert pa["layer_plan"] == pb["layer_plan"] and pa["gate_start"] == pb["gate_start"]
        assert (pa["ema"] is None) == (pb["ema"] is None)
        if pa["ema"] is not None:
            assert all(torch.equal(pa["ema"][k], pb["ema"][k]) for k in pa["ema"])


def test_ddp_growth_two_gloo_processes(demo_betons, tmp_path):
    """The fast demo recipe on 2 CPU processes (gloo), grown from 1 to 4 zero-initialised blocks after
    epoch 0 with the micro-batch halved: both ranks end with the same weights, so DDP was rebuilt with
    the new blocks' parameters and averaged their gradients, and those blocks trained after growth."""
    run_dir = tmp_path / "run"
    with socket.socket() as sock:  # other test sessions may share the machine: no fixed port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "tests.ddp_probe", str(tmp_path), str(ROOT / "recipes/demo/pretrain_cpu_fast.yaml"),
         *demo_args(demo_betons, run_dir, "batch_size=32", "epochs=2", "precision=fp32", "checkpoint.every_epochs=1",
                    "progressive.stages=[{epoch: 0, res: 16, mask_ratio: 0.5, depth: 1},"
                    " {epoch: 1, res: 32, mask_ratio: 0.75, depth: 4, micro_batch: 8}]")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {rep["world"] for rep in reports} == {2} and {rep["steps"] for rep in reports} == {2 * (50 // 16)}
    assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"
    assert logged(run_dir, "stage/accum_steps") == [1, 2]
    pre, final = (torch.load(p, weights_only=True) for p in checkpoint.list_checkpoints(run_dir))
    assert pre["progressive"]["layer_plan"] == [0] and final["progressive"]["layer_plan"] == [0, 1, 2, 3]
    for b in (1, 2, 3):  # zeroed at the growth, then trained
        for name in ("attn.proj.weight", "mlp.fc2.weight", "attn.qkv.weight"):
            key = f"blocks.{b}.{name}"
            assert not torch.equal(final["model"][key], pre["model"][key]), key
        assert final["model"][f"blocks.{b}.attn.proj.weight"].abs().sum() > 0


def test_probe_and_export_of_a_checkpoint_saved_before_the_growth(demo_betons, tmp_path, capsys):
    """A checkpoint taken before the last growth holds all blocks, but only its layer plan trained:
    the probe's encoder (shared by kNN, fine-tuning and export) runs just those blocks, as the MAE did."""
    run_dir = tmp_path / "pre"
    pretrain.run(load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml", demo_args(
        demo_betons, run_dir, "epochs=2", "data.res=16", "precision=fp32", "checkpoint.keep_last=2",
        "checkpoint.every_epochs=1", "progressive.growth={op: gated, gate_steps: 100}",
        "progressive.stages=[{epoch: 0, depth: 1}, {epoch: 1, depth: 4}]")))
    before, after = checkpoint.list_checkpoints(run_dir)
    state = torch.load(before, weights_only=True)
    assert state["progressive"]["layer_plan"] == [0]
    capsys.readouterr()

    def probe_encoder(init):
        return linprobe.build_encoder(load_config(LinProbeConfig, LINPROBE, [
            f"init={init}", f"data.train={demo_betons.train}", f"data.val={demo_betons.val}", "data.res=16"])).eval()

    encoder = probe_encoder(before)
    assert len(encoder.blocks) == 1
    assert "runs 1 of its 4 encoder blocks" in capsys.readouterr().err
    mae = build_mae("micro", patch_size=8)
    mae.load_state_dict(state["model"])
    mae.layer_plan = [0]
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # mask ratio 0 keeps every token (shuffled; the cls token does not care)
        torch.testing.assert_close(encoder(imgs), mae.forward_encoder(imgs, 0.0)[0][:, 0])
    assert len(probe_encoder(after).blocks) == 4  # grown, its new blocks' gates still opening
    assert "gates of blocks [1, 2, 3] were still opening" in capsys.readouterr().err

    meta = export.export(str(before), str(tmp_path / "enc.safetensors"), img_size=16)
    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs["depth"] == 1 and meta["timm_model"] == ""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**kwargs)
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, state["model"]["blocks.0.attn.qkv.weight"])


def resume_at(ckpts: list[Path], last: Path, run_dir: Path, run, capsys) -> dict:
    """A run killed after writing `last`: its checkpoints up to `last` in `run_dir`, `run(run_dir)`
    resumed from it; the final checkpoint it ends with."""
    checkpoint.checkpoint_dir(run_dir).mkdir(parents=True)
    for p in ckpts[: ckpts.index(last) + 1]:
        shutil.copy(p, checkpoint.checkpoint_dir(run_dir) / p.name)
    capsys.readouterr()
    resumed = run(run_dir)
    assert f"resumed from {checkpoint.checkpoint_dir(run_dir) / last.name}" in capsys.readouterr().out
    return resumed


def assert_same(a: dict, b: dict, parts: tuple[str, ...], when: str) -> None:
    """Checkpoints `a` and `b` hold bitwise-equal `parts` (nested tensors and values)."""
    for part in parts:
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        assert all(_equal(flat_a[k], flat_b[k]) for k in flat_a), f"{part} differs {when}"


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix: tree}


def _equal(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b
