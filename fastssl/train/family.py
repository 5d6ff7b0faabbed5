"""A model family in one run (Yano et al. 2025, "Efficient Construction of Model Family through
Progressive Training Using Model Expansion"): the smallest member trains, is grown in width and depth
to the next size, trains on, and so on; every member ends as a checkpoint of its own.

Member k is an ordinary pretraining run in `run_dir/members/<size>/` (its own warmup and cosine at
its own max LR: `FamilyConfig.member_blr`). It starts from member k - 1's final training state (the
weights, AdamW moments, layer plan), handed over as its step-0 checkpoint, and its one stage grows
that model to size k (`depth_growth.DepthGrowth`: width by `width.widen`, optimizer state mapped,
depth by the recipe's growth op). So a family resumes anywhere, mid-member or just after a growth,
the way any run does: finished members (their `checkpoint.pth` written) are skipped, the member in
progress resumes from its newest checkpoint.

`members/<size>/checkpoint.pth` is the member's final weights with the progressive state and config
the evaluation entry points read (`fastssl.linprobe`, `knn`, `finetune`, `export` take it as `init=`
or CKPT); the optimizer stays in the member's checkpoints/ folder.
"""
from __future__ import annotations

from pathlib import Path

from fastssl import atomic
from fastssl.config import FamilyConfig, PretrainConfig
from fastssl.errors import ConfigError
from fastssl.models import width
from fastssl.models.sizes import get_size
from fastssl.run import cli, dist
from fastssl.train import checkpoint, pretrain, stop


def member_checkpoint(run_dir: str | Path, size: str) -> Path:
    return Path(run_dir) / "members" / size / "checkpoint.pth"


def finished(path: Path) -> bool:
    """A member's checkpoint.pth is written atomically when it is done: there and intact."""
    return path.is_file() and atomic.verify_archive(path) is None


def is_family(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "members").is_dir()


def largest_member(run_dir: str | Path) -> Path | None:
    """The checkpoint of a family run's largest finished member (the last one, once the family is
    done: each member is wider than the one before), or None."""
    done = [p for p in Path(run_dir).glob("members/*/checkpoint.pth") if finished(p)]
    return max(done, key=lambda p: (get_size(p.parent.name).embed_dim, get_size(p.parent.name).depth), default=None)


def hand_over(previous: PretrainConfig, member: PretrainConfig) -> None:
    """Member k's step-0 checkpoint: member k - 1's final training state with the step count, the
    epoch and the ramps of its own growth reset (they count member k - 1's steps)."""
    state = checkpoint.load_latest(previous.run_dir)
    if state is None or state["progress"]["epoch"] != previous.epochs:
        raise ConfigError(f"members: {previous.run_dir} holds no finished run to grow the next member from")
    del state["path"]
    state["progress"] = {"epoch": 0, "micro": 0, "micro_batch": 0, "step": 0}
    state["progressive"].update(gate_start={}, grown_at=-1, widened_at=-1)
    checkpoint.save(state, member.run_dir, step=0, keep_last=member.checkpoint.keep_last)


def write_member(member: PretrainConfig, size: str, path: Path) -> None:
    """The member's final weights, refused while its growth is still ramping in (the next member,
    and the plain ViT its evaluations build, would not compute what it computed)."""
    state = checkpoint.load_latest(member.run_dir)
    prog, step, growth = state["progressive"], state["progress"]["step"], member.progressive.growth
    if width.ramping(state["model"]) is not None:
        raise ConfigError(f"progressive.growth.mask_steps={growth.mask_steps}: member {size} ended after {step} "
                          f"steps with the new channels' masks still opening; lower mask_steps")
    if any(step - int(start) < growth.gate_steps for start in prog["gate_start"].values()):
        raise ConfigError(f"progressive.growth.gate_steps={growth.gate_steps}: member {size} ended after {step} "
                          f"steps with new blocks' gates still opening; lower gate_steps")
    out = {"model": state["model"], "progress": state["progress"], "config": state["config"],
           "progressive": {**prog, "ema": None}}
    checkpoint.atomic_torch_save(out, path)


def run(cfg: FamilyConfig) -> list[Path]:
    """Train the members in order; returns their checkpoint paths."""
    info = dist.init(cfg.device)
    paths = []
    for k, m in enumerate(cfg.members):
        member, path = cfg.member(k), member_checkpoint(cfg.run_dir, m.size)
        paths.append(path)
        if dist.broadcast_object(info.is_main and finished(path)):  # rank 0's view: one file system may lag
            continue  # finished before a restart
        if k and info.is_main and not checkpoint.list_checkpoints(member.run_dir):
            hand_over(cfg.member(k - 1), member)
        dist.barrier()
        if info.is_main:
            print(f"member {k + 1}/{len(cfg.members)}: {m.size}, {m.epochs} epochs at blr {member.optim.blr:.3g}"
                  + (f", grown from {cfg.members[k - 1].size}" if k else ""), flush=True)
        pretrain.run(member)  # a stop mid-member raises StopRequested after its checkpoint
        if stop.requested_anywhere():  # asked after the member's last poll: leave before the next starts
            raise stop.StopRequested(f"stopped on a signal after member {m.size}'s last step; its checkpoint saved "
                                     f"(a restart writes {path} and goes on)")
        if info.is_main:
            write_member(member, m.size, path)
            print(f"wrote {path}", flush=True)
        dist.barrier()
    return paths


def main(argv: list[str] | None = None) -> None:
    cli.main(FamilyConfig, run, "python -m fastssl.family", __doc__.splitlines()[0], argv)
