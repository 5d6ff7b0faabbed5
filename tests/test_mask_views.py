"""Disjoint masked views (`mask_views`, DMJD's disjoint masking): the visible sets, the K = 1 path,
the gradient, the config check, the FLOPs, and pretraining with resume and on 2 gloo processes."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastssl.config import ConfigError, PretrainConfig, load_config
from fastssl.models import build_mae, growth, len_keep, mae, max_views, random_masking, scalenet
from fastssl.run import cli
from fastssl.train import checkpoint, flops, pretrain, progressive
from tests.test_progressive_pretrain import _equal, _flatten

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes/demo/pretrain_cpu.yaml"


def visible_per_view(mask: torch.Tensor, views: int) -> torch.Tensor:
    """(K*N, L) mask with 1 = removed -> (K, N, L) with 1 = visible."""
    return (1 - mask).view(views, -1, mask.shape[1])


@pytest.mark.parametrize("patches, ratio, views", [(16, 0.75, 4), (16, 0.5, 2), (64, 0.75, 4), (100, 0.51, 2)])
def test_visible_sets_are_disjoint_and_cover_every_token_at_full_count(patches, ratio, views):
    x = torch.randn(3, patches, 5)
    keep = len_keep(patches, ratio)
    for k in range(1, views + 1):
        kept, mask, ids_restore = random_masking(x, ratio, views=k)
        visible = visible_per_view(mask, k)
        assert kept.shape == (k * 3, keep, 5) and (visible.sum(-1) == keep).all()
        assert visible.sum(0).max() == 1  # no token visible in two views of an image
        for v in range(k):  # each view's kept tokens are its image's tokens at its visible positions
            vis = visible[v].bool()
            for i in range(3):
                assert torch.equal(kept[v * 3 + i].sort(0).values, x[i][vis[i]].sort(0).values)
    if views * keep == patches:  # K = 1 / (1 - mask ratio): together the views see every token once
        assert (visible.sum(0) == 1).all()


def _mae_reference_masking(x, mask_ratio, noise, views):
    """facebookresearch/mae `random_masking`, condensed: the one-view algorithm as it was."""
    assert views == 1
    n, num_patches, dim = x.shape
    keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, num_patches)
    mask[:, :keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def test_one_view_is_bitwise_the_mae_loss_and_gradient(monkeypatch):
    torch.manual_seed(0)
    model = build_mae("micro", img_size=32, patch_size=8)
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 16)

    def loss_and_grads(**kw):
        model.zero_grad()
        loss = model(imgs, mask_ratio=0.75, noise=noise, **kw)[0]
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ours = loss_and_grads(views=1)
    monkeypatch.setattr(mae, "random_masking", _mae_reference_masking)
    ref = loss_and_grads()
    assert torch.equal(ours[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], ref[1], strict=True))


def _two_block_plan(model):
    growth.apply_plan(model, [0, 1])


def _scalenet_8(model):
    scalenet.expand(model, 8)
    for name, p in model.named_parameters():  # adapters start at zero: give them a gradient path
        if scalenet.is_adapter(name):
            torch.nn.init.normal_(p, std=0.02)


@pytest.mark.parametrize("hw, prepare", [((32, 32), None), ((48, 32), _two_block_plan), ((32, 32), _scalenet_8)],
                         ids=["square", "non-square-2-blocks", "scalenet"])
def test_gradient_is_the_average_of_separate_forward_passes(hw, prepare):
    torch.manual_seed(0)
    model = build_mae("micro", img_size=32, patch_size=8)
    if prepare is not None:
        prepare(model)
    patches = hw[0] * hw[1] // 64
    views, keep = 4, len_keep(patches, 0.75)
    imgs, noise = torch.randn(3, 3, *hw), torch.rand(3, patches)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    joint_loss = model(imgs, mask_ratio=0.75, noise=noise, views=views)[0]
    joint = grads(joint_loss)
    order = torch.argsort(noise, dim=1)
    separate, losses = [], []
    for k in range(views):  # a one-view noise whose lowest `keep` values are view k's run
        ranks = torch.arange(float(patches)).expand(3, -1)
        noise_k = torch.empty_like(noise).scatter_(1, order.roll(-k * keep, dims=1), ranks)
        losses.append(model(imgs, mask_ratio=0.75, noise=noise_k)[0])
        separate.append(grads(losses[-1]))
    assert joint_loss.item() == pytest.approx(sum(x.item() for x in losses) / views, rel=1e-6)
    for j, *s in zip(joint, *separate, strict=True):
        torch.testing.assert_close(j, sum(s) / views, rtol=1e-4, atol=1e-6)


def test_too_many_views_for_the_model_is_named():
    with pytest.raises(ValueError, match=r"views=5: 5 x 4 visible tokens exceed 16 patches \(at most 4 views"):
        random_masking(torch.randn(2, 16, 3), 0.75, views=5)
    assert max_views(196, 0.75) == 4 and max_views(100, 0.51) == 2 and max_views(16, 0.99) == 16


def test_views_compile_without_graph_breaks():
    torch.manual_seed(0)
    model = build_mae("micro", img_size=32, patch_size=8)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    eager = model(imgs, mask_ratio=0.75, noise=noise, views=2)[0]
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(imgs, mask_ratio=0.75, noise=noise, views=2)[0], eager)


def cfg_of(recipe, *overrides) -> PretrainConfig:
    return load_config(PretrainConfig, recipe, list(overrides))


@pytest.mark.parametrize("recipe, views, message", [
    (DEMO, 5, "mask_views=5: epochs 0-39 keep 16 of 64 tokens visible (res 64, mask_ratio 0.75): "
              "at most 4 disjoint views"),
    # coupled ratios: 160 px keeps 49 of 100 tokens
    (ROOT / "recipes/mae_vit_base_800ep_dailymae.yaml", 3,
     "mask_views=3: epochs 0-199 keep 49 of 100 tokens visible (res 160, mask_ratio 0.51): at most 2 disjoint views"),
    (ROOT / "recipes/demo/pretrain_cpu_fast.yaml", 3, "mask_views=3: epochs 0-19 keep 8 of 16 tokens visible"),
    (DEMO, 0, "mask_views=0: must be >= 1"),
])
def test_bad_views_are_one_line_config_errors(recipe, views, message):
    with pytest.raises(ConfigError) as e:
        cfg_of(recipe, f"mask_views={views}")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_views_exit_2_before_a_run_folder_exists(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(PretrainConfig, pretrain.run, "p", "d", [str(DEMO), f"run_dir={tmp_path / 'run'}", "mask_views=8"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: mask_views=8: epochs 0-39 keep 16 of 64 tokens visible (res 64, mask_ratio 0.75): "
        "at most 4 disjoint views"]
    assert not (tmp_path / "run").exists()


def test_flops_count_encoder_and_decoder_per_view_and_embedding_once():
    one, two = (progressive.Stage(res=224, mask_ratio=0.75, mask_views=k) for k in (1, 2))
    f = flops.mae_flops("base", 16, 224, 0.75)
    assert flops.train_flops_per_image("base", 16, one) == 3 * (f["encoder"] + f["decoder"]) - f["embed"]
    per_view = 3 * (f["encoder"] - f["embed"] + f["decoder"])
    assert flops.train_flops_per_image("base", 16, two) - flops.train_flops_per_image("base", 16, one) == per_view
    fast = cfg_of(ROOT / "recipes/mae_vit_base_800ep_fast.yaml")
    fast2 = cfg_of(ROOT / "recipes/mae_vit_base_800ep_fast.yaml", "mask_views=2")
    a, b = flops.recipe_flops(fast), flops.recipe_flops(fast2)
    assert [r["views"] for r in b["stages"]] == [2] * 4
    assert 1.9 < b["total"] / a["total"] < 2.0 and 1.9 < b["baseline"] / a["baseline"] < 2.0  # one embedding


def test_two_view_fast_recipe_matches_the_fast_recipe_in_flops(capsys):
    recipe = ROOT / "recipes/mae_vit_base_400ep_fast_2views.yaml"
    flops.main([str(recipe), "--versus", str(ROOT / "recipes/mae_vit_base_800ep_fast.yaml")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{recipe}: MAE-base/16, 400 epochs") and " views " in out[1]
    assert out[-1] == f"ratio to {ROOT / 'recipes/mae_vit_base_800ep_fast.yaml'}: 0.995x"
    ours, baseline = (flops.recipe_flops(cfg_of(ROOT / f"recipes/{r}.yaml"))["total"]
                      for r in ("mae_vit_base_400ep_fast_2views", "mae_vit_base_800ep"))
    assert round(ours / baseline, 3) == 0.379  # as the recipe's header says


def demo_args(betons, run_dir, *extra):
    return [f"run_dir={run_dir}", f"data.train={betons.train}", f"data.val={betons.val}", "batch_size=32",
            "data.res=32", "log.wandb=disabled", "log.progress=false", "log.recon_every_epochs=0",
            "data.num_workers=1", "precision=fp32", "mask_views=2", *extra]


def test_resume_mid_epoch_is_bitwise_and_logs_views(demo_betons, tmp_path, capsys):
    """Two views of each image at 32 px (4 of 16 tokens each); killed after step 4 (mid-epoch 1),
    resumed: the unbroken run's weights and optimizer state, bit for bit."""
    def run(run_dir):
        pretrain.run(cfg_of(DEMO, *demo_args(demo_betons, run_dir, "epochs=2", "checkpoint.every_steps=1",
                                             "checkpoint.keep_last=10", "log.every_steps=1", "log.peak_tflops=0.5")))
        return checkpoint.load_latest(run_dir)

    straight = run(tmp_path / "straight")
    ckpts = checkpoint.list_checkpoints(tmp_path / "straight")
    assert len(ckpts) == 6  # 100 images, 3 steps of 32 per epoch
    lines = [json.loads(x) for x in (tmp_path / "straight/log.jsonl").read_text().splitlines()]
    rates = [r for r in lines if "img_per_s" in r]
    per_image = flops.train_flops_per_image("micro", 8, progressive.Stage(res=32, mask_ratio=0.75, mask_views=2))
    assert rates and all(r["view_per_s"] == 2 * r["img_per_s"] for r in rates)
    assert all(r["mfu"] == pytest.approx(r["img_per_s"] * per_image / 0.5e12, rel=1e-9) for r in rates)
    assert [r["stage/mask_views"] for r in lines if "stage/mask_views" in r] == [2]

    broken = tmp_path / "broken"
    checkpoint.checkpoint_dir(broken).mkdir(parents=True)
    for p in ckpts[:4]:
        shutil.copy(p, checkpoint.checkpoint_dir(broken) / p.name)
    capsys.readouterr()
    resumed = run(broken)
    assert f"resumed from {checkpoint.checkpoint_dir(broken) / ckpts[3].name}" in capsys.readouterr().out
    for part in ("model", "optimizer"):
        a, b = _flatten(straight[part]), _flatten(resumed[part])
        assert a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a), f"{part} differs after the resume"


def test_two_gloo_processes_end_with_the_same_weights(demo_betons, tmp_path):
    with socket.socket() as sock:  # other test sessions may share the machine: no fixed port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "tests.ddp_probe", str(tmp_path), str(DEMO),
         *demo_args(demo_betons, tmp_path / "run", "epochs=1", "checkpoint.every_epochs=1")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(rep["world"], rep["per_process_batch"], rep["steps"]) for rep in reports] == [(2, 16, 3)] * 2
    assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"

