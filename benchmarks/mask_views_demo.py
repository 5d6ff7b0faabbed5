"""Disjoint masked views on the CPU demo at equal training FLOPs: K = 1, 2, 4 views of each image in
E, E/2, E/4 epochs; images decoded, wall time, linear-probe top-1 over seeds, and the loader rate
each setting needs.

    python -m benchmarks.mask_views_demo [--quick] [--epochs E] [--seeds N]

Each run is the command a user types: `python -m fastssl.pretrain recipes/demo/pretrain_cpu.yaml
mask_views=K` compressed to E/K epochs (warmup scaled with them, as `recipe_compute` compresses a
recipe; at E = 40, K = 2 is `recipes/demo/pretrain_cpu_2views.yaml`), then the demo linear probe on
cached features (`recipes/demo/linprobe_fast_cpu.yaml`) of its last checkpoint, and one probe of a
random encoder for reference. Seeds run in turn, the three settings interleaved within each seed.
The loader rate a setting needs is the images per second its training steps consumed with the time
blocked on the loader taken out (the log's img_per_s / (1 - data_wait), median over its log lines):
what a loader must sustain not to slow that step rate. On a shared CPU times are indicative; FLOPs
are exact.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from fastssl.config import PretrainConfig, load_config
from fastssl.train import checkpoint, flops

from .common import fail, print_table, summarize, write_results
from .progressive_demo import python
from .recipe_compute import QUICK_PER_CLASS, QUIET, compressed, demo_data, seeded_demo_parser, time_pretrain

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo/pretrain_cpu.yaml"
PROBE = "recipes/demo/linprobe_fast_cpu.yaml"
VIEWS = (1, 2, 4)  # 4 = 1 / (1 - 0.75): the views of an image see each of its tokens once


def probe(init: str, run_dir: Path, data: list[str], seed: int) -> float:
    python("-m", "fastssl.linprobe", PROBE, f"init={init}", f"run_dir={run_dir}", f"seed={seed}", *data,
           "log.wandb=disabled", "log.progress=false")
    return json.loads((run_dir / "results.json").read_text())["val/top1"]


def loader_rate_needed(run_dir: Path) -> float:
    """Images/s the run's steps consumed while not waiting for the loader (median over log windows)."""
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["img_per_s"] / max(1 - r["data_wait"], 1e-9) for r in lines if "img_per_s" in r)


def spread(values: list[float]) -> dict:
    """Mean and half the range (with median/min/max) of per-seed values."""
    return {**summarize(values), "mean": statistics.fmean(values), "half_range": (max(values) - min(values)) / 2}


def main(argv: list[str] | None = None) -> dict:
    a = seeded_demo_parser("mask_views_demo", __doc__, "1 seed, 4 epochs",
                           "epochs of the one-view run, a multiple of 4 (default 16; quick 4)").parse_args(argv)
    epochs, seeds = a.epochs or (4 if a.quick else 16), a.seeds or (1 if a.quick else 3)
    if epochs < 4 or epochs % 4 or seeds < 1:
        fail(f"--epochs {epochs} / --seeds {seeds}: epochs must be a positive multiple of 4, seeds >= 1")
    per_class = QUICK_PER_CLASS if a.quick else None
    data = demo_data(per_class)
    common = [*data, *QUIET]
    base = load_config(PretrainConfig, ROOT / RECIPE)
    plans = {k: [f"mask_views={k}", *compressed(base, epochs // k), *common] for k in VIEWS}
    cfgs = {k: load_config(PretrainConfig, ROOT / RECIPE, o) for k, o in plans.items()}  # all checked first

    (ROOT / "runs").mkdir(exist_ok=True)
    runs: dict[int, list[dict]] = {k: [] for k in VIEWS}
    with tempfile.TemporaryDirectory(prefix="bench_mask_views.", dir=ROOT / "runs") as tmp:
        for seed in range(seeds):
            for k in VIEWS:
                run_dir = Path(tmp) / f"k{k}_s{seed}"
                r = time_pretrain(RECIPE, [*plans[k], f"seed={seed}"], run_dir)
                r["loader_img_per_s"] = loader_rate_needed(run_dir)
                r["top1"] = probe(str(checkpoint.list_checkpoints(run_dir)[-1]), Path(tmp) / f"probe_{run_dir.name}",
                                  data, seed)
                runs[k].append(r)
                print(f"seed {seed} K={k}: {r}", flush=True)
        random_top1 = probe("random", Path(tmp) / "probe_random", data, 0)

    rows = {}
    for k in VIEWS:
        cfg, m = cfgs[k], runs[k]
        steps = m[0]["steps"]
        images = steps * cfg.batch_size  # decoded over the run (drop_last batches)
        f = flops.recipe_flops(cfg, images // cfg.epochs)
        loader = [x["loader_img_per_s"] for x in m]
        rows[k] = {"views": k, "epochs": cfg.epochs, "steps": steps, "images_decoded": images,
                   "views_trained": images * k,
                   "flops": f["total"], "wall_s": spread([x["wall_s"] for x in m]),
                   "loop_s": spread([x["loop_s"] for x in m]), "loader_img_per_s": spread(loader),
                   "top1": spread([x["top1"] for x in m]), "per_seed": m}
    one = rows[1]
    table = print_table(
        f"Disjoint masked views on the CPU demo at equal training FLOPs ({RECIPE}, {epochs} epochs at K = 1, "
        f"{seeds} seed(s): mean ± half-range; linear probe on cached features; random encoder "
        f"{random_top1:.2f}%). Shared CPU: times indicative",
        ["K", "epochs", "steps", "images decoded", "FLOPs ratio", "wall s", "loop s", "loader img/s needed",
         "probe top-1 %"],
        [[str(k), str(r["epochs"]), str(r["steps"]), str(r["images_decoded"]), f"{r['flops'] / one['flops']:.2f}x",
          f"{r['wall_s']['mean']:.1f} ± {r['wall_s']['half_range']:.1f}",
          f"{r['loop_s']['mean']:.1f} ± {r['loop_s']['half_range']:.1f}",
          f"{r['loader_img_per_s']['mean']:.0f} ± {r['loader_img_per_s']['half_range']:.0f}",
          f"{r['top1']['mean']:.2f} ± {r['top1']['half_range']:.2f}"] for k, r in rows.items()])
    payload = {"recipe": RECIPE, "probe": PROBE, "epochs_one_view": epochs, "seeds": seeds, "per_class": per_class,
               "random_encoder_top1": random_top1, "rows": {str(k): r for k, r in rows.items()}, "table": table}
    write_results("mask_views_demo", payload, {f"K={k}: probe top-1 %": r["top1"]["mean"] for k, r in rows.items()},
                  quick=a.quick)
    return payload


if __name__ == "__main__":
    main()
