"""The training loop's mechanics on a synthetic loader: clipping, accumulation, LR schedule, checkpoints."""
import itertools
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fastssl.config import RunConfig
from fastssl.run import dist
from fastssl.train import checkpoint, engine, flops, optim, progressive
from fastssl.train.logger import RunLogger


class TensorLoader:
    """An EpochLoader over fixed tensors: batch i of every epoch is the same."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        self.x, self.y, self.batch, self.start = x, y, batch, 0

    def __len__(self):
        return len(self.x) // self.batch

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def set_resolution(self, res):
        pass

    def set_batch_size(self, batch_size):
        self.batch = batch_size

    def __iter__(self):
        for i in range(self.start, len(self)):
            s = slice(i * self.batch, (i + 1) * self.batch)
            yield self.x[s], self.y[s]


def mse(m, x, y, stage):
    return ((m(x) - y) ** 2).mean()


def run(tmp_path, *, batch, accum=1, epochs=1, clip=None, lr=0.1, warmup=0.0, n=16, record=None, micro=None,
        every_steps=0):
    cfg = RunConfig(run_dir=str(tmp_path), epochs=epochs, batch_size=batch * accum, accum_steps=accum,
                    precision="fp32")
    cfg.optim.lr, cfg.optim.clip_grad, cfg.optim.warmup_epochs = lr, clip, warmup
    cfg.log.progress, cfg.log.every_steps = False, 1
    cfg.checkpoint.every_steps, cfg.checkpoint.keep_last = every_steps, 100
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(n, 4) * 10, torch.randn(n, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if record is not None:
        step = opt.step

        def recording_step(*a, **k):
            record.append({"grad": torch.cat([p.grad.flatten() for p in model.parameters()]).clone(),
                           "lr": opt.param_groups[0]["lr"]})
            return step(*a, **k)

        opt.step = recording_step
    logger = RunLogger(tmp_path, {}, enabled=False, wandb="disabled", project="t")
    info = dist.DistInfo()
    stage = progressive.Stage(res=32, micro_batch=micro)
    engine.fit(cfg, info, model, opt, TensorLoader(x, y, batch), mse, lambda epoch: stage, logger)
    return model


class SlowLoader(TensorLoader):
    """Each batch takes `delay` seconds to arrive: a loader-bound run."""

    delay = 0.2

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


class RecordingLogger:
    def __init__(self):
        self.lines = []

    def log(self, metrics, step):
        self.lines.append(metrics)


def logged_lines(tmp_path, loader_cls, peak_tflops=None):
    cfg = RunConfig(run_dir=str(tmp_path), epochs=1, batch_size=4, precision="fp32")
    cfg.log.progress, cfg.log.every_steps, cfg.log.peak_tflops = False, 2, peak_tflops
    model = nn.Linear(4, 1)
    loader = loader_cls(torch.randn(16, 4), torch.randn(16, 1), batch=4)
    logger = RecordingLogger()
    engine.fit(cfg, dist.DistInfo(), model, torch.optim.SGD(model.parameters(), lr=0.1), loader, mse,
               progressive.constant(32), logger, flops_per_image=lambda stage: 1e9)
    return [r for r in logger.lines if "train/loss" in r]


def test_logged_loader_wait_is_the_share_of_time_spent_waiting_for_batches(tmp_path):
    slow = logged_lines(tmp_path / "slow", SlowLoader)
    fast = logged_lines(tmp_path / "fast", TensorLoader)
    assert len(slow) == len(fast) == 2  # 4 steps, a line every 2
    assert all(r["data_wait"] > 0.5 for r in slow)  # 0.2 s sleeps around a linear model's steps
    assert max(r["data_wait"] for r in fast) < min(r["data_wait"] for r in slow)


def test_log_window_rates_on_a_known_clock(monkeypatch):
    # Worked by hand: 2 steps of batch 8 at 1e12 FLOPs each, in 2 s on 2 processes of a 1 TFLOP/s
    # device, 0.5 s of it blocked on the loader -> 8 images/s, MFU 0.5, data_wait 0.25.
    clock = itertools.chain([0.0], itertools.repeat(2.0))  # the window's start, then its line's moment
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    cfg = RunConfig(batch_size=8)
    logger = RecordingLogger()
    window = engine.LogWindow(cfg, dist.DistInfo(world_size=2), logger, peak_flops=1e12)
    window.waited.seconds = 0.5
    state = engine.TrainState(nn.Linear(1, 1), torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1),
                              torch.amp.GradScaler("cpu", enabled=False), None, {}, engine.Progress(step=2))
    for loss in (1.0, 3.0):
        window.loss_sum += loss
        window.add_step(1e12)
    monkeypatch.setattr(dist, "all_reduce_mean", lambda t: t)  # one process stands in for two here
    window.write(state, force=True)
    (line,) = logger.lines
    assert line["train/loss"] == 2.0 and line["img_per_s"] == 8.0
    assert line["mfu"] == 0.5 and line["data_wait"] == 0.25


def test_a_log_call_with_no_metrics_writes_no_line(tmp_path):
    logger = RunLogger(tmp_path, {}, enabled=True, wandb="disabled", project="test")
    logger.log({}, step=3)  # an epoch-end hook that had nothing due
    logger.log({"train/loss": 1.0}, step=4)
    logger.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"train/loss": 1.0' in lines[0]


def test_mfu_is_logged_only_with_a_peak(tmp_path):
    assert all("mfu" in r for r in logged_lines(tmp_path / "a", TensorLoader, peak_tflops=2.0))
    assert all("mfu" not in r for r in logged_lines(tmp_path / "b", TensorLoader))  # a CPU: no nominal peak


def test_device_peak_flops_finds_gpus_by_their_reported_names(monkeypatch):
    assert flops.device_peak_flops(torch.device("cpu")) is None
    assert flops.device_peak_flops(torch.device("cpu"), tflops=3.5) == 3.5e12
    cuda = torch.device("cuda")
    # names as torch.cuda.get_device_name reports them -> the table's entry (None: not in it)
    for reported, entry in [("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA H100 80GB HBM3", "H100"),
                            ("NVIDIA H200", "H200"), ("Tesla V100-SXM2-32GB", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=reported: name)
        expected = entry and flops.NOMINAL_BF16_TFLOPS[entry] * 1e12
        assert flops.device_peak_flops(cuda) == expected
        assert flops.device_peak_flops(cuda, tflops=100.0) == 100e12  # the user's figure wins


def test_clipping_bounds_the_gradient_norm(tmp_path):
    free, clipped = [], []
    run(tmp_path / "a", batch=8, record=free)
    run(tmp_path / "b", batch=8, clip=0.5, record=clipped)
    assert max(r["grad"].norm() for r in free) > 0.5  # so clipping has something to do
    assert all(r["grad"].norm() <= 0.5 + 1e-5 for r in clipped)


def test_accumulation_equals_the_big_batch(tmp_path):
    big, small = [], []
    run(tmp_path / "a", batch=8, record=big)
    run(tmp_path / "b", batch=4, accum=2, record=small)
    assert len(big) == len(small) == 2
    for a, b in zip(big, small):
        torch.testing.assert_close(a["grad"], b["grad"])


def test_stage_micro_batch_splits_the_same_step(tmp_path):
    big, split = [], []
    run(tmp_path / "a", batch=8, record=big)
    run(tmp_path / "b", batch=8, micro=2, record=split)  # 4 micro-batches per step, same 2 steps
    assert len(big) == len(split) == 2
    for a, b in zip(big, split):
        torch.testing.assert_close(a["grad"], b["grad"])


def test_resume_mid_epoch_after_the_split_changed(tmp_path):
    """A recipe edited before resuming (a smaller micro-batch after an OOM, here larger): the epoch
    continues after the samples already trained on, in whole steps."""
    straight = run(tmp_path / "a", batch=8, n=32, micro=2)  # 4 steps
    run(tmp_path / "b", batch=8, n=32, micro=2, every_steps=1)
    for p in checkpoint.list_checkpoints(tmp_path / "b")[2:]:
        p.unlink()  # killed after step 2, 8 micro-batches of 2 into the epoch
    seen = []
    resumed = run(tmp_path / "b", batch=8, n=32, micro=4, record=seen)
    assert len(seen) == 2  # steps 3 and 4: samples 16..31 in micro-batches of 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_lr_warms_up_then_follows_cosine(tmp_path):
    seen = []
    run(tmp_path, batch=2, epochs=2, warmup=0.5, lr=1e-3, record=seen)  # 8 steps/epoch, 16 in all
    lrs = [r["lr"] * 1e3 for r in seen]
    assert lrs[:4] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(optim.cosine_lr(10, 16, 4, 1.0, 0.0))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 12)))


def test_load_latest_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
    checkpoint.save({"v": torch.tensor(1)}, tmp_path, step=10, keep_last=3)
    newest = checkpoint.save({"v": torch.tensor(2)}, tmp_path, step=20, keep_last=3)
    newest.write_bytes(newest.read_bytes()[:50])  # a node died mid-copy
    state = checkpoint.load_latest(tmp_path)
    assert state["v"].item() == 1 and state["path"].endswith("ckpt_000000010.pt")
    assert "skipping unreadable ckpt_000000020.pt" in capsys.readouterr().err


def _corrupt_middle(path: Path) -> None:
    """4 KiB of random bytes in the middle: same size, still a zip, torch.load would not notice."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def _weights(v: float) -> dict:
    return {"w": torch.full((256, 256), v)}  # 256 KiB: the middle falls in the tensor data


def test_load_latest_skips_a_checkpoint_corrupted_in_the_middle(tmp_path, capsys):
    checkpoint.save(_weights(1.0), tmp_path, step=10, keep_last=3)
    newest = checkpoint.save(_weights(2.0), tmp_path, step=20, keep_last=3)
    _corrupt_middle(newest)
    state = checkpoint.load_latest(tmp_path)
    assert state["path"].endswith("ckpt_000000010.pt") and torch.equal(state["w"], _weights(1.0)["w"])
    assert "skipping unreadable ckpt_000000020.pt: checksum mismatch in" in capsys.readouterr().err


def test_a_folder_of_only_corrupt_checkpoints_stops_unless_restart(tmp_path, capsys):
    for step in (100, 200):
        _corrupt_middle(checkpoint.save(_weights(step), tmp_path, step=step, keep_last=2))
    with pytest.raises(checkpoint.Unreadable, match=r"none of the 2 checkpoints in .* loads "
                       r"\(ckpt_000000100.pt, ckpt_000000200.pt; .*checkpoint.restart=true"):
        checkpoint.load_latest(tmp_path)
    assert checkpoint.load_latest(tmp_path, restart=True) is None
    # started over: the corrupt, higher-numbered files do not count towards keep_last, so the new
    # checkpoints are not pruned away as soon as they are written
    for step in (1, 2, 3):
        checkpoint.save(_weights(step), tmp_path, step=step, keep_last=2)
        assert checkpoint.load_latest(tmp_path)["path"].endswith(f"ckpt_{step:09d}.pt")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == \
        ["ckpt_000000002.pt", "ckpt_000000003.pt", "ckpt_000000100.pt", "ckpt_000000200.pt"]


def test_keep_last_prunes_oldest_and_leaves_no_temp_files(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save({"v": torch.tensor(step)}, tmp_path, step=step, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_000000003.pt", "ckpt_000000004.pt"]
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == \
        ["ckpt_000000003.pt", "ckpt_000000004.pt"]


@pytest.mark.parametrize("decay_tokens", [False, True])
def test_no_decay_on_norms_biases_and_tokens_unless_asked(decay_tokens):
    from fastssl.models import build_mae

    model = build_mae("micro")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optim.param_groups(model, weight_decay=0.05, decay_tokens=decay_tokens)
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    tokens = {"cls_token", "mask_token"}
    assert {"norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert tokens <= ({names[id(p)] for p in decay["params"]} if decay_tokens else no_decay_names)
    assert "pos_embed" not in no_decay_names  # fixed sin-cos: not trained at all
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"]
               if not names[id(p)].startswith("patch_embed") and names[id(p)] not in tokens)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
