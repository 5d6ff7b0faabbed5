"""Pretraining end to end on the demo .beton files: checkpoints, logs, kill-and-resume, divergence."""
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastssl.config import LinProbeConfig, PretrainConfig, load_config
from fastssl.eval import linprobe
from fastssl.train import checkpoint, flops, pretrain
from fastssl.train.progressive import Stage
from fastssl.data.loaders import FFCVLoader, make_eval_loader
from fastssl.data.subset import read_labels
from fastssl.train.visualize import spread_val_images

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "recipes/demo/pretrain_cpu.yaml"
LINPROBE = ROOT / "recipes/demo/linprobe_cpu.yaml"


def small(betons, run_dir, *extra):
    """A few quick steps: 3 epochs of 4 steps of 32 images at 32 px."""
    return [f"run_dir={run_dir}", f"data.train={betons.train}", f"data.val={betons.val}",
            "data.res=32", "batch_size=32", "epochs=3", "log.wandb=disabled", "log.progress=false",
            "data.num_workers=1", "checkpoint.every_epochs=1", *extra]


def final_weights(run_dir) -> dict:
    return checkpoint.load_latest(run_dir)["model"]


@pytest.fixture(scope="module")
def pretrained(demo_betons, tmp_path_factory):
    """The run, and how many samples of each .beton its loaders decoded."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    cfg = load_config(PretrainConfig, PRETRAIN, small(demo_betons, run_dir, "log.recon_every_epochs=3",
                                                      "log.every_steps=2", "log.peak_tflops=0.5"))
    decoded = Counter()
    normalised = FFCVLoader._normalised

    def counting(self, batches, *args):  # every batch the loader yields, ffcv decoded (and nothing else)
        for imgs, labels in normalised(self, batches, *args):
            decoded[Path(self.loader.fname)] += len(labels)
            yield imgs, labels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FFCVLoader, "_normalised", counting)
        progress = pretrain.run(cfg)
    return run_dir, progress, decoded


def test_pretrain_writes_checkpoint_config_log_and_reconstructions(pretrained):
    run_dir, progress, _ = pretrained
    assert progress.epoch == 3 and progress.step > 0
    state = checkpoint.load_latest(run_dir)
    assert set(state) >= {"model", "optimizer", "scaler", "progress", "config"}
    assert state["progress"] == {"epoch": 3, "micro": 0, "micro_batch": 32, "step": progress.step}
    assert len(checkpoint.list_checkpoints(run_dir)) == 2  # keep_last=2 of the 3 epoch checkpoints
    assert json.loads((run_dir / "config.json").read_text())["data"]["res"] == 32
    losses = [r["train/loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert losses and all(0 < x < 10 for x in losses)
    png = run_dir / "recon" / "epoch_0003.png"
    from PIL import Image
    w, h = Image.open(png).size
    assert (w, h) == (3 * 32, 8 * 32)  # original | masked | reconstruction, 8 rows


def test_reconstruction_hook_decodes_only_its_eight_val_images(pretrained, demo_betons):
    _, _, decoded = pretrained
    assert len(read_labels(demo_betons.val)) > 8  # else reading all of it would pass too
    assert decoded[Path(demo_betons.val)] == 8


def test_reconstruction_images_are_spread_over_the_val_split(demo_betons):
    res, cpu = demo_betons.size, torch.device("cpu")
    every = torch.cat([x for x, _ in make_eval_loader(demo_betons.val, batch_size=64, res=res, num_workers=1)])
    fixed = spread_val_images(demo_betons.val, res=res, device=cpu)
    torch.testing.assert_close(fixed, every[torch.linspace(0, len(every) - 1, 8).long()], atol=0, rtol=0)


def test_log_lines_carry_throughput_loader_wait_and_mfu(pretrained):
    run_dir, _, _ = pretrained
    lines = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "train/loss" in r]
    per_image = flops.train_flops_per_image("micro", 8, Stage(res=32, mask_ratio=0.75))  # the recipe's model
    assert len(lines) == 6  # 3 epochs x 4 steps, a line every 2 steps
    for r in lines:
        assert r["img_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert r["mfu"] == pytest.approx(r["img_per_s"] * per_image / 0.5e12, rel=1e-9)  # log.peak_tflops=0.5


def test_killed_run_resumes_to_identical_weights(demo_betons, tmp_path):
    """SIGKILL mid-training (mid-epoch checkpoints too), resume: bitwise the weights of an unbroken run."""
    args = ["checkpoint.every_steps=3", "checkpoint.keep_last=10", "epochs=4"]
    cmd = [sys.executable, "-m", "fastssl.pretrain", str(PRETRAIN)]
    straight = tmp_path / "straight"
    subprocess.run(cmd + small(demo_betons, straight, *args), check=True, cwd=ROOT, capture_output=True)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(cmd + small(demo_betons, broken, *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(checkpoint.list_checkpoints(broken)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = checkpoint.list_checkpoints(broken)
    assert kept, "the run was killed before it wrote a checkpoint"
    resumed_from = torch.load(kept[-1], weights_only=True)["progress"]
    assert resumed_from["step"] < 12, "the run finished before the kill; nothing was resumed"

    r = subprocess.run(cmd + small(demo_betons, broken, *args), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the unbroken run"


def test_divergence_stops_with_message_and_keeps_last_checkpoint(demo_betons, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastssl.pretrain", str(PRETRAIN)]
    subprocess.run(cmd + small(demo_betons, run_dir, "epochs=1"), check=True, cwd=ROOT, capture_output=True)
    (good,) = checkpoint.list_checkpoints(run_dir)
    before = good.read_bytes()

    r = subprocess.run(cmd + small(demo_betons, run_dir, "optim.lr=1e30", "precision=fp32", "log.every_steps=1"),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is ")
    assert last.endswith(f"the newest checkpoint, {good}, predates it: lower optim.blr, lengthen "
                         "optim.warmup_epochs or set optim.clip_grad (the run is already in fp32)")
    assert checkpoint.list_checkpoints(run_dir) == [good]
    assert good.read_bytes() == before

    r = subprocess.run(cmd + small(demo_betons, tmp_path / "fresh", "optim.lr=1e30", "log.every_steps=1"),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert "; no checkpoint was written before it: " in r.stderr.strip().splitlines()[-1]


def test_a_run_folder_of_only_corrupt_checkpoints_stops_unless_restart(demo_betons, tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8):  # garbage under checkpoint names: a bad disk, a botched copy
        path = checkpoint.checkpoint_dir(run_dir) / f"ckpt_{step:09d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    cmd = [sys.executable, "-m", "fastssl.pretrain", str(PRETRAIN), *small(demo_betons, run_dir, "epochs=1")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: none of the 2 checkpoints in {run_dir / 'checkpoints'} loads (ckpt_000000004.pt, "
        "ckpt_000000008.pt; reasons above): set checkpoint.restart=true to start this run over from "
        "step 0 in the same folder")
    assert len(checkpoint.list_checkpoints(run_dir)) == 2

    r = subprocess.run(cmd + ["checkpoint.restart=true"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load_latest(run_dir)["progress"]["epoch"] == 1


def test_linear_probe_trains_head_only(pretrained, demo_betons, tmp_path):
    run_dir, _, _ = pretrained
    ckpt = checkpoint.list_checkpoints(run_dir)[-1]
    cfg = load_config(LinProbeConfig, LINPROBE, [
        f"init={ckpt}", f"run_dir={tmp_path / 'probe'}", f"data.train={demo_betons.train}",
        f"data.val={demo_betons.val}", "data.res=32", "epochs=2", "log.wandb=disabled", "log.progress=false",
        "data.num_workers=1", "batch_size=64",
    ])
    result = linprobe.run(cfg)
    assert 0 <= result["val/top1"] <= 100 and result["val/n"] > 0
    probe = checkpoint.load_latest(tmp_path / "probe")["model"]
    encoder = {k.removeprefix("encoder."): v for k, v in probe.items() if k.startswith("encoder.")}
    pre = final_weights(run_dir)
    assert encoder and all(torch.equal(v, pre[k]) for k, v in encoder.items() if k != "pos_embed")
    assert probe["head.fc.0.weight"].shape == (10, 64)
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["val/top1"] == result["val/top1"]


def test_demo_end_to_end(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fastssl.demo", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"),
         "--epochs", "2", "--probe-epochs", "2"],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrained MAE encoder" in r.stdout and "random encoder" in r.stdout
    assert "kNN" in r.stdout and "raw pixels, logistic regression" in r.stdout
    assert (tmp_path / "data" / "train.beton").exists() and (tmp_path / "data" / "val.beton").exists()
    assert list((tmp_path / "runs" / "pretrain" / "wandb").glob("offline-run-*"))


class Built(Exception):
    """Stops a run once the part a test looks at is built."""


def test_paper_recipe_decays_the_tokens_as_mae_pretraining(demo_betons, tmp_path, monkeypatch):
    decayed = set()

    def adamw(model, *args, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        groups = real_adamw(model, *args, **kwargs).param_groups
        decayed.update(names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"])
        raise Built

    real_adamw = pretrain.optim.adamw
    monkeypatch.setattr(pretrain.optim, "adamw", adamw)
    cfg = load_config(PretrainConfig, ROOT / "recipes/mae_vit_base_800ep.yaml",
                      [*small(demo_betons, tmp_path / "run"), "model.size=micro", "model.patch_size=8",
                       "device=cpu", "compile=false"])
    with pytest.raises(Built):
        pretrain.run(cfg)
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight"} <= decayed
    assert "norm.weight" not in decayed
