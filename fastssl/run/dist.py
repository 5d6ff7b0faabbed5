"""Process-group and device set-up from torchrun or Slurm environment variables, rank-0 helpers, autocast."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return default


def init(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID).

    NCCL on GPUs, gloo on CPU. A single process starts no group at all.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # TF32 tensor cores for whatever runs in fp32 (an fp32 recipe, matmuls autocast leaves in fp32);
        # through the API inductor reads (mixing it with the per-backend fp32_precision one is an error)
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def export_submitit_env() -> None:
    """Inside a submitit job (Slurm or local): rank, world size, local rank and the master address and
    port from submitit's helper, exported as the env:// variables `init` reads. CUDA_VISIBLE_DEVICES is
    left alone: `init` picks cuda:LOCAL_RANK among the node's GPUs."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wait_for_all(timeout: timedelta) -> None:
    """A barrier allowed `timeout`, on a gloo group of its own: for a wait longer than the collectives'
    timeout (a node still copying its data) without raising that timeout for training."""
    if dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=timeout)
        dist.monitored_barrier(group, timeout=timeout, wait_all_ranks=True)  # names the ranks missing
        dist.destroy_process_group(group)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable; the argument is ignored elsewhere)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(precision: str, device: torch.device):
    """The mixed-precision context of a run's `precision` (fp32: none) on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
