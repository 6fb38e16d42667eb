"""The one place that reads the launcher's environment and sets up torch.distributed.

Three ways to start the same script:
  python reproduce/train.py ...                      -> one process, no process group
  torchrun --nproc_per_node N reproduce/train.py ... -> RANK / WORLD_SIZE / LOCAL_RANK from torchrun
  srun python reproduce/train.py ...                 -> SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
Nothing else in the suite reads these variables: it receives a `DistInfo`.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str  # "python", "torchrun" or "srun"
    slurm_job_id: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_env() -> tuple[str, int, int, int]:
    """(launcher, rank, local_rank, world_size) from the environment, without side effects."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return "torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return "srun", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return "python", 0, 0, 1


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Pick the device, join the process group when there is more than one process."""
    launcher, rank, local_rank, world = launch_env()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA GPU is visible; use run.device=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        if launcher == "srun":
            _srun_rendezvous_env()
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    info = DistInfo(rank, local_rank, world, dev, launcher, os.environ.get("SLURM_JOB_ID"))
    _quiet_other_ranks(info)
    return info


def _srun_rendezvous_env() -> None:
    """Under plain srun (no torchrun) the env:// rendezvous needs MASTER_ADDR/PORT: the first
    node of the allocation and a port derived from the job id, unless the user set them."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or socket.gethostname()
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
            os.environ["MASTER_ADDR"] = out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            os.environ["MASTER_ADDR"] = nodes.split(",")[0]
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)


def _quiet_other_ranks(info: DistInfo) -> None:
    """Only rank 0 talks: other ranks log warnings and errors only."""
    logging.basicConfig(format=f"[rank {info.rank}] %(levelname)s %(message)s" if info.distributed else "%(message)s")
    logging.getLogger("reproduce").setLevel(logging.INFO if info.is_main else logging.WARNING)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is true on any rank (e.g. a stop request seen by one process)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
