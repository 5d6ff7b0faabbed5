"""Apollo vs plain stacking vs the fixed-size baseline on the CPU demo, at equal epochs: training
FLOPs, pretraining wall time, executed encoder depth and linear-probe top-1 over seeds.

    python -m benchmarks.apollo_demo [--quick] [--epochs E] [--seeds N]

Three runs of the commands a user types, per seed (interleaved, so machine noise hits them alike):
- baseline: `python -m fastssl.pretrain recipes/demo/pretrain_cpu.yaml` (4 blocks throughout);
- stacking: `recipes/demo/pretrain_cpu_apollo.yaml progressive.elastic_depth=null
  progressive.growth.op=stack`: the same physical stages 1 -> 2 -> 4 blocks, each growth copying
  the stack on top, every step at the stage's depth;
- apollo: `recipes/demo/pretrain_cpu_apollo.yaml`: those stages with LVPS elastic depth up to 4
  (shared blocks) and interpolation growth;
each compressed to E epochs (stage starts and warmup scaled), then the demo linear probe on cached
features (`recipes/demo/linprobe_fast_cpu.yaml`) of its last checkpoint. FLOPs ratios are
`fastssl.flops`' (Apollo's: the expectation over its depth draws); the executed mean depth is read from
the run's log. On a shared CPU, times are indicative; FLOPs are exact.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fastssl.config import PretrainConfig, load_config
from fastssl.train import checkpoint, flops

from .common import fail, print_table, write_results
from .mask_views_demo import probe, spread
from .recipe_compute import QUICK_PER_CLASS, QUIET, compressed, demo_data, seeded_demo_parser, time_pretrain

ROOT = Path(__file__).resolve().parents[1]
APOLLO = "recipes/demo/pretrain_cpu_apollo.yaml"
RUNS = {  # name -> (recipe, overrides)
    "baseline": ("recipes/demo/pretrain_cpu.yaml", []),
    "stacking": (APOLLO, ["progressive.elastic_depth=null", "progressive.growth.op=stack"]),
    "apollo": (APOLLO, []),
}


def executed_depths(run_dir: Path) -> list[int]:
    """The encoder depth of every logged step (elastic runs log them; others run their stage's)."""
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    if any("depths" in r for r in lines):
        return [d for r in lines for d in r.get("depths", [])]
    depth, steps, out = None, 0, []
    for r in lines:  # stage lines carry the depth; loss lines end at their step
        if "stage/depth" in r:
            depth = r["stage/depth"]
        if "train/loss" in r:
            out += [depth] * (r["step"] - steps)
            steps = r["step"]
    return out


def main(argv: list[str] | None = None) -> dict:
    a = seeded_demo_parser("apollo_demo", __doc__, "1 seed, 6 epochs",
                           "pretraining epochs of every run (default: the recipes' 40; quick 6)").parse_args(argv)
    epochs, seeds = a.epochs or (6 if a.quick else 40), a.seeds or (1 if a.quick else 3)
    if epochs < 3 or seeds < 1:
        fail(f"--epochs {epochs} / --seeds {seeds}: epochs must be >= 3 (three stages), seeds >= 1")
    per_class = QUICK_PER_CLASS if a.quick else None
    data = demo_data(per_class)
    common = [*data, *QUIET]
    plans, cfgs = {}, {}
    for name, (recipe, extra) in RUNS.items():  # all checked before anything runs
        plans[name] = [*extra, *compressed(load_config(PretrainConfig, ROOT / recipe, extra), epochs), *common]
        cfgs[name] = load_config(PretrainConfig, ROOT / recipe, plans[name])

    (ROOT / "runs").mkdir(exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="bench_apollo.", dir=ROOT / "runs") as tmp:
        for seed in range(seeds):
            for name, (recipe, _) in RUNS.items():
                run_dir = Path(tmp) / f"{name}_s{seed}"
                r = time_pretrain(recipe, [*plans[name], f"seed={seed}"], run_dir)
                depths = executed_depths(run_dir)
                r["mean_depth"] = sum(depths) / len(depths)
                r["top1"] = probe(str(checkpoint.list_checkpoints(run_dir)[-1]), Path(tmp) / f"probe_{run_dir.name}",
                                  data, seed)
                runs[name].append(r)
                print(f"seed {seed} {name}: {r}", flush=True)
            payload = report(runs, cfgs, epochs, per_class, a.quick)  # after every seed: a cut run keeps its table
    return payload


def report(runs: dict[str, list[dict]], cfgs: dict[str, PretrainConfig], epochs: int, per_class: int | None,
           quick: bool) -> dict:
    """The table over the seeds run so far, and benchmarks/results/apollo_demo.json."""
    rows = {}
    for name, (recipe, extra) in RUNS.items():
        m, f = runs[name], flops.recipe_flops(cfgs[name], images=1)
        rows[name] = {"recipe": recipe, "overrides": extra, "epochs": epochs, "flops_ratio": f["ratio"],
                      "stages": f["stages"], "wall_s": spread([x["wall_s"] for x in m]),
                      "mean_depth": spread([x["mean_depth"] for x in m]),
                      "top1": spread([x["top1"] for x in m]), "per_seed": m}
    seeds = len(runs["baseline"])
    base = rows["baseline"]["wall_s"]["mean"]
    table = print_table(
        f"Apollo vs stacking vs baseline on the CPU demo ({epochs} epochs each, {seeds} seed(s): mean ± half-range; "
        f"linear probe on cached features). Shared CPU: times indicative",
        ["run", "FLOPs ratio", "mean executed depth", "wall s", "speed-up", "probe top-1 per seed", "probe top-1 %"],
        [[name, f"{r['flops_ratio']:.2f}x", f"{r['mean_depth']['mean']:.2f}",
          f"{r['wall_s']['mean']:.1f} ± {r['wall_s']['half_range']:.1f}", f"{base / r['wall_s']['mean']:.2f}x",
          " ".join(f"{x['top1']:.2f}" for x in r["per_seed"]),
          f"{r['top1']['mean']:.2f} ± {r['top1']['half_range']:.2f}"] for name, r in rows.items()])
    payload = {"epochs": epochs, "seeds": seeds, "per_class": per_class, "rows": rows, "table": table}
    write_results("apollo_demo", payload, {f"{name}: probe top-1 %": r["top1"]["mean"] for name, r in rows.items()},
                  quick=quick)
    return payload

if __name__ == "__main__":
    main()
