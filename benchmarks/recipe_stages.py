"""Each stage of the ImageNet pretraining recipes (a family's: each member's) on one GPU, as one of `--world` GPUs runs it: peak
memory and img/s of the training step at the stage's per-GPU micro-batch, MFU, and what a host sync
per step (the stop check before it was moved off the device) would cost.

    python -m benchmarks.recipe_stages [--recipes A.yaml,B.yaml] [--world 8] [--steps N] [--runs N]

The step is the recipe's: its MAE (size, patch, norm_pix_loss), fastssl's AdamW (fused on CUDA),
bf16 autocast, `torch.compile` as `compile=true` builds it (reset per stage, as `engine.fit` does),
`DepthGrowth` applying each stage's depth and drop path, `batch_split` giving the micro-batch and the
accumulation of the recipe's global batch over `--world` GPUs; synthetic images. Per stage it times
two variants, interleaved: `async` (the step as `engine.fit` runs it, `stop.agreed()` on an armed
single process: a flag read) and `sync` (plus a device-to-host read each step, as the old
per-step `all_reduce(flag).item()` forced; the all-reduce itself is absent on one GPU, so this is the
lower bound of what it cost). Peak memory is `torch.cuda.max_memory_allocated` over the timed steps.
On CPU (no compile, no memory figures) `--batch-cap` bounds the micro-batch so it runs in seconds:
`python -m benchmarks.recipe_stages --recipes recipes/demo/pretrain_cpu_fast.yaml --batch-cap 2 --steps 1`.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from fastssl.config import ConfigError, FamilyConfig, PretrainConfig, load_config, recipe_dict
from fastssl.models import build_mae
from fastssl.train import depth_growth, engine, flops, optim, progressive, stop

from .common import fail, fmt_rate, measure_interleaved, print_table, write_results

IMAGENET_RECIPES = ",".join(f"recipes/{name}.yaml" for name in
                            ("mae_vit_base_800ep", "mae_vit_base_800ep_fast", "mae_vit_large_800ep",
                             "mae_family_s_b_l"))


class StageStep:
    """The recipe's optimizer step at one stage: `accum` micro-batches of `micro` images, then AdamW."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, stage: progressive.Stage, micro: int,
                 accum: int, compile: bool, device: torch.device):
        self.model, self.opt, self.stage, self.accum, self.device = model, opt, stage, accum, device
        if compile:
            torch._dynamo.reset()  # as engine.fit does at a new stage
        self.fwd = engine.compiled(model) if compile else model
        self.x = torch.randn(micro, 3, stage.res, stage.res, device=device)
        self.flag = torch.zeros((), device=device)

    def run(self, steps: int, host_sync: bool) -> int:
        for _ in range(steps):
            for _ in range(self.accum):
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    loss = self.fwd(self.x, mask_ratio=self.stage.mask_ratio, views=self.stage.mask_views)[0]
                (loss / self.accum).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            stopping = bool(self.flag.item()) if host_sync else stop.agreed()
            if stopping:
                raise RuntimeError("a stop was requested during the benchmark")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * self.accum * len(self.x)


def recipe_runs(path: str) -> list[tuple[str, PretrainConfig]]:
    """(label, config) of each pretraining a recipe runs: itself, or each member of a family as it
    trains once grown to its size (the widest member's stage is what has to fit)."""
    if "members" not in recipe_dict(path):
        return [(path, load_config(PretrainConfig, path, []))]
    family = load_config(FamilyConfig, path, [])
    runs = []
    for k, m in enumerate(family.members):
        cfg = family.member(k)
        cfg.model.size = m.size
        runs.append((f"{path} [{m.size}]", cfg))
    return runs


def bench_recipe(path: str, cfg: PretrainConfig, world: int, steps: int, runs: int, batch_cap: int | None,
                 compile: bool, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = build_mae(cfg.model.size, patch_size=cfg.model.patch_size, norm_pix_loss=cfg.model.norm_pix_loss,
                      drop_path=cfg.model.drop_path, depth=cfg.model.depth).to(device)
    opt = optim.adamw(model, cfg.lr(), cfg.optim.weight_decay, cfg.optim.betas, device, decay_tokens=cfg.decay_tokens)
    schedule = progressive.from_config(cfg, depth=len(model.blocks))
    hook = depth_growth.DepthGrowth(model, opt, cfg.progressive.growth, schedule(0).depth, size=cfg.model.size)
    peak = flops.device_peak_flops(device, cfg.log.peak_tflops)
    rows = []
    for first, end, stage in schedule.segments(cfg.epochs):
        hook.enter(stage, 0)
        micro, accum = progressive.batch_split(stage, cfg, world)
        if batch_cap:
            micro = min(micro, batch_cap)
        row = {"recipe": path, "epochs": [first, end], "res": stage.res, "mask_ratio": stage.mask_ratio,
               "depth": len(model.layer_plan), "mask_views": stage.mask_views, "micro_batch": micro,
               "accum_steps": accum}
        try:
            row.update(bench_stage(model, opt, stage, micro, accum, steps, runs, compile, device))
        except torch.cuda.OutOfMemoryError:  # the stage's micro-batch does not fit: the finding itself
            opt.zero_grad(set_to_none=True)
            row["oom"] = True
        if peak and "variants" in row:
            img_flops = flops.train_flops_per_image(cfg.model.size, cfg.model.patch_size, stage)
            row["mfu"] = {k: m["median"] * img_flops / peak for k, m in row["variants"].items()}
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_stage(model: torch.nn.Module, opt: torch.optim.Optimizer, stage: progressive.Stage, micro: int,
                accum: int, steps: int, runs: int, compile: bool, device: torch.device) -> dict:
    s = StageStep(model, opt, stage, micro, accum, compile, device)
    t = time.perf_counter()
    s.run(2, host_sync=False)  # warm-up; compiled: the stage's compilation
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = measure_interleaved({"async": partial(s.run, steps, False), "sync": partial(s.run, steps, True)}, runs)
    return {"warmup_s": warmup_s, "variants": stats,
            "sync_cost": 1 - stats["sync"]["median"] / stats["async"]["median"],
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def _row(r: dict) -> list:
    head = [r["recipe"].split("/")[-1], f"{r['epochs'][0]}-{r['epochs'][1]}", r["res"], f"{r['mask_ratio']:.3g}",
            r["depth"], f"{r['micro_batch']} x {r['accum_steps']}"]
    if r.get("oom"):
        return head + ["out of memory", "-", "-", "-", "-"]
    return head + [fmt_rate(r["variants"]["async"]), fmt_rate(r["variants"]["sync"]), f"{100 * r['sync_cost']:.1f}%",
                   f"{100 * r['mfu']['async']:.1f}%" if "mfu" in r else "-",
                   f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe_stages", description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=IMAGENET_RECIPES, help="comma-separated pretraining recipes")
    p.add_argument("--world", type=int, default=8, help="GPUs the recipe's global batch is split over")
    p.add_argument("--steps", type=int, help="optimizer steps per timed run (default: 10 on a GPU, 1 on CPU)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch-cap", type=int, help="largest micro-batch to run (default: none on a GPU, 2 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.set_float32_matmul_precision("high")  # as fastssl.run.dist.init sets it on CUDA
    else:
        torch.set_num_threads(1)
    stop.arm()  # the async variant's check is the armed one
    rows = []
    for path in a.recipes.split(","):
        try:
            planned = recipe_runs(path)
        except ConfigError as e:
            fail(f"--recipes {path}: {e}")
        for label, cfg in planned:
            rows += bench_recipe(label, cfg, a.world, a.steps or (10 if gpu else 1), a.runs,
                                 a.batch_cap or (None if gpu else 2), gpu, device)
    print_table(f"recipe stages on {device} (one of {a.world} GPUs' share of each step)",
                ["recipe", "epochs", "res", "mask", "depth", "micro x accum", "img/s", "img/s, sync per step",
                 "sync cost", "MFU", "peak GiB"],
                [_row(r) for r in rows])
    write_results("recipe_stages_gpu" if gpu else "recipe_stages", {"world": a.world, "rows": rows}, quick=not gpu)
    return rows


if __name__ == "__main__":
    main()
