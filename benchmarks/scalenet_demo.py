"""ScaleNet on the demo data: a pretrained 4-block micro MAE expanded to 8 weight-shared positions and
pretrained further, vs an 8-block micro MAE pretrained from scratch for the same epochs (equal extra
compute: same depth, steps and batch), by linear-probe top-1; the 4-block base is probed too.

    python benchmarks/scalenet_demo.py [--base-epochs N] [--epochs N] [--probe-epochs N] [--seeds 0 1 2] \
        [--out runs/bench_scalenet]

Runs the commands a user types (`python -m fastssl.pretrain`, `python -m fastssl.expand`,
`python -m fastssl.linprobe`) for each seed, prints a table (top-1 mean ± half the range over seeds)
and writes benchmarks/results/scalenet_demo.json after every seed. The probe is the
cached-feature one (4 augmented views; benchmarks/linprobe_cache.py compares it with the live one):
three live probes of the 8-block encoders would take most of an hour on 2 CPU cores. An interrupted
run resumes with the same arguments (every command resumes from its run folder); "train s" is the
span of each pretraining log, so a resumed arm still reports its whole training time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_results  # noqa: E402
from benchmarks.progressive_demo import python  # noqa: E402
from fastssl.demo import make_demo_betons  # noqa: E402
from fastssl.train import checkpoint  # noqa: E402

PRETRAIN, PROBE = "recipes/demo/pretrain_cpu.yaml", "recipes/demo/linprobe_fast_cpu.yaml"
SCALENET = "recipes/demo/scalenet_pretrain_cpu.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--out", default="runs/bench_scalenet")
    p.add_argument("--base-epochs", type=int, default=40, help="the 4-block base (demo recipe: 40)")
    p.add_argument("--epochs", type=int, default=13, help="extra epochs at depth 8, both arms")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default: the recipe's)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({k: v for k, v in vars(args).items() if k != "out"})
    if (out / "args.json").exists() and (out / "args.json").read_text() != settings:
        raise SystemExit(f"error: {out} holds a run with other arguments ({(out / 'args.json').read_text()}); "
                         f"remove it or pass another --out")
    (out / "args.json").write_text(settings)
    train, val = make_demo_betons((ROOT / args.data).resolve())
    common = [f"data.train={train}", f"data.val={val}", "log.wandb=disabled", "log.progress=false",
              "log.recon_every_epochs=0"]
    runs = []
    for seed in args.seeds:
        runs += [{"seed": seed, **r} for r in one_seed(out / f"seed_{seed}", [*common, f"seed={seed}"], args)]
        report(runs)


ARMS = ("base", "scalenet", "scratch")


def one_seed(out: Path, common: list[str], args: argparse.Namespace) -> list[dict]:
    """The three arms for one seed (weights, data order, crops, probe head), each probed."""

    def latest(run: str) -> Path:
        return checkpoint.list_checkpoints(out / run)[-1]

    def train_s(run: str) -> float:
        times = [json.loads(line)["time"] for line in (out / run / "log.jsonl").read_text().splitlines()]
        return times[-1] - times[0]

    def probe(run: str) -> float:
        python("-m", "fastssl.linprobe", PROBE, f"init={latest(run)}", f"run_dir={out / ('probe_' + run)}", *common,
               *([f"epochs={args.probe_epochs}"] if args.probe_epochs else []))
        return json.loads((out / f"probe_{run}" / "results.json").read_text())["val/top1"]

    python("-m", "fastssl.pretrain", PRETRAIN, f"run_dir={out / 'base'}", f"epochs={args.base_epochs}", *common)
    init = out / "base_x2.pth"
    if not init.exists():
        python("-m", "fastssl.expand", str(latest("base")), "--depth", "8", "--map", "interleave",
               "--adapter-rank", str(args.rank), "--adapter-where", "both", "--out", str(init))
    python("-m", "fastssl.pretrain", SCALENET, f"run_dir={out / 'scalenet'}", f"init={init}",
           f"epochs={args.epochs}", *common)
    python("-m", "fastssl.pretrain", PRETRAIN, f"run_dir={out / 'scratch'}", "model.depth=8",
           f"epochs={args.epochs}", "optim.warmup_epochs=1", *common)
    return [{"run": run, "depth": depth, "epochs": epochs, "train_s": train_s(run), "linprobe_top1": probe(run)}
            for run, depth, epochs in zip(ARMS, (4, 8, 8), (args.base_epochs, args.epochs, args.epochs))]


def report(runs: list[dict]) -> None:
    """The table over the seeds run so far, and benchmarks/results/scalenet_demo.json."""
    rows = []
    for run in ARMS:
        mine = [r for r in runs if r["run"] == run]
        top1 = [r["linprobe_top1"] for r in mine]
        rows.append({"run": run, "depth": mine[0]["depth"], "epochs": mine[0]["epochs"],
                     "train_s_mean": statistics.mean(r["train_s"] for r in mine), "linprobe_top1": top1,
                     "linprobe_top1_mean": statistics.mean(top1),
                     "linprobe_top1_half_range": (max(top1) - min(top1)) / 2})
    seeds = sorted({r["seed"] for r in runs})
    print_table(f"ScaleNet on the demo, seeds {seeds}", ["run", "depth", "epochs", "train s", "LP top-1 per seed",
                                                          "LP top-1 mean"],
                [[r["run"], r["depth"], r["epochs"], f"{r['train_s_mean']:.0f}",
                  " ".join(f"{t:.2f}" for t in r["linprobe_top1"]),
                  f"{r['linprobe_top1_mean']:.2f} ±{r['linprobe_top1_half_range']:.2f}"] for r in rows])
    print(f"wrote {write_results('scalenet_demo', {'seeds': seeds, 'probe': PROBE, 'rows': rows, 'runs': runs})}")

if __name__ == "__main__":
    main()
