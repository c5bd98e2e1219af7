"""torch.distributed set-up from torchrun's environment.

The same command runs alone (`finetune train ...`) or under `torchrun`; torchrun sets
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and we initialise the process group
from those (env://): NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import FinetuneError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(requested: str, local_rank: int) -> torch.device:
    """`auto` picks this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if requested == "cuda":
        raise FinetuneError("--device cuda was requested but no CUDA GPU is visible; "
                            "use --device cpu or run on a GPU node")
    return torch.device("cpu")


CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def _cgroup_cpu_quota(cpu_max: Path, v1_dir: Path) -> float | None:
    """CPUs the container's CPU limit allows (quota / period), or None without a limit."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((v1_dir / "cpu.cfs_quota_us").read_text())
        period_us = int((v1_dir / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(cpu_max: Path = CGROUP_V2_CPU_MAX, v1_dir: Path = CGROUP_V1_CPU) -> int:
    """CPUs this process can use: its CPU affinity, capped by the container's CPU limit.

    Kubernetes enforces a pod's CPU limit as a CFS quota, not an affinity, so on a 64-core
    node a pod limited to 2 CPUs still "sees" 64; running 64 threads there only throttles.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cpu_max, v1_dir)
    if quota is not None:
        cpus = min(cpus, int(quota))  # a fraction of a CPU more is not worth another thread
    return max(1, cpus)


def cpus_per_process() -> int:
    """This process's share of the usable CPUs (torchrun's processes on a node share them)."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def set_cpu_threads(device: torch.device) -> int | None:
    """On CPU, one compute thread per CPU of this process's share, unless OMP_NUM_THREADS
    says otherwise (torchrun sets it to 1 for several processes per node). Returns the
    count set, or None."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = cpus_per_process()
    torch.set_num_threads(threads)
    return threads


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group when launched by torchrun; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device, local_rank)
    backend = None
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Send rank `src`'s Python object to every rank (e.g. a decision only rank 0 can make)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
