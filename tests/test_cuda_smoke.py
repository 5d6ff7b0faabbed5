"""CUDA smoke test: the GPU paths a CPU run never takes. bf16 autocast on CUDA, the fused AdamW kernel,
torch.compile through inductor's GPU backend across a resolution change, a checkpoint resumed onto the
GPU, and the loader's uint8-over-PCIe path normalised on the GPU. Skipped without a GPU; on one:
`python -m pytest tests/test_cuda_smoke.py` (the loader test also needs ffcv)."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import TensorLoader

from fastssl.config import RunConfig
from fastssl.models import build_mae
from fastssl.run import dist
from fastssl.train import engine, optim, progressive
from fastssl.train.logger import RunLogger

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


class ResizingLoader(TensorLoader):
    """Fixed images, served at the stage's resolution."""

    res = 32

    def set_resolution(self, res):
        self.res = res

    def __iter__(self):
        for x, y in super().__iter__():
            yield F.interpolate(x, size=(self.res, self.res), mode="bilinear", antialias=True), y


def _train(run_dir, epochs: int) -> tuple[engine.Progress, torch.nn.Module, torch.optim.Optimizer]:
    cfg = RunConfig(run_dir=str(run_dir), epochs=epochs, batch_size=8, precision="bf16", compile=True,
                    device="cuda")
    cfg.optim.lr, cfg.optim.warmup_epochs = 1e-3, 0.0
    cfg.log.progress, cfg.checkpoint.every_epochs = False, 1
    torch.manual_seed(0)
    model = build_mae("micro", patch_size=8).to(CUDA)
    opt = optim.adamw(model, cfg.optim.lr, 0.05, (0.9, 0.95), CUDA)
    x = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(CUDA)
    loader = ResizingLoader(x, torch.zeros(32, dtype=torch.long, device=CUDA), batch=8)
    stages = [progressive.Stage(res=32, mask_ratio=0.5), progressive.Stage(res=64, mask_ratio=0.75)]
    losses = []

    def loss_fn(m, imgs, labels, stage):
        assert imgs.device.type == "cuda" and imgs.shape[-1] == stage.res
        loss = m(imgs, mask_ratio=stage.mask_ratio)[0]
        losses.append(loss.detach())
        return loss

    logger = RunLogger(run_dir, {}, enabled=False, wandb="disabled", project="t")
    progress = engine.fit(cfg, dist.DistInfo(device=CUDA), model, opt, loader, loss_fn,
                          lambda epoch: stages[min(epoch, 1)], logger)
    assert all(math.isfinite(float(v)) for v in losses)
    return progress, model, opt


def test_mae_trains_compiled_in_bf16_and_resumes_on_cuda(tmp_path):
    torch.manual_seed(0)
    initial = build_mae("micro", patch_size=8).state_dict()
    progress, model, opt = _train(tmp_path, epochs=2)  # 32 px, then 64 px: a recompile
    assert progress.step == 8
    assert opt.defaults["fused"] and all(p.device.type == "cuda" for p in model.parameters())
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), initial[k])]
    assert "blocks.0.attn.qkv.weight" in moved and "decoder_pred.weight" in moved

    resumed, model, _ = _train(tmp_path, epochs=3)  # picks up the epoch-2 checkpoint, trains one more
    assert resumed.step == 12 and resumed.epoch == 3
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="needs ffcv")
def test_gpu_loader_batches_equal_the_cpu_loaders(demo_betons):
    from fastssl.data import make_pretrain_loader

    cpu = make_pretrain_loader(demo_betons.train, 8, res=32, num_workers=2, seed=3)
    gpu = make_pretrain_loader(demo_betons.train, 8, res=32, num_workers=2, seed=3, device=CUDA)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and xg.dtype == torch.float32
        assert xg.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)  # same crops, normalised on the GPU
        assert torch.equal(yg.cpu(), yc)


def test_an_armed_step_never_synchronises_the_device_between_log_steps(tmp_path, monkeypatch):
    # An armed bf16 run under sync-debug "error" from its second step on (the first initialises
    # AdamW's state and the position tables): any synchronising call raises, except in the log line
    # and the checkpoint (allowed below); so the stop check, the LR schedule, the masking and the
    # fused AdamW step do not synchronise.
    import contextlib
    import functools

    from fastssl.train import stop

    @contextlib.contextmanager
    def syncs_allowed():
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def allowing(f):
        @functools.wraps(f)
        def g(*a, **k):
            with syncs_allowed():
                return f(*a, **k)
        return g

    monkeypatch.setattr(engine.LogWindow, "write", allowing(engine.LogWindow.write))
    monkeypatch.setattr(engine, "save", allowing(engine.save))
    monkeypatch.setattr(stop, "_armed", False)
    monkeypatch.setattr(stop, "_requested", False)
    cfg = RunConfig(run_dir=str(tmp_path), epochs=1, batch_size=4, precision="bf16", device="cuda")
    cfg.log.progress, cfg.log.every_steps = False, 3
    model = build_mae("micro", patch_size=8, img_size=32).to(CUDA)
    opt = optim.adamw(model, 1e-3, 0.05, (0.9, 0.95), CUDA)
    x = torch.randn(32, 3, 32, 32, device=CUDA)
    loader = TensorLoader(x, torch.zeros(32, dtype=torch.long, device=CUDA), batch=4)
    real_step = opt.step

    def step_then_check(*a, **k):
        out = real_step(*a, **k)
        torch.cuda.set_sync_debug_mode("error")
        return out

    opt.step = step_then_check
    stop.arm()
    logger = RunLogger(tmp_path, {}, enabled=False, wandb="disabled", project="t")
    try:
        progress = engine.fit(cfg, dist.DistInfo(device=CUDA), model, opt, loader,
                              lambda m, imgs, labels, stage: m(imgs, mask_ratio=0.75)[0],
                              progressive.constant(32, 0.75), logger)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert progress.step == 8
