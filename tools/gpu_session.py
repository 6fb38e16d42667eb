#!/usr/bin/env python3
"""The first and only command on a newly available GPU machine: what it can do, then as much of
CIFAR-10 Table 6 at the full schedule as the time allows, all in one folder.

  python tools/gpu_session.py --out gpu-session --data ../shared/data/cifar10-jpeg.tar.gz --budget-min 14
  python tools/gpu_session.py ... (the same command again)    resumes: finished steps are not redone
  python tools/gpu_session.py --plan [--peak-tflops 790 --share 0.3 --us-per-op 4]   the arithmetic of results/gpu-plan.md

Copy along to the machine (nothing is downloaded there): this checkout with its .git (the commit
goes into the provenance), a CIFAR-10 copy for --data (cifar10-jpeg.tar.gz, a cifar-10-batches-py
folder or an image tree), and, when its Python lacks them, wheels of the suite's dependencies
(mlflow, pydantic, pandas, pytest, ...: `pip install --no-index --find-links WHEELS -e '.[test]'`). torch must
be there.

Steps, in this order, each recorded in OUT/session.json (with the command, commit, GPU, driver,
torch, dates and MLflow run ids) and logged in OUT/<step>.log:
  doctor   `reproduce doctor --json` -> OUT/doctor.json; the session stops if a job cannot train here
  tests    tests/test_gpu.py (-m gpu)                     skipped without a CUDA device
  bench    a short `reproduce bench-matrix` -> OUT/bench/   skipped without a CUDA device
  table6   `reproduce sweep --parallel N` of the CIFAR-10 nets, most result per minute first (resnet20
           and resnet56, plain20 and plain56, resnet110, then the rest), with data.loader=gpu, bf16,
           channels_last and CUDA graphs (each switch only where the doctor proved it), runs under OUT/runs
  report   `reproduce report --study cifar10 --out OUT/report` when a run has finished
Every MLflow record goes to the sqlite store OUT/mlflow.db. At --budget-min the running step gets
SIGTERM (the sweep's runs checkpoint and end KILLED) and the session exits 0: run it again to go on.
Trailing key=value arguments go to every training run (e.g. a shorter schedule for a try-out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The order that yields the most per minute: the depth comparison's two ends (20, 56) for both
# kinds of net, then resnet110, then the middle depths, then the costliest (plain110, resnet1202).
TABLE6 = [
    "resnet20",
    "resnet56",
    "plain20",
    "plain56",
    "resnet110",
    "resnet32",
    "resnet44",
    "plain32",
    "plain44",
    "plain110",
    "resnet1202",
]
RECIPE = {
    "data.loader": "gpu",
    "run.amp": "true",
    "run.channels_last": "true",
    "run.compile": "true",
    "run.compile_mode": "reduce-overhead",
    "run.progress": "false",
}
BENCH = [
    "--models",
    "resnet20",
    "resnet56",
    "resnet110",
    "--precision",
    "bf16",
    "--channels-last",
    "on",
    "--compile",
    "off",
    "reduce-overhead",
    "--iterations",
    "40",
    "--warmup",
    "15",
    "--cifar-loader",
    "gpu",
]
GRACE_S = 120.0  # after SIGTERM: time for runs to reach a safe point and checkpoint, then SIGKILL
STOP = []  # signals received by this process


def parse_args(argv: list[str]) -> argparse.Namespace:
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="tools/gpu_session.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the session's folder (created; reused by a rerun)")
    parser.add_argument("--data", type=Path, help="CIFAR-10 source (as data.path)")
    parser.add_argument("--budget-min", type=float, default=60.0, help="wall-clock minutes for the whole session")
    parser.add_argument("--parallel", type=int, default=6, help="Table 6 runs at a time on the device (default 6)")
    parser.add_argument("--configs", nargs="+", default=TABLE6, metavar="NET", help="CIFAR-10 nets, in training order")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tests-min", type=float, default=8.0, help="at most this long for the gpu tests")
    parser.add_argument("--bench-min", type=float, default=4.0, help="at most this long for the bench matrix")
    parser.add_argument("--plan", action="store_true", help="print the compute plan of Table 6 and exit")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="--plan: bf16 dense matmul rate assumed")
    parser.add_argument("--share", type=float, nargs="+", default=[0.1, 0.2, 0.35], help="--plan: shares of it reached")
    parser.add_argument(
        "--us-per-op", type=float, default=4.0, help="--plan: the time of one tiny GPU kernel, in microseconds"
    )
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if not args.plan and (args.out is None or args.data is None):
        parser.error("--out and --data are required (or --plan)")
    if not args.plan and not args.data.exists():
        parser.error(f"--data {args.data} does not exist; copy CIFAR-10 along and point --data at it")
    unknown = [c for c in args.configs if not (REPO / "configs" / "cifar10" / f"{c}.yaml").exists()]
    if unknown:
        parser.error(f"no config configs/cifar10/{unknown[0]}.yaml; pick from {', '.join(TABLE6)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the checkout's suite, installed or not
    if args.plan:
        print(plan(args.configs, args.peak_tflops, args.share, args.us_per_op))
        return 0
    from reproduce.io import atomic_write_json
    from reproduce.provenance import git_state

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.budget_min
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP.append(signum))
    state_path = out / "session.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"steps": {}, "attempts": []}
    git = git_state()
    state["attempts"].append(
        {
            "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv]),
            "cwd": os.getcwd(),
            "started": _now(),
            "commit": git.commit,
            "git_dirty": git.dirty,
            "budget_min": args.budget_min,
        }
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}",
    }

    def save() -> None:
        atomic_write_json(state_path, state, indent=1)

    def step(
        name: str,
        command: list[str],
        limit_s: float,
        cwd: Path,
        stdout: Path | None = None,
        bounded: bool = True,
        stop_signal: int = signal.SIGTERM,
    ) -> dict:
        """Run one step for at most `limit_s` (and within the budget when `bounded`), and record
        it. A step stopped at its own `limit_s` (tests, bench) is done: a rerun does not repeat it."""
        say(f"== {name}: {shlex.join(command)}")
        started, left = _now(), deadline - time.monotonic()
        own_limit = not bounded or limit_s < left
        code, how = run_step(
            command, cwd, env, out / f"{name}.log", stdout, limit_s if own_limit else left, stop_signal
        )
        if how == "stopped at the time limit" and not own_limit:
            how = "stopped at the budget"
        status = (
            "done"
            if code == 0 or (bounded and own_limit and how == "stopped at the time limit")
            else how or f"exit {code}"
        )
        record = {"status": status, "exit": code, "started": started, "ended": _now(), "command": shlex.join(command)}
        if how and status == "done":
            record["note"] = f"stopped at its own limit of {limit_s / 60:.1f} min; what it wrote is kept"
        state["steps"][name] = record
        save()
        say(f"== {name}: {record['status']}")
        return record

    def skip(name: str, status: str, why: str) -> None:
        """Record a step not run: `skipped` for good (no GPU), `not started` (budget, stop request)."""
        state["steps"][name] = {"status": status, "why": why, "ended": _now()}
        save()
        say(f"== {name}: {status}: {why}")

    def done(name: str) -> bool:
        if state["steps"].get(name, {}).get("status") == "done":
            say(f"== {name}: done in an earlier attempt ({state['steps'][name]['ended']}); not redone")
            return True
        return False

    save()
    cli = [sys.executable, "-m", "reproduce.cli"]
    if not done("doctor"):  # not bounded by the budget: it is what the rest depends on (about 30 s to 3 min)
        record = step(
            "doctor",
            [*cli, "doctor", "--json", "--data", str(args.data.resolve())],
            600,
            out,
            out / "doctor.json",
            bounded=False,
        )
        if record["exit"] not in (0, 1) or not (out / "doctor.json").exists():
            return _finish(
                state, save, f"the doctor did not complete ({record['status']}); see {out / 'doctor.log'}", 1
            )
    doctor = json.loads((out / "doctor.json").read_text())
    state["machine"] = {
        "device": doctor["device"],
        "devices": doctor["devices"],
        "versions": doctor["versions"],
        "host": doctor["host"],
        "doctor_verdict": doctor["verdict"],
    }
    save()
    if not doctor["ready"]:
        return _finish(state, save, f"this machine cannot train: {doctor['verdict']}", 1)
    cuda = doctor["device"].startswith("cuda")
    for name, command, limit in (
        (
            "tests",
            [
                sys.executable,
                "-m",
                "pytest",
                str(REPO / "tests" / "test_gpu.py"),
                "-m",
                "gpu",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "--junitxml",
                str(out / "gpu-tests.xml"),
            ],
            60 * args.tests_min,
        ),
        (
            "bench",
            [*cli, "bench-matrix", *BENCH, "--cifar-data", str(args.data.resolve()), "--out", str(out / "bench")],
            60 * args.bench_min,
        ),
    ):
        if done(name):
            continue
        if not cuda:
            skip(name, "skipped", f"no CUDA device (the doctor ran on {doctor['device']}): it needs a GPU")
        elif time.monotonic() >= deadline or STOP:
            skip(name, "not started", "the budget is spent" if not STOP else "stopped on request")
        else:
            step(
                name, command, limit, REPO if name == "tests" else out, stop_signal=signal.SIGINT
            )  # both end tidily on SIGINT

    switches, notes = recipe(doctor)
    state["recipe"] = {"switches": switches, "notes": notes}
    for note in notes:
        say(f"   {note}")
    configs = [str(REPO / "configs" / "cifar10" / f"{c}.yaml") for c in args.configs]
    sweep = [
        *cli,
        "sweep",
        "--configs",
        *configs,
        "--seeds",
        *map(str, args.seeds),
        "--parallel",
        str(args.parallel),
        "--log-dir",
        str(out / "sweep-logs"),
        f"data.path={args.data.resolve()}",
        *switches,
        *args.overrides,
    ]
    if not done("table6"):
        if time.monotonic() >= deadline or STOP:
            skip("table6", "not started", "the budget is spent; run the same command again to train")
        else:
            step("table6", sweep, float("inf"), out)
    state["mlflow_runs"] = mlflow_runs(out / "mlflow.db")
    report = [
        *cli,
        "report",
        "--study",
        "cifar10",
        "--out",
        str(out / "report"),
        "--export",
        str(out / "report" / "runs.json"),
    ]
    state["report_command"] = f"MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']} " + shlex.join(
        ["reproduce", *report[3:]]
    )
    save()
    if any(r["status"] == "FINISHED" for r in state["mlflow_runs"]) and not STOP:
        step("report", report, 600, out, bounded=False)
    left = [
        n
        for n in ("doctor", "tests", "bench", "table6")
        if state["steps"].get(n, {}).get("status") not in ("done", "skipped")
    ]
    return _finish(
        state,
        save,
        "complete" if not left else f"not complete ({', '.join(left)}): run the same command again to go on",
        0,
    )


def run_step(
    command: list[str],
    cwd: Path,
    env: dict,
    log: Path,
    stdout: Path | None,
    limit_s: float,
    stop_signal: int = signal.SIGTERM,
) -> tuple[int, str]:
    """Run `command`, its output appended to `log` (stdout to the file `stdout` instead, when
    given, written whole or not at all), for at most `limit_s` seconds or until this process is
    asked to stop: then `stop_signal` (the sweep: SIGTERM, its runs checkpoint; pytest and the
    bench end tidily on SIGINT), GRACE_S to finish, SIGKILL. (exit status, how it was stopped or "")."""
    from reproduce.io import atomic_replace

    part = stdout.with_name(f".{stdout.name}.part") if stdout else None
    with open(log, "a") as err, open(part or os.devnull, "w") as out:
        err.write(f"\n== {_now()}: {shlex.join(command)}\n")
        err.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out if stdout else err, stderr=err)
        end, how = time.monotonic() + max(0.0, limit_s), ""
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if not how and (time.monotonic() >= end or STOP):
                how = "stopped at the time limit" if not STOP else "stopped on request"
                say(
                    f"   {how}: {signal.Signals(stop_signal).name} to pid {proc.pid} (a sweep's runs checkpoint: the same command resumes them)"
                )
                proc.send_signal(stop_signal)
                end = time.monotonic() + GRACE_S
            elif how and time.monotonic() >= end:
                proc.kill()
    if part is not None:
        if how:
            part.unlink(missing_ok=True)
        else:
            atomic_replace(part, stdout)
    return proc.returncode, how


def recipe(doctor: dict) -> tuple[list[str], list[str]]:
    """RECIPE's switches, each kept only where the doctor proved it works (bf16: and is fast)."""
    checks = {c["name"]: c for c in doctor["checks"]}
    switches, notes = dict(RECIPE), []
    if checks["bf16_step"]["status"] != "ok" or not checks["fast_bf16"]["detail"].startswith("yes"):
        switches["run.amp"] = "false"
        notes.append(f"run.amp=false: bf16 {checks['bf16_step']['status']}, fast: {checks['fast_bf16']['detail']}")
    if checks["channels_last_step"]["status"] != "ok":
        switches["run.channels_last"] = "false"
        notes.append(f"run.channels_last=false: {checks['channels_last_step']['detail']}")
    if checks["compile_step"]["status"] != "ok":
        del switches["run.compile_mode"]
        switches["run.compile"] = "false"
        notes.append(f"run.compile=false: {checks['compile_step']['detail']}")
    return [f"{k}={v}" for k, v in switches.items()], notes


def mlflow_runs(db: Path) -> list[dict]:
    """The cifar10 runs of the session's store: id, model, seed, status, final test error."""
    if not db.exists():
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cifar10")
    if experiment is None:
        return []
    return [
        {
            "run_id": r.info.run_id,
            "model": r.data.params.get("model.name"),
            "seed": r.data.tags.get("reproduce.seed"),
            "status": r.info.status,
            "test_top1_err": r.data.metrics.get("test_top1_err"),
            "iterations": r.data.params.get("schedule.iterations"),
        }
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if r.data.tags.get("reproduce.kind", "train") == "train"
    ]  # training runs: not the report's or an evaluation's


def plan(configs: list[str], peak_tflops: float, shares: list[float], us_per_op: float) -> str:
    """Markdown: for each net, multiply-adds x 2 FLOPs x 3 (forward + a backward of twice its
    work) x iterations x batch of its config; the seconds that takes at each share of
    `peak_tflops`; and the time when latency, not FLOPs, bounds a run (its kernels run one after
    another, however many runs share the device): its step's aten operations (forward + backward,
    counted on the meta device; views launch nothing, fusion merges some) x `us_per_op` x iterations."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from reproduce.config import load_config
    from reproduce.models import build_model, count_macs

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    head = (
        "| net | multiply-adds / image | iterations x batch | PFLOP | "
        + " | ".join(f"s at {s:.0%} ({s * peak_tflops:.0f} TFLOP/s)" for s in shares)
        + f" | aten ops / step | s latency-bound at {us_per_op:g} us / op |"
    )
    lines, totals = [head, "|" + "---|" * (6 + len(shares))], [0.0, 0.0]
    for name in configs:
        cfg = load_config(REPO / "configs" / "cifar10" / f"{name}.yaml")
        iterations, batch = cfg.schedule.iterations, cfg.optim.batch_size
        with torch.device("meta"):
            model = build_model(name)
            macs = count_macs(model, 32)
            images, labels = torch.zeros(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.long)
            with Ops() as ops:
                F.cross_entropy(model.train()(images), labels).backward()
        flops, floor = macs * 2 * 3 * iterations * batch, ops.count * us_per_op * 1e-6 * iterations
        totals = [totals[0] + flops, totals[1] + floor]
        lines.append(
            f"| {name} | {macs / 1e6:.1f} M | {iterations} x {batch} | {flops / 1e15:.2f} | "
            + " | ".join(f"{flops / (s * peak_tflops * 1e12):.0f}" for s in shares)
            + f" | {ops.count} | {floor:.0f} |"
        )
    lines.append(
        f"| all {len(configs)} | | | {totals[0] / 1e15:.2f} | "
        + " | ".join(f"{totals[0] / (s * peak_tflops * 1e12):.0f}" for s in shares)
        + f" | | {totals[1]:.0f} |"
    )
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, flush=True)


def _finish(state: dict, save, summary: str, code: int) -> int:
    state["attempts"][-1].update({"ended": _now(), "summary": summary})
    save()
    say(f"session: {summary}")
    return code


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


if __name__ == "__main__":
    sys.exit(main())
