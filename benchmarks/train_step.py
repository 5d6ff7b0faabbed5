"""MAE train-step throughput (img/s, MFU): forward + backward + AdamW step, side by side.

    python -m benchmarks.train_step [--quick] [--sizes micro,tiny,base] [--res 224] [--batch N]

Synthetic images (random normal, a fresh mask every step); one variant per row, all built from the
same `build_mae(size)` weights:
- ``naive``: eager, fp32, explicit softmax attention (timm's ``fused_attn=False`` path: q@k^T,
  softmax, @v as three kernels), single-tensor AdamW -- the floor, no fusion anywhere;
- ``eager fp32``: fused SDPA attention, foreach AdamW;
- ``eager bf16``: the same under bf16 autocast;
- ``eager bf16 fused``: + the fused AdamW kernel (`fastssl.train.optim.adamw`'s choice on CUDA);
- ``compile bf16 fused``: + ``torch.compile`` of the model (as ``cfg.compile`` does); compile time is
  reported apart from the steady-state rate.

Runs are interleaved variant by variant (shared machines are noisy): each figure is the median of
``--runs`` runs with its spread. MFU = model FLOPs (`fastssl.flops`, as the recipes' FLOPs are
counted: every matmul of the encoder on the visible tokens and of the decoder on all tokens, forward
+ backward = 3x forward) / step time / peak, where the peak is a bf16 (or fp32) matmul rate measured
by this script on the same device; on a GPU the JSON also gives MFU against the nominal dense bf16
peak. Beyond torch, timm and einops only pyyaml is imported (`fastssl.flops` reads recipes), never
ffcv, submitit or wandb, so this runs on the GPU machine with synthetic data.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial

import torch

from fastssl.models import build_mae, get_size
from fastssl.train import flops
from fastssl.train.progressive import Stage

from .common import fail, fmt_rate, measure_interleaved, print_table, write_results

MASK_RATIO = 0.75


@dataclass(frozen=True)
class Variant:
    name: str
    compile: bool = False
    bf16: bool = False
    fused_attn: bool = True
    adamw: str = "foreach"  # foreach | fused | single (one tensor at a time)


VARIANTS = (
    Variant("naive", fused_attn=False, adamw="single"),
    Variant("eager fp32"),
    Variant("eager bf16", bf16=True),
    Variant("eager bf16 fused", bf16=True, adamw="fused"),
    Variant("compile bf16 fused", compile=True, bf16=True, adamw="fused"),
)


def set_fused_attn(model: torch.nn.Module, fused: bool) -> None:
    """Switch every timm attention layer between SDPA and the explicit q@k^T -> softmax -> @v path."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def mae_train_flops(size: str, res: int, mask_ratio: float = MASK_RATIO) -> int:
    """Forward + backward FLOPs per image, as `python -m fastssl.flops` counts a recipe's."""
    return flops.train_flops_per_image(size, get_size(size).patch_size, Stage(res, mask_ratio))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Measured dense matmul rate (FLOP/s) for n x n operands: the best of three timings."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


class _Step:
    """One variant's model, optimizer and a fixed synthetic batch; ``run(steps)`` returns images."""

    def __init__(self, v: Variant, size: str, res: int, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.v, self.device = v, device
        self.model = build_mae(size, img_size=res).to(device)
        set_fused_attn(self.model, v.fused_attn)
        kind = {"foreach": dict(foreach=True), "fused": dict(fused=True), "single": dict(foreach=False)}
        # MAE's pretraining hyper-parameters; the values do not change the cost.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1.5e-4, betas=(0.9, 0.95),
                                     weight_decay=0.05, **kind[v.adamw])
        self.fwd = torch.compile(self.model) if v.compile else self.model
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.x = torch.randn(batch, 3, res, res, device=device).to(memory_format=fmt)

    def run(self, steps: int) -> int:
        for _ in range(steps):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.v.bf16):
                loss = self.fwd(self.x, MASK_RATIO)[0]
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return steps * self.x.shape[0]


def bench_size(size: str, res: int, batch: int, steps: int, runs: int, variants: tuple[Variant, ...],
               device: torch.device) -> dict:
    out = {}
    steppers = {}
    for v in variants:
        s = _Step(v, size, res, batch, device)
        t = time.perf_counter()
        s.run(2)  # warm-up; for compiled variants this is the compilation (forward and backward graphs)
        out[v.name] = {"warmup_s": time.perf_counter() - t}
        steppers[v.name] = s
    # each run ends with a device sync, so the next one starts with an idle GPU
    stats = measure_interleaved({k: partial(s.run, steps) for k, s in steppers.items()}, runs)
    return {k: {**out[k], **m} for k, m in stats.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="micro + tiny, small batch, compile for micro only")
    p.add_argument("--sizes", help="comma-separated model sizes (default micro,tiny,base; quick: micro,tiny)")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, help="images per step (default: 256 on a GPU, 4 on CPU)")
    p.add_argument("--steps", type=int, help="steps per timed run (default: 20 on a GPU, 3 on CPU; quick 2)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: on a shared, oversubscribed machine OpenMP "
                        "threads spin-wait on each other and steps run several times slower)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(a.threads)
    sizes = a.sizes.split(",") if a.sizes else (["micro", "tiny"] if a.quick else ["micro", "tiny", "base"])
    for s in sizes:
        try:
            get_size(s)
        except ValueError as e:
            fail(f"--sizes: {e}")
    if a.res % 16 or a.res < 32:
        fail(f"--res {a.res}: must be a multiple of 16, >= 32")
    batch = a.batch or (256 if gpu else 4)  # CPU: the full run (base included) stays < 20 min in all
    steps = a.steps or (20 if gpu else 2 if a.quick else 3)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: what a user gets with TF32 on
        torch.backends.cudnn.allow_tf32 = True
    n = 8192 if gpu else 1024
    peak = {"bf16": matmul_peak(device, torch.bfloat16, n, 20 if gpu else 2),
            "fp32": matmul_peak(device, torch.float32, n, 20 if gpu else 2)}
    nominal = flops.device_peak_flops(device)
    results = {"device": str(device), "res": a.res, "batch": batch, "steps_per_run": steps,
               "mask_ratio": MASK_RATIO, "matmul_peak_flops": peak, "nominal_bf16_peak_flops": nominal,
               "sizes": {}}
    rows = []
    for size in sizes:
        # CPU compilation of the larger models takes minutes: --quick compiles micro only
        variants = tuple(v for v in VARIANTS if not (v.compile and a.quick and not gpu and size != "micro"))
        img_flops = mae_train_flops(size, a.res)
        stats = bench_size(size, a.res, batch, steps, a.runs, variants, device)
        floor = stats["naive"]["median"]
        for k, m in stats.items():
            v = next(v for v in variants if v.name == k)
            m["mfu"] = m["median"] * img_flops / peak["bf16" if v.bf16 else "fp32"]
            if nominal:
                m["mfu_nominal"] = m["median"] * img_flops / nominal
            compile_s = f"{m['warmup_s']:.0f}" if v.compile else "-"
            rows.append([size, k, fmt_rate(m), f"{m['median'] / floor:.2f}x", f"{100 * m['mfu']:.1f}%",
                         compile_s])
        results["sizes"][size] = {"train_gflops_per_image": img_flops / 1e9, "variants": stats}
    peak_txt = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in peak.items())
    table = print_table(f"MAE train step img/s ({device}, {a.res} px, batch {batch}, mask {MASK_RATIO}; "
                        f"measured matmul TFLOP/s: {peak_txt})",
                        ["size", "variant", "img/s (median ± half-spread)", "vs naive", "MFU", "compile s"],
                        rows)
    results["table"] = table
    bars = {f"{s} {k}": m["median"] / r["variants"]["naive"]["median"]
            for s, r in results["sizes"].items() for k, m in r["variants"].items()}
    # a GPU run has a file of its own: a later CPU run must not replace the MFU recipe_compute uses
    write_results("train_step_gpu" if gpu else "train_step", results, bars, quick=a.quick)
    return results


if __name__ == "__main__":
    main()
