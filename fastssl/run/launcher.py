"""Submit entry points to Slurm through submitit: `python slurm/submit.py ENTRY RECIPE [options] [key=value ...]`.

One task per GPU (rank, world and master address come from submitit's helper in `fastssl.run.job`),
USR2 before the time limit or on preemption -> checkpoint and requeue, `--array KEY=V1,V2,...` for a
sweep, `--then ENTRY RECIPE [key=value ...]` for a job that starts when the previous one succeeded
(afterok), `--dry-run` to print what would be submitted, `--local` to run on this machine instead.
Everything is checked before anything is submitted; a mistake is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from fastssl.config import ConfigError, load_config, to_dict
from fastssl.run.job import ENTRIES, Job, config_class, entry_module
from fastssl.train.logger import wandb_mode

REPO = Path(__file__).resolve().parents[2]  # the checkout this file (fastssl/run/launcher.py) is in
THEN = "--then"


@dataclass
class Planned:
    """One job to submit (one task of an array is one Planned too)."""

    entry: str
    recipe: str
    overrides: list[str]
    cfg: object

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python slurm/submit.py", description=__doc__.splitlines()[0],
        epilog=f"{THEN} ENTRY RECIPE [key=value ...] may follow, more than once: each starts after the previous "
               "succeeded; a chained entry with an `init` key and no init= override gets the previous run folder.")
    p.add_argument("entry", help=f"one of {', '.join(ENTRIES)}")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=100 optim.blr=1e-4")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU (default 8); 0 for CPU")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="CPU processes per node when --gpus-per-node 0 (default 1)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="default 10 with GPUs, else Slurm's")
    g.add_argument("--mem", default=None, help="per node, e.g. 400G (Slurm syntax)")
    g.add_argument("--partition")
    g.add_argument("--time", default="24:00:00", help="minutes, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclude")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which USR2 asks the job to checkpoint (default 120)")
    j = p.add_argument_group("job")
    j.add_argument("--job-dir", default="runs/slurm", help="submitit's folder: scripts, pickles, logs")
    j.add_argument("--name", help="Slurm job name (default: the run folder's name)")
    j.add_argument("--array", metavar="KEY=V1,V2,...", help="a job array sweeping KEY; run folders get a suffix")
    j.add_argument("--stage", action="store_true", help="copy the .beton files to $TMPDIR on each node first")
    j.add_argument("--stage-dir", help="node-local folder to copy the .beton files to (implies --stage)")
    j.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and configs, submit nothing")
    j.add_argument("--local", action="store_true", help="run here with submitit's local executor")
    return p


def parse_time(text: str) -> int:
    """Slurm's time formats -> whole minutes (at least 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is None:  # M, M:S, H:M:S
        h, mnt, s = (0, a, b or 0) if c is None else (a, b, c)
    else:  # D-H, D-H:M, D-H:M:S
        h, mnt, s = a, b or 0, c or 0
    return max(1, (days or 0) * 1440 + h * 60 + mnt + (1 if s else 0))


def plan(entry: str, recipe: str, overrides: list[str], world: int, array: str | None = None) -> list[Planned]:
    """Validated configs with absolute run folders; one per array value."""
    cls = config_class(entry_module(entry))
    base = load_config(cls, recipe, overrides)
    base_dir = Path(base.run_dir).resolve()
    variants = [[f"run_dir={base_dir}"]]
    if array is not None:
        key, sep, values = array.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not key or not vals:
            raise ConfigError(f"--array {array!r}: expected KEY=V1,V2,..., e.g. optim.blr=1e-4,2e-4")
        leaf = key.rsplit(".", 1)[-1]
        variants = [[f"{key}={v}", f"run_dir={base_dir}_{leaf}{_slug(v)}"] for v in vals]
    out = []
    for extra in variants:
        cfg = load_config(cls, recipe, [*overrides, *extra])
        cfg.validate_world(world)
        out.append(Planned(entry, recipe, [*overrides, *extra], cfg))
    return out


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", value)


def split_chain(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """`A ... --then B ... --then C ...` -> (A's argv, [B's, C's])."""
    cuts = [i for i, a in enumerate(argv) if a == THEN]
    bounds = [*cuts, len(argv)]
    chained = [argv[a + 1:b] for a, b in zip(bounds, bounds[1:])]
    for c in chained:
        if len(c) < 2 or c[0].startswith("-") or c[1].startswith("-"):
            raise ConfigError(f"{THEN} {' '.join(c)!r}: expected {THEN} ENTRY RECIPE [key=value ...]")
    return argv[:cuts[0]] if cuts else argv, chained


def tasks_per_node(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: must be >= 1")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node {args.gpus_per_node}: must be >= 0")
    if args.tasks_per_node is not None:
        if args.gpus_per_node:
            raise ConfigError(f"--tasks-per-node {args.tasks_per_node}: GPU jobs run one task per GPU; "
                              "use it with --gpus-per-node 0")
        if args.tasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node {args.tasks_per_node}: must be >= 1")
        return args.tasks_per_node
    return args.gpus_per_node or 1


def slurm_parameters(args: argparse.Namespace, name: str, minutes: int, ntasks: int) -> dict:
    """submitit SlurmExecutor parameters (Slurm's own names)."""
    if args.mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", args.mem, re.IGNORECASE):
        raise ConfigError(f"--mem {args.mem!r}: expected a size like 400G or 64000M")
    params = dict(
        job_name=args.name or name, nodes=args.nodes, ntasks_per_node=ntasks, time=minutes,
        signal_delay_s=args.signal_delay,
        # a task that dies takes the others down instead of leaving them blocked in a collective
        srun_args=["--kill-on-bad-exit=1"],
        # the job imports this checkout's fastssl, whatever is installed on the nodes
        setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        additional_parameters={"requeue": True},
    )
    cpus = args.cpus_per_task or (10 if args.gpus_per_node else None)
    optional = dict(gpus_per_node=args.gpus_per_node or None, cpus_per_task=cpus, mem=args.mem,
                    partition=args.partition, account=args.account, qos=args.qos,
                    constraint=args.constraint, exclude=args.exclude)
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def job_folder(args: argparse.Namespace) -> Path:
    return Path(args.job_dir).resolve() / "%j"


def describe(p: Planned) -> str:
    log = p.cfg.log
    return (f"  run folder: {p.run_dir}\n"
            f"  wandb run:  {p.run_dir.name} (project {log.project}, {wandb_mode(log.wandb)})")


def dry_run(args: argparse.Namespace, jobs: list[list[Planned]], params: dict) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(args)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    for i, group in enumerate(jobs):
        extra = {"map_count": len(group)} if len(group) > 1 else {}
        if i:
            extra["dependency"] = f"afterok:<job {i}>"
        name = params["job_name"] if args.name else group[0].run_dir.name
        script = _make_sbatch_string(command=command, folder=folder, **{**params, "job_name": name, **extra})
        print(f"# ---- job {i + 1}: {group[0].entry} {group[0].recipe} " + "-" * 40)
        print(script)
        for p in group:
            print(f"# resolved config of {p.run_dir}")
            print(yaml.safe_dump(to_dict(p.cfg), sort_keys=False).rstrip())
    print("# dry run: nothing submitted")


@contextlib.contextmanager
def sbatch_errors(folder: Path):
    """Slurm's own message as one line (submitit prints sbatch's stderr; keep it for the error)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except Exception as e:
        from submitit.core.utils import FailedJobError

        if not isinstance(e, FailedJobError):
            raise
        for leftover in folder.parent.glob(".submission_file_*.sh"):
            leftover.unlink()
        lines = [ln for ln in (str(e) or captured.getvalue()).splitlines() if ln.strip()]
        raise ConfigError(lines[-1].strip() if lines else "sbatch failed") from None


def submit(args: argparse.Namespace, jobs: list[list[Planned]], params: dict) -> None:
    import submitit

    folder = job_folder(args)
    stage_dir = args.stage_dir or ("$TMPDIR" if args.stage else None)
    previous = None
    for group in jobs:
        if args.local:
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=params["time"], nodes=1, tasks_per_node=params["ntasks_per_node"],
                                 gpus_per_node=params.get("gpus_per_node", 0))
        else:
            ex = submitit.SlurmExecutor(folder=folder)
            name = params["job_name"] if args.name else group[0].run_dir.name
            ex.update_parameters(**{**params, "job_name": name})
            if previous is not None:
                ex.update_parameters(dependency=f"afterok:{previous}")
        with sbatch_errors(folder):
            with ex.batch() if len(group) > 1 else contextlib.nullcontext():
                submitted = [ex.submit(Job(p.entry, p.recipe, p.overrides, stage_dir)) for p in group]
        for job, p in zip(submitted, group):
            print(f"submitted {p.entry}: job {job.job_id}")
            print(f"  stdout:     {job.paths.stdout}")
            print(f"  stderr:     {job.paths.stderr}")
            print(describe(p), flush=True)
        previous = str(submitted[0].job_id).split("_")[0]  # an array: afterok on all its tasks
        if args.local:  # no scheduler to hold a chained job back: wait here
            for job in submitted:
                job.result()


def chain_overrides(prev: Planned, entry: str, overrides: list[str]) -> list[str]:
    """A chained evaluation starts from the previous run unless told otherwise."""
    has_init = "init" in {f.name for f in fields(config_class(entry_module(entry)))}
    if has_init and not any(o.startswith("init=") for o in overrides):
        return [*overrides, f"init={prev.run_dir}"]
    return overrides


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        first, chained = split_chain(argv)
        args = build_parser().parse_intermixed_args(first)
        ntasks = tasks_per_node(args)
        world = args.nodes * ntasks
        minutes = parse_time(args.time)
        if args.local:
            _check_local(args)
        jobs = [plan(args.entry, args.recipe, args.overrides, world, args.array)]
        for entry, recipe, *overrides in chained:
            if len(jobs[-1]) == 1:
                overrides = chain_overrides(jobs[-1][0], entry, overrides)
            jobs.append(plan(entry, recipe, overrides, world))
        params = slurm_parameters(args, jobs[0][0].run_dir.name, minutes, ntasks)
        if args.dry_run:
            dry_run(args, jobs, params)
            return
        if not args.local and shutil.which("sbatch") is None:
            raise ConfigError("sbatch not found: no Slurm on this machine (use --local or --dry-run)")
        submit(args, jobs, params)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _check_local(args: argparse.Namespace) -> None:
    if args.nodes != 1:
        raise ConfigError(f"--nodes {args.nodes}: --local runs on this machine, one node")
    if args.gpus_per_node:
        import torch

        have = torch.cuda.device_count()
        if have < args.gpus_per_node:
            raise ConfigError(f"--gpus-per-node {args.gpus_per_node}: this machine has {have} GPU(s); "
                              "use --gpus-per-node 0 for CPU processes")
