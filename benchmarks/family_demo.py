"""A model family in one run vs each member trained from scratch, at equal epochs per member, on the
demo data: linear-probe top-1 per member, the agreement of adjacent members' probes (the share of val
images they assign the same class), training FLOPs and wall time.

    python -m benchmarks.family_demo [--epochs 2] [--probe-epochs 30] [--seeds 0 1 2] [--out runs/bench_family] [--quick]

The family is `python -m fastssl.family recipes/demo/pretrain_cpu_family.yaml` (micro -> mini -> midi,
N epochs each); from scratch, mini and midi are `python -m fastssl.pretrain` runs of N epochs at the
same per-size blr. The family's first member is a from-scratch micro run already (same recipe, seed
and blr), so micro's two rows share it. Every member is probed with the cached-view demo probe.
Prints a table (top-1 mean ± half the range over seeds) and writes benchmarks/results/family_demo.json
after every seed, over every seed finished under --out (seeds may run as parallel processes). Wall times are training time from each run's log (first to last line), on a shared
CPU: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import fail, print_table, write_results  # noqa: E402
from fastssl import atomic  # noqa: E402
from fastssl.config import FamilyConfig, load_config  # noqa: E402
from fastssl.demo import make_demo_betons  # noqa: E402
from fastssl.eval import metrics  # noqa: E402
from fastssl.train import family, flops  # noqa: E402

RECIPE = "recipes/demo/pretrain_cpu_family.yaml"
PROBE = "recipes/demo/linprobe_fast_cpu.yaml"  # 4 cached views: as benchmarks/progressive_demo.py


def python(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def train_seconds(run_dir: Path) -> float:
    """First to last line of a run's log: its training, without start-up."""
    times = [json.loads(line)["time"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return times[-1] - times[0]


def probe(init: Path, run_dir: Path, seed: int, data: list[str], epochs: int | None) -> float:
    python("-m", "fastssl.linprobe", PROBE, f"init={init}", f"run_dir={run_dir}", f"seed={seed}", *data,
           "log.wandb=disabled", "log.progress=false", "save_predictions=true",
           *([f"epochs={epochs}"] if epochs else []))
    return json.loads((run_dir / "results.json").read_text())["val/top1"]


def family_config(epochs: int, data: list[str]) -> tuple[FamilyConfig, list[str]]:
    """The demo family at `epochs` per member (the recipe's members have equal epochs)."""
    base = load_config(FamilyConfig, ROOT / RECIPE, data)
    members = ", ".join(f"{{size: {m.size}, epochs: {epochs}" + (f", width: {m.width}}}" if m.width else "}")
                        for m in base.members)
    share = epochs / base.members[-1].epochs  # warmup and mask ramp: the recipe's share of a member
    ramp = max(1, round(base.progressive.growth.mask_steps * share))
    overrides = [*data, f"epochs={epochs * len(base.members)}", f"members=[{members}]",
                 f"optim.warmup_epochs={base.optim.warmup_epochs * share}", f"progressive.growth.mask_steps={ramp}",
                 "log.wandb=disabled", "log.progress=false"]
    return load_config(FamilyConfig, ROOT / RECIPE, overrides), overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--out", default="runs/bench_family")
    p.add_argument("--epochs", type=int, default=2, help="pretraining epochs per member")
    p.add_argument("--probe-epochs", type=int, default=30, help="linear-probe epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="one seed, 1 epoch per member, 5 probe epochs")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.probe_epochs, args.seeds, args.out = 1, 5, [0], args.out + "_quick"
    if args.epochs < 1:
        fail(f"--epochs {args.epochs}: must be >= 1")
    out = (ROOT / args.out).resolve()
    train, val = make_demo_betons((ROOT / args.data).resolve())
    data = [f"data.train={train}", f"data.val={val}"]
    cfg, overrides = family_config(args.epochs, data)
    for seed in args.seeds:
        root, mine = out / f"seed_{seed}", []
        if root.exists():
            fail(f"{root} exists; remove it or pass another --out (a resumed run would not time)")
        python("-m", "fastssl.family", RECIPE, f"run_dir={root / 'family'}", f"seed={seed}", *overrides)
        for k, m in enumerate(cfg.members):
            member = cfg.member(k)
            grown_dir = root / "family" / "members" / m.size
            row = {"seed": seed, "size": m.size, "family_train_s": train_seconds(grown_dir),
                   "family_top1": probe(family.member_checkpoint(root / "family", m.size), root / f"probe_family_{m.size}",
                                        seed, data, args.probe_epochs)}
            if k == 0:  # the family's first member is trained from scratch
                row.update(scratch_train_s=row["family_train_s"], scratch_top1=row["family_top1"])
            else:
                scratch = root / f"scratch_{m.size}"
                python("-m", "fastssl.pretrain", "recipes/demo/pretrain_cpu.yaml", f"run_dir={scratch}",
                       f"seed={seed}", *data, f"model.size={m.size}", f"epochs={args.epochs}",
                       f"optim.blr={member.optim.blr}", f"optim.warmup_epochs={cfg.optim.warmup_epochs}", "log.wandb=disabled", "log.progress=false",
                       "log.recon_every_epochs=0", "checkpoint.every_epochs=0")
                ckpt = sorted((scratch / "checkpoints").glob("ckpt_*.pt"))[-1]
                row.update(scratch_train_s=train_seconds(scratch),
                           scratch_top1=probe(ckpt, root / f"probe_scratch_{m.size}", seed, data, args.probe_epochs))
            if k:  # consistency with the member before: the same val image, the same predicted class
                prev = cfg.members[k - 1].size
                row["family_agree"] = metrics.agreement(root / f"probe_family_{prev}" / "predictions.pt",
                                                        root / f"probe_family_{m.size}" / "predictions.pt")
                before = root / f"probe_{'family' if k == 1 else 'scratch'}_{prev}"  # scratch micro: the family's
                row["scratch_agree"] = metrics.agreement(before / "predictions.pt",
                                                         root / f"probe_scratch_{m.size}" / "predictions.pt")
            mine.append(row)
            print(f"seed {seed} {m.size}: family {row['family_top1']:.2f}% ({row['family_train_s']:.0f} s), "
                  f"scratch {row['scratch_top1']:.2f}% ({row['scratch_train_s']:.0f} s)"
                  + (f"; agreement with {cfg.members[k - 1].size}: family {row['family_agree']:.1f}%, "
                     f"scratch {row['scratch_agree']:.1f}%" if k else ""), flush=True)
        atomic.write_text(root / "runs.json", json.dumps(mine))
        report(cfg, finished(out), args)


def finished(out: Path) -> list[dict]:
    """The rows of every seed finished under `out`, by this process or another (seeds may run in
    parallel processes: `--seeds 1` and `--seeds 2` beside each other, one table)."""
    return [row for f in sorted(out.glob("seed_*/runs.json")) for row in json.loads(f.read_text())]


def _mean_spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ±{(max(values) - min(values)) / 2:.2f}"


def report(cfg: FamilyConfig, runs: list[dict], args: argparse.Namespace) -> None:
    """The table over the seeds run so far, and benchmarks/results/family_demo.json."""
    f = flops.family_flops(cfg, images=1)  # per image of an epoch: the ratios are what matter
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for m, fm in zip(cfg.members, f["members"]):
        mine = [r for r in runs if r["size"] == m.size]
        if not mine:
            continue
        rows.append({"size": m.size, "gflops": fm["flops"] / 1e9, "alone_gflops": fm["alone_own_epochs"] / 1e9,
                     "family_top1": [r["family_top1"] for r in mine], "scratch_top1": [r["scratch_top1"] for r in mine],
                     "family_train_s": statistics.mean(r["family_train_s"] for r in mine),
                     "scratch_train_s": statistics.mean(r["scratch_train_s"] for r in mine),
                     "family_agree": [r["family_agree"] for r in mine if "family_agree" in r],
                     "scratch_agree": [r["scratch_agree"] for r in mine if "scratch_agree" in r]})
    print_table(f"model family vs each member from scratch, {args.epochs} epochs per member, seeds {seeds}",
                ["member", "family top-1", "scratch top-1", "family GFLOPs/img", "scratch GFLOPs/img",
                 "family train s", "scratch train s"],
                [[r["size"], _mean_spread(r["family_top1"]), _mean_spread(r["scratch_top1"]), f"{r['gflops']:.1f}",
                  f"{r['alone_gflops']:.1f}", f"{r['family_train_s']:.0f}", f"{r['scratch_train_s']:.0f}"]
                 for r in rows])
    print_table("consistency: agreement (%) of adjacent members' probes on the val images",
                ["members", "family", "each from scratch"],
                [[f"{a['size']} / {b['size']}", _mean_spread(b["family_agree"]), _mean_spread(b["scratch_agree"])]
                 for a, b in zip(rows, rows[1:]) if b["family_agree"]])
    print(f"total: family {f['total'] / 1e9:.1f} GFLOPs per train image, each member from scratch "
          f"{f['alone_own_epochs'] / 1e9:.1f} ({f['total'] / f['alone_own_epochs']:.2f}x); "
          f"{cfg.members[-1].size} alone for the family's {cfg.epochs} epochs {f['largest_alone'] / 1e9:.1f}")
    payload = {"seeds": seeds, "epochs_per_member": args.epochs, "probe": PROBE, "flops_per_image": f,
               "rows": rows, "runs": runs}
    print(f"wrote {write_results('family_demo', payload, quick=args.quick)}")


if __name__ == "__main__":
    main()
