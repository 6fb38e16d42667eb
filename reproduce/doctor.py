"""`reproduce doctor [--json] [--data PATH]`: what this machine can do for the suite, in one screen.

  reproduce doctor                       versions, devices, and each capability proven by a tiny run
  reproduce doctor --data DIR_OR_FILE    also the read speed of a data set
  reproduce doctor --json                the same as one JSON document (tools/gpu_session.py keeps it)

Versions (torch, CUDA, cuDNN, NCCL, driver) and every device with its memory; then each
capability proven by doing it: real training steps of ResNet-20 (engine.train_step) in fp32,
bf16 autocast, channels_last and torch.compile (reduce-overhead on a GPU, in a child process with
a deadline: a cold compile is slow); fast bf16; a matmul rate (bench.harness.measure_peak); NCCL
all-reduce bandwidth across several local GPUs; FFCV decoding a JPEG made here; the MLflow store
(tracking.check_reachable; a local sqlite store is opened, or, when there is none, proven creatable
by making one beside it and removing it: doctor never creates the store); the read speed of --data.

Exit status 0 when everything a training job needs works (the fp32 step on the device, the
tracking store, the data when given), 1 otherwise, with one line naming the first thing that
failed and the fix. The other checks say which run.* switches and loaders this machine can use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from reproduce.doctor_checks import (  # noqa: F401 (the names callers and tests use as doctor.*)
    ALLREDUCE_BYTES,
    FIXES,
    READ_LIMIT_BYTES,
    READ_LIMIT_S,
    Check,
    CompileProbe,
    _listed_devices,
    _run,
    allreduce_bandwidth,
    check_data,
    check_fast_bf16,
    check_ffcv,
    check_matmul,
    check_nccl,
    check_step,
    check_tracking,
    compile_probe,
    devices,
    one_line,
    tiny_steps,
    versions,
)
from reproduce.errors import ArgumentParser

COMPILE_TIMEOUT_S = {
    "cpu": 20.0,
    "cuda": 180.0,
}  # a cold torch.compile of ResNet-20 takes about a minute on 2 CPU cores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--data", type=Path, help="a data set (file or folder) whose read speed to measure")
    parser.add_argument(
        "--compile-timeout",
        type=float,
        metavar="S",
        help=f"seconds to wait for the torch.compile check (default {COMPILE_TIMEOUT_S['cpu']:.0f} "
        f"on a CPU, {COMPILE_TIMEOUT_S['cuda']:.0f} on a GPU)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = diagnose(args.data, args.compile_timeout)
    print(json.dumps(report, indent=1) if args.json else render(report), flush=True)
    return 0 if report["ready"] else 1


def diagnose(data: Path | None = None, compile_timeout: float | None = None) -> dict:
    """Everything `reproduce doctor` reports, as a JSON-ready dict."""
    import torch

    start = time.perf_counter()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    checks = {"matmul": _run("matmul", check_matmul, device)}  # first, while nothing else runs
    timeout = COMPILE_TIMEOUT_S[device.type] if compile_timeout is None else compile_timeout
    probe = CompileProbe(device)  # compiles in a child process while the other checks run
    checks["fp32_step"] = _run("fp32_step", check_step, device, False, False)
    checks["bf16_step"] = _run("bf16_step", check_step, device, True, False)
    checks["channels_last_step"] = _run("channels_last_step", check_step, device, False, True)
    checks["fast_bf16"] = _run("fast_bf16", check_fast_bf16, device)
    checks["nccl"] = _run("nccl", check_nccl, torch.cuda.device_count())
    checks["ffcv"] = _run("ffcv", check_ffcv)
    checks["tracking"] = _run("tracking", check_tracking)
    checks["data"] = _run("data", check_data, data)
    checks["compile_step"] = probe.result(timeout)
    order = [
        "fp32_step",
        "bf16_step",
        "channels_last_step",
        "compile_step",
        "fast_bf16",
        "matmul",
        "nccl",
        "ffcv",
        "tracking",
        "data",
    ]
    rows = [checks[k] for k in order]
    for row in rows:
        row.needed = row.name in ("fp32_step", "tracking") or (row.name == "data" and data is not None)
    failed = [r for r in rows if r.needed and r.status == "FAIL"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": socket.gethostname(),
        "device": str(device),
        "versions": versions(),
        "devices": _listed_devices(),
        "checks": [asdict(r) for r in rows],
        "ready": not failed,
        "verdict": verdict(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }


def verdict(rows: list[Check]) -> str:
    """One line: ready, or the first needed check that failed and its fix."""
    for r in rows:
        if r.needed and r.status == "FAIL":
            return f"NOT READY: {r.name}: {r.detail}; fix: {r.fix}"
    missing = [r.name for r in rows if r.status in ("FAIL", "unknown")]
    return "ready: everything a training job needs works" + (
        f" (not available or not proven: {', '.join(missing)})" if missing else ""
    )


def render(report: dict) -> str:
    v = report["versions"]
    lines = [
        f"reproduce doctor on {report['host']}, {report['date']} ({report['seconds']:.0f} s)",
        (
            f"  torch {v['torch']}, torchvision {v['torchvision']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, "
            f"NCCL {v['nccl']}, driver {v['driver']}, Python {v['python']}"
        ),
    ]
    for d in report["devices"]:
        lines.append(
            f"  {d['device']}: {d['name']}, {d['memory_gib']:.1f} GiB" + (f" ({d['note']})" if d.get("note") else "")
        )
    for c in report["checks"]:
        tag = "needed" if c["needed"] else ""
        lines.append(f"{c['status']:<8}{c['name']:<19}{c['detail']}" + (f"  [{tag}]" if tag else ""))
        if c["fix"] and c["status"] in ("FAIL", "unknown"):
            lines.append(f"{'':27}fix: {c['fix']}")
    lines.append(report["verdict"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
