"""Searched vs manual AutoProg vs fixed-size pretraining on the demo data, at equal epochs: the chosen
depths, training FLOPs, search overhead, pretraining wall time and linear-probe top-1 of each encoder.

    python -m benchmarks.autoprog_search_demo [--seeds 0 1 2] [--epochs 40] [--out runs/bench_autoprog_search] [--quick]

Runs the commands a user types (`python -m fastssl.pretrain recipes/demo/pretrain_cpu{,_autoprog,_search}.yaml`,
then `python -m fastssl.linprobe`) for each seed, prints a table (top-1 mean ± half the range over
seeds) and writes benchmarks/results/autoprog_search_demo.json after every run. Search overhead is the
share of the run's training FLOPs spent in supernet epochs and scoring (`python -m fastssl.flops
--run`), and the share of its wall time from each search's start to its decision (scoring alone
beside it). `--quick`: the searched run of one seed, no probe (its schedule and overhead only).
Wall time is the pretraining process's, start to exit, on whatever CPU this runs on: compare rows of
one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import fail, print_table, write_results  # noqa: E402
from fastssl.config import PretrainConfig, load_config  # noqa: E402
from fastssl.demo import make_demo_betons  # noqa: E402
from fastssl.train import checkpoint, flops, search  # noqa: E402

RECIPES = {"baseline": "recipes/demo/pretrain_cpu.yaml", "autoprog": "recipes/demo/pretrain_cpu_autoprog.yaml",
           "searched": "recipes/demo/pretrain_cpu_search.yaml"}
PROBE = "recipes/demo/linprobe_fast_cpu.yaml"  # the 4-view cached probe, as benchmarks/progressive_demo.py


def python(*args: str) -> float:
    """Run `python ARGS` in the repo; its wall time in seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def scaled(recipe: str, epochs: int | None) -> list[str]:
    """Overrides that run `recipe` for `epochs` with its warm-up and stage starts scaled alike (the
    shared 2-core machine may not afford the recipes' 40 epochs x 3 recipes x 3 seeds)."""
    cfg = load_config(PretrainConfig, ROOT / recipe)
    if epochs is None or epochs == cfg.epochs:
        return []
    f, p = epochs / cfg.epochs, cfg.progressive
    out = [f"epochs={epochs}", f"optim.warmup_epochs={cfg.optim.warmup_epochs * f:g}"]
    if p.stages:
        items = [{**{k: v for k, v in vars(st).items() if v is not None}, "epoch": round(st.epoch * f)}
                 for st in p.stages]
        out.append("progressive.stages=" + json.dumps(items))
    if p.search.stages:
        items = [{"epoch": round(st.epoch * f), "depths": st.depths} for st in p.search.stages]
        out.append("progressive.search.stages=" + json.dumps(items))
    return out


def schedule(name: str, cfg: PretrainConfig, run_dir: Path, wall: float) -> dict:
    """Depths, FLOPs ratio to the fixed-size baseline and search overhead of one finished run."""
    from fastssl.data.subset import read_labels

    # the images an epoch trains on (drop_last): scoring's FLOPs are absolute, not per epoch image
    images = len(read_labels(cfg.data.train)) // cfg.batch_size * cfg.batch_size
    if name != "searched":
        f = flops.recipe_flops(cfg, images=images)
        return {"depths": [s["depth"] for s in f["stages"]], "flops_ratio": f["ratio"],
                "search_flops_share": 0.0, "search_wall_share": 0.0, "scoring_wall_share": 0.0}
    f = search.print_flops(cfg, images, str(run_dir))["run"]
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    made = [r["search/decision"] for r in rows if "search/decision" in r and r["search/decision"]["loss"]]
    return {"depths": [s["depth"] for s in f["stages"]], "flops_ratio": f["ratio"],
            "search_flops_share": (f["supernet"] + f["scoring"]) / f["total"],
            "search_wall_share": sum(d["seconds"] for d in made) / wall,
            "scoring_wall_share": sum(d["scoring_seconds"] for d in made) / wall,
            "decisions": made}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--out", default="runs/bench_autoprog_search")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help="every recipe for this many epochs, stages scaled (default: 40)")
    p.add_argument("--quick", action="store_true", help="the searched run of the first seed, no probe")
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    train, val = make_demo_betons((ROOT / args.data).resolve())
    common = [f"data.train={train}", f"data.val={val}", "log.wandb=disabled", "log.progress=false",
              "log.recon_every_epochs=0"]
    recipes = {"searched": RECIPES["searched"]} if args.quick else RECIPES
    runs = []
    for seed in args.seeds[:1] if args.quick else args.seeds:  # every recipe per seed: noise hits them alike
        for name, recipe in recipes.items():
            run_dir = out / f"seed_{seed}" / name
            if run_dir.exists():
                fail(f"{run_dir} exists; remove it or pass another --out (a resumed run would not time)")
            overrides = [f"run_dir={run_dir}", f"seed={seed}", *common, *scaled(recipe, args.epochs)]
            wall = python("-m", "fastssl.pretrain", recipe, *overrides)
            row = {"run": name, "seed": seed, "pretrain_wall_s": wall,
                   **schedule(name, load_config(PretrainConfig, ROOT / recipe, overrides), run_dir, wall)}
            if not args.quick:
                probe_dir = out / f"seed_{seed}" / f"linprobe_{name}"
                python("-m", "fastssl.linprobe", PROBE, f"init={checkpoint.list_checkpoints(run_dir)[-1]}",
                       f"run_dir={probe_dir}", f"seed={seed}", f"data.train={train}", f"data.val={val}",
                       "log.wandb=disabled", "log.progress=false")
                row["linprobe_top1"] = json.loads((probe_dir / "results.json").read_text())["val/top1"]
            runs.append(row)
            print(f"seed {seed} {name}: depths {row['depths']}, pretrain {wall:.1f} s"
                  + (f", linear-probe top-1 {row['linprobe_top1']:.2f}%" if "linprobe_top1" in row else ""), flush=True)
            report(runs, {n: r for n, r in recipes.items() if any(x["run"] == n for x in runs)}, args.epochs)


def report(runs: list[dict], recipes: dict[str, str], epochs: int | None) -> None:
    """The table over the seeds run so far, and benchmarks/results/autoprog_search_demo.json."""
    rows = {}
    for name, recipe in recipes.items():
        mine = [r for r in runs if r["run"] == name]
        top1 = [r["linprobe_top1"] for r in mine if "linprobe_top1" in r]
        schedules = sorted({"-".join(map(str, r["depths"])) for r in mine})
        rows[name] = {"recipe": recipe, "epochs": epochs or 40, "depths": schedules,
                      "flops_ratio": statistics.mean(r["flops_ratio"] for r in mine),
                      "search_flops_share": statistics.mean(r["search_flops_share"] for r in mine),
                      "search_wall_share": statistics.mean(r["search_wall_share"] for r in mine),
                      "scoring_wall_share": statistics.mean(r["scoring_wall_share"] for r in mine),
                      "pretrain_wall_s_mean": statistics.mean(r["pretrain_wall_s"] for r in mine),
                      "linprobe_top1": top1,
                      "linprobe_top1_mean": statistics.mean(top1) if top1 else None,
                      "linprobe_top1_half_range": (max(top1) - min(top1)) / 2 if top1 else None}
    seeds = sorted({r["seed"] for r in runs})
    print_table(f"searched vs manual AutoProg vs fixed-size pretraining on the demo, {epochs or 40} epochs, "
                f"seeds {seeds}",
                ["run", "recipe", "depths (per stage)", "FLOPs ratio", "search FLOPs", "search wall (scoring)",
                 "pretrain wall s", "LP top-1 per seed", "LP top-1 mean"],
                [[name, f"`{r['recipe'].removeprefix('recipes/')}`", ", ".join(r["depths"]),
                  f"{r['flops_ratio']:.2f}x",
                  f"{r['search_flops_share']:.1%}", f"{r['search_wall_share']:.1%} ({r['scoring_wall_share']:.1%})",
                  f"{r['pretrain_wall_s_mean']:.1f}", " ".join(f"{t:.2f}" for t in r["linprobe_top1"]) or "-",
                  f"{r['linprobe_top1_mean']:.2f} ±{r['linprobe_top1_half_range']:.2f}" if r["linprobe_top1"] else "-"]
                 for name, r in rows.items()])
    results = {"seeds": seeds, "epochs": epochs or 40, "probe": PROBE, "rows": rows, "runs": runs}
    print(f"wrote {write_results('autoprog_search_demo', results)}")


if __name__ == "__main__":
    main()
