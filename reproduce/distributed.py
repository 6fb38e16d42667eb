"""The one place that reads the launcher's environment and sets up torch.distributed.

Three ways to start the same script:
  python reproduce/train.py ...                      -> one process, no process group
  torchrun --nproc_per_node N reproduce/train.py ... -> RANK / WORLD_SIZE / LOCAL_RANK from torchrun
  srun python reproduce/train.py ...                 -> SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
Nothing else in the suite reads these variables: it receives a `DistInfo`.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reproduce.errors import Failed


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


class JoinFailed(Failed, RuntimeError):
    """The process group could not be formed (rendezvous store, NCCL or gloo): the job's
    environment failed, not its config."""


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
    else:
        reuse_freed_host_memory()
    if world > 1:
        if launcher == "srun":
            _srun_rendezvous_env()
        backend = "nccl" if use_cuda else "gloo"
        try:
            dist.init_process_group(
                backend=backend,
                store=_store(rank, world, timeout_s),
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if use_cuda else None,
            )
        except (RuntimeError, OSError, ValueError, KeyError) as err:  # torch's DistError family is RuntimeError
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
            raise JoinFailed(
                f"rank {rank} of {world} could not join the {backend} process group at {where} "
                f"({type(err).__name__}: {first}); check that every rank was started, that "
                "MASTER_ADDR/MASTER_PORT reach rank 0, and the network"
            ) from err
    info = DistInfo(rank, local_rank, world, dev, launcher, os.environ.get("SLURM_JOB_ID"))
    _quiet_other_ranks(info)
    return info


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HOST_THRESHOLD = 1 << 30


def reuse_freed_host_memory() -> bool:
    """Let glibc's malloc keep and reuse freed blocks of up to 1 GiB. By default it maps every
    block over 32 MiB on its own and unmaps it when freed, so each new one is faulted in and
    zeroed by the kernel again: a float batch of 64 ImageNet crops is 38 MiB, a ResNet's
    activations at 224 px are larger. For a job on the CPU that halved the loader's rate on 2
    cores (results/loaders.md). A process-wide setting, made once, before the run's tensors:
    left alone off glibc and where the user chose (LD_PRELOAD, MALLOC_*_, GLIBC_TUNABLES).
    True when it is in force."""
    chosen = (
        os.environ.get("LD_PRELOAD")
        or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
        or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
    )
    if chosen or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, HOST_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, HOST_THRESHOLD))


def _store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """The job's key-value store, with keys private to this attempt. torchrun hosts one store
    for the whole job and keeps it across `--max-restarts`: without the attempt prefix, the
    restarted processes would find the dead ones' addresses in it and fail to connect."""
    env = os.environ
    agent_hosts_it = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world_size=None if agent_hosts_it else world,
        is_master=rank == 0 and not agent_hosts_it,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"reproduce/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
        os.environ["MASTER_PORT"] = str(
            12000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
        )  # below the ephemeral range


def _quiet_other_ranks(info: DistInfo) -> None:
    """Only rank 0 talks: other ranks log warnings and errors only."""
    logging.basicConfig(format=f"[rank {info.rank}] %(levelname)s %(message)s" if info.distributed else "%(message)s")
    logging.getLogger("reproduce").setLevel(logging.INFO if info.is_main else logging.WARNING)


class Stalled(Failed, RuntimeError):
    """A collective failed or timed out because another rank stopped answering."""


HEARTBEAT = "reproduce/heartbeat/{}"


def heartbeat(info: DistInfo, iteration: int) -> None:
    """Record in the job's key-value store that this rank reached `iteration` (cheap: one
    small message), so that a rank left waiting can name the one that stalled."""
    if info.distributed:
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(
                HEARTBEAT.format(info.rank), f"{iteration} {time.time():.1f} {socket.gethostname()} {os.getpid()}"
            )
        except Exception:  # the heartbeat is diagnostics only; it must never stop training
            pass


def looks_like_lost_peer(err: BaseException) -> bool:
    """A collective that timed out or lost its connection (not a bug in our own code)."""
    text = str(err).lower()
    # gloo words it several ways: "Timed out waiting ...", "Application timeout caused pair closure",
    # "Connection closed by peer"; NCCL names itself.
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        s in text
        for s in (
            "timed out",
            "timeout",
            "connection closed",
            "connection reset",
            "pair closure",
            "broken pipe",
            "nccl",
        )
    )


def describe_stall(info: DistInfo, iteration: int, err: BaseException) -> str:
    """One line naming the ranks that fell behind, from their last heartbeats."""
    seen = {}
    try:
        store = dist.distributed_c10d._get_default_store()
        for rank in range(info.world_size):
            key = HEARTBEAT.format(rank)
            if store.check([key]):
                seen[rank] = store.get(key).decode().split()
    except Exception:
        pass
    now = time.time()
    others = [r for r in range(info.world_size) if r != info.rank]  # this rank is alive: it is the one asking
    if seen and others:
        last = min((int(seen[r][0]) for r in others if r in seen), default=-1)
        behind = [r for r in others if r not in seen or int(seen[r][0]) == last]
        if len(behind) < info.world_size:
            who = ", ".join(
                f"rank {r}"
                + (
                    f" (pid {seen[r][3]} on {seen[r][2]}, last at iteration {seen[r][0]}, "
                    f"{now - float(seen[r][1]):.0f} s ago)"
                    if r in seen
                    else " (never reported)"
                )
                for r in behind
            )
            return f"{who} stopped answering; rank {info.rank} gave up at iteration {iteration}: {str(err).splitlines()[0][:160]}"
    return (
        f"a collective failed at iteration {iteration} on rank {info.rank} (another rank stalled or died): "
        f"{str(err).splitlines()[0][:160]}"
    )


def agree(check, info: DistInfo):
    """Run `check()` on rank 0 only and return its result there (None elsewhere). If it raises,
    every rank raises the same exception (same class, same one-line message), so all ranks
    refuse bad input together instead of some waiting forever in the next collective."""
    result, problem = None, None
    if info.is_main:
        try:
            result = check()
        except Exception as err:  # noqa: BLE001 (re-raised below, on every rank)
            if not info.distributed:
                raise
            problem = err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}")
    if info.distributed:
        problem = broadcast_object(problem, info)  # exceptions pickle with their class and message
    if problem is not None:
        raise problem
    return result


def _picklable(obj) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:  # noqa: BLE001
        return False


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
