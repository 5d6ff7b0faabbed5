"""Continued MAE pretraining of a ScaleNet-expanded checkpoint through `fastssl.pretrain`."""
import json
import os
from pathlib import Path

import pytest
import torch

from fastssl.config import ConfigError, LinProbeConfig, PretrainConfig, load_config
from fastssl.eval import linprobe
from fastssl.expand import main as expand_main
from fastssl.models import build_mae, scalenet
from fastssl.train import checkpoint, pretrain

from tests import ddp_probe
from test_pretrain import LINPROBE, PRETRAIN, ROOT, small


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scalenet")
    torch.manual_seed(0)
    torch.save({"model": build_mae("micro", patch_size=8).state_dict()}, folder / "mae.pth")
    expand_main([str(folder / "mae.pth"), "--depth", "6", "--map", "cyclic", "--adapter-rank", "4",
                 "--out", str(folder / "x.pth")])
    return folder / "x.pth"


def test_continue_pretraining_frozen_shared_weights_and_resume(demo_betons, tmp_path, expanded):
    run_dir = tmp_path / "run"
    args = small(demo_betons, run_dir, f"init={expanded}", "scalenet.freeze_shared=true",
                 "scalenet.adapter_lr_scale=10", "log.every_steps=2")
    pretrain.run(load_config(PretrainConfig, PRETRAIN, [*args, "epochs=1"]))
    progress = pretrain.run(load_config(PretrainConfig, PRETRAIN, [*args, "epochs=2"]))  # resumes
    assert progress.epoch == 2

    init = torch.load(expanded, weights_only=True)["model"]
    state = checkpoint.load_latest(run_dir)
    sd = state["model"]
    assert sd["scalenet"]["sources"] == [0, 1, 2, 3, 0, 1]
    assert "blocks.4.attn.qkv.weight" not in sd  # shared with position 0, stored once
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])  # frozen
    assert not torch.equal(sd["blocks.4.mlp.fc2.adapter.up.weight"], init["blocks.4.mlp.fc2.adapter.up.weight"])
    groups = state["optimizer"]["param_groups"]
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 10.0, 10.0]
    model = build_mae("micro", patch_size=8)
    scalenet.restore(model, init)
    trainable = sum(p.requires_grad for p in model.parameters())
    scalenet.freeze_shared(model)
    frozen = trainable - sum(p.requires_grad for p in model.parameters())
    assert frozen > 0 and sum(len(g["params"]) for g in groups) == trainable - frozen  # not in the optimizer
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]  # adapter matrices decay, scales not


def test_depth_stages_with_an_expanded_init_are_refused(demo_betons, tmp_path, expanded):
    cfg = load_config(PretrainConfig, PRETRAIN, small(demo_betons, tmp_path / "run", f"init={expanded}",
                                                      "progressive.stages=[{epoch: 0, depth: 3}]"))
    with pytest.raises(ConfigError, match="drop the depth stages"):
        pretrain.run(cfg)


def test_linear_probe_of_a_continued_expanded_run(demo_betons, tmp_path, expanded):
    run_dir = tmp_path / "run"
    pretrain.run(load_config(PretrainConfig, PRETRAIN, small(demo_betons, run_dir, f"init={expanded}", "epochs=1")))
    ckpt = checkpoint.list_checkpoints(run_dir)[-1]
    cfg = load_config(LinProbeConfig, LINPROBE, small(demo_betons, tmp_path / "probe", f"init={ckpt}", "epochs=1"))
    encoder = linprobe.build_encoder(cfg)
    assert len(encoder.blocks) == 6  # the plain export of the 6 positions
    assert 0 <= linprobe.run(cfg)["val/top1"] <= 100


def test_continue_pretraining_under_two_process_ddp(demo_betons, tmp_path, expanded):
    run_dir = tmp_path / "run"
    r = ddp_probe.torchrun("tests.ddp_scalenet_probe", str(tmp_path), str(PRETRAIN),
                           *small(demo_betons, run_dir, f"init={expanded}", "epochs=1", "batch_size=16"),
                           port=29541, env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):  # a shared tensor's gradient: the mean over ranks of the sum over its positions
        grad = json.loads((tmp_path / f"grad{rank}.json").read_text())
        assert grad["checked"] == 4 * 12 and grad["max_rel_error"] < 1e-4, grad
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {rep["steps"] for rep in reports} == {50 // 8}  # 50 images a rank, 8 a process
    assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"

    sd = checkpoint.load_latest(run_dir)["model"]
    init = torch.load(expanded, weights_only=True)["model"]
    assert "blocks.4.attn.qkv.weight" not in sd  # shared with position 0, stored once
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])  # trained
    model = build_mae("micro", patch_size=8)
    scalenet.restore(model, sd)
    model.load_state_dict(sd)
    assert model.blocks[4].attn.qkv.weight is model.blocks[0].attn.qkv.weight
    assert torch.equal(model.blocks[4].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
