"""All-reduce bus bandwidth among fresh processes (`reproduce doctor`'s NCCL check), and the
small child-process protocol the doctor's probes share: run one function of a module in a
process of its own session, read its one JSON line, stop it and its helpers together."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time


def allreduce_bandwidth(backend: str, world: int, nbytes: int, timeout: float = 120.0) -> float:
    """Bus bandwidth (GB/s, nccl-tests' convention: bytes x 2(n-1)/n / time) of a float32
    all-reduce of `nbytes` among `world` fresh processes (one GPU each for nccl)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        child("reproduce.bench.allreduce", "allreduce_worker", backend, str(rank), str(world), str(port), str(nbytes))
        for rank in range(world)
    ]
    deadline, outputs = time.monotonic() + timeout, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {backend} all-reduce did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:
            kill_group(proc)
    replies = [reply_of(proc, out, err) for proc, (out, err) in zip(procs, outputs)]
    reply = next((r for r in replies if "error" in r), replies[0])
    if "error" in reply or not reply["sum_ok"]:
        raise RuntimeError(reply.get("error", f"the {backend} all-reduce returned a wrong sum"))
    return nbytes * 2 * (world - 1) / world / reply["seconds"] / 1e9


def allreduce_worker(backend: str, rank: str, world: str, port: str, nbytes: str, reps: int = 10) -> dict:
    """One rank of allreduce_bandwidth, in its own process: a checked sum, then the mean time
    of `reps` all-reduces."""
    import torch
    import torch.distributed as dist

    from reproduce.bench.harness import sync

    rank, world = int(rank), int(world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        t = torch.full((int(nbytes) // 4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        sum_ok = bool((t == world * (world + 1) / 2).all())
        t.fill_(1.0)
        dist.all_reduce(t)  # warm-up
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        sync(device)
        return {"seconds": (time.perf_counter() - start) / reps, "sum_ok": sum_ok}
    finally:
        dist.destroy_process_group()


def child(module: str, function: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`function(*args)` of `module` in a fresh Python process of its own session (so it and
    its helpers can be stopped together); it prints one JSON line, its result or {"error": ...}.
    `env`: variables added to this process's environment for the child."""
    from reproduce.provenance import REPO

    code = (
        f"import json, sys, importlib\ntry:\n    reply = importlib.import_module({module!r}).{function}(*sys.argv[1:])\n"
        "except Exception as err:\n    reply = {'error': (str(err).splitlines() or [type(err).__name__])[0][:200]}\n"
        "print(json.dumps(reply), flush=True)"
    )
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def reply_of(proc: subprocess.Popen, out: str, err: str) -> dict:
    """The JSON line a child printed, or {"error": its last line of stderr}."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"error": (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]}


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
