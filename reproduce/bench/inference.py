"""`reproduce bench-inference`: what a deployment choice costs and gains, the network alone.

  reproduce bench-inference --model resnet20 --batch 1 128
  reproduce bench-inference --weights cifar-resnet20-12fca82f.th --model resnet20 --data cifar10-jpeg.tar.gz
  reproduce bench-inference --model resnet50 --numerics fp32 bf16 --export eager compile --batch 1 8 32

For each numerics (fp32; bf16: weights and activations in bf16; int8: PT2E post-training
quantization for the x86 CPU backend, reproduce/weights/export.py), each form (eager: the module;
compile: torch.compile with Inductor, constants frozen, which is what gives int8 its int8 kernels;
exported: a torch.export program written to a .pt2 file, loaded back and run as it is) and each
batch: images/s and the latency of one forward (median and 95th percentile, ms) on a fixed batch of
random input of the network's size, after --warmup untimed forwards (compilation, autotuning), each
timed forward between two device synchronisations (bench/harness.py). int8 calibrates on --calibrate
training images of --data, else on random input (its speed is the same; its accuracy is
`reproduce evaluate --numerics int8`'s to measure). On a CUDA GPU (--device auto) the same runs there;
int8 is a CPU backend and is refused on a GPU.
The table goes to --out as <model>-<device>.csv and .md (with the machine and versions) and to an
MLflow run (experiment `bench`, tag reproduce.kind=bench; --no-mlflow: not).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from reproduce.bench import harness
from reproduce.errors import ArgumentParser, Refused
from reproduce.io import atomic_write_text
from reproduce.models import MODELS, build_model
from reproduce.provenance import RESULTS, code_state, machine
from reproduce.weights.export import NUMERICS, SUFFIX, export_program, in_numerics, load_program, save_program

FORMS = ("eager", "compile", "exported")
COLUMNS = ("model", "numerics", "export", "batch", "images_per_sec", "latency_ms_median", "latency_ms_p95", "timed")


class InferenceRefused(Refused, ValueError):
    """A bench-inference request that cannot run; the message is one line."""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def parse_args(argv) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce bench-inference", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="a registry name (random weights: the speed is the same); default resnet20")
    which.add_argument("--weights", help="weights as `reproduce evaluate --weights` takes them (not a .pt2)")
    parser.add_argument("--batch", type=_positive, nargs="+", default=[1, 8, 32, 128], help="batch sizes")
    parser.add_argument("--numerics", choices=NUMERICS, nargs="+", default=list(NUMERICS))
    parser.add_argument("--export", choices=FORMS, nargs="+", default=list(FORMS))
    parser.add_argument("--iterations", type=_positive, default=30, help="timed forwards per cell")
    parser.add_argument("--warmup", type=_positive, default=5, help="untimed forwards before them, per cell")
    parser.add_argument("--data", help="int8 calibrates on this CIFAR-10 source's / image folder's training images")
    parser.add_argument("--calibrate", type=_positive, default=512, help="int8: calibration images from --data")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference", help="folder for the table")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the table to MLflow")
    args = parser.parse_args(argv)
    if args.weights and args.weights.endswith(SUFFIX):
        parser.error(f"--weights {args.weights}: give the network's weights; the bench exports it itself")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    return args


def network(args) -> tuple[str, torch.nn.Module]:
    """(registry name, fp32 network in eval mode) of --weights, else of --model (random weights)."""
    if args.weights:
        from reproduce.weights import read_weights

        weights = read_weights(args.weights).resolve(args.model)
        return weights.arch.name, weights.build().eval()
    name = args.model or "resnet20"
    if name not in MODELS:
        raise InferenceRefused(f"--model {name}: not in the registry (`reproduce models` lists them)")
    torch.manual_seed(0)
    return name, build_model(name, num_classes=10 if MODELS[name].family == "cifar" else 1000).eval()


def calibration(args, name: str, example: torch.Tensor) -> tuple[list[torch.Tensor], str]:
    """(int8 calibration batches, where they come from): --calibrate training images of --data
    (transformed as `reproduce evaluate` transforms them), else random input."""
    if not args.data:
        return [torch.randn_like(example[:1].expand(32, -1, -1, -1)) for _ in range(4)], "random input"
    from reproduce.evaluate import calibration as training_images
    from reproduce.evaluate import eval_config

    spec = argparse.Namespace(model=name, config=None, protocol=None, data=args.data, overrides=[])
    return training_images(eval_config(spec), args.calibrate), f"{args.calibrate} training images of {args.data}"


def forms(model: torch.nn.Module, numerics: str, example: torch.Tensor, wanted: list[str], folder: Path) -> dict:
    """Each wanted form of `model` (already in `numerics`): the module, torch.compile of it, and
    its torch.export program after a round trip through a .pt2 file in `folder`."""
    out = {}
    if "eager" in wanted:
        out["eager"] = model
    if "compile" in wanted:
        import torch._inductor.config

        torch._inductor.config.freezing = True  # weights as constants: prepacked (int8: oneDNN int8 kernels)
        out["compile"] = torch.compile(model)
    if "exported" in wanted:
        meta = {"numerics": numerics}  # load_program feeds a bf16 program bf16 input
        out["exported"] = load_program(
            save_program(export_program(model, example[:2]), folder / f"{numerics}.pt2", meta)
        )[0]
    return out


def latencies(runner, images: torch.Tensor, iterations: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `iterations` forwards of `runner` on the fixed batch `images`, after
    `warmup` untimed ones; each timed by the harness alone, between two device synchronisations."""
    batch = len(images)
    with torch.no_grad():
        harness.items_per_sec(itertools.repeat(images), runner, warmup + 1, warmup, batch, device)  # untimed
        return [
            batch / harness.items_per_sec(itertools.repeat(images), runner, 1, 0, batch, device)
            for _ in range(iterations)
        ]


def row(name: str, numerics: str, form: str, batch: int, seconds: list[float]) -> dict:
    """One line of the table from the forwards' seconds."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "model": name,
        "numerics": numerics,
        "export": form,
        "batch": batch,
        "images_per_sec": batch * len(seconds) / sum(seconds),
        "latency_ms_median": 1000 * statistics.median(seconds),
        "latency_ms_p95": 1000 * p95,
        "timed": len(seconds),
    }


def measure(args, name: str, fp32: torch.nn.Module, device: torch.device, keep=None) -> tuple[list[dict], str]:
    """Every cell of numerics x form x batch; (rows, where int8 calibrated). `keep(rows, calibrated)`
    is called after each cell (the table so far is written: a failure or a stop later keeps it)."""
    size = 32 if MODELS[name].family == "cifar" else 224
    example = torch.randn(max(args.batch), 3, size, size)
    rows, calibrated = [], "-"
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        for numerics in args.numerics:
            batches = []
            if numerics == "int8":
                batches, calibrated = calibration(args, name, example)
            model = in_numerics(_copy(fp32), numerics, batches, example[:2]).to(device)
            for form, runner in forms(model, numerics, example.to(device), args.export, Path(folder)).items():
                for batch in args.batch:
                    seconds = latencies(runner, example[:batch].to(device), args.iterations, args.warmup, device)
                    rows.append(row(name, numerics, form, batch, seconds))
                    print(_line(rows[-1]), flush=True)
                    if keep is not None:
                        keep(rows, calibrated)
    return rows, calibrated


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the fp32 network (bf16 converts its module in place)."""
    import copy

    return copy.deepcopy(model)


def _line(r: dict) -> str:
    return (
        f"  {r['numerics']:>4} {r['export']:>8} batch {r['batch']:>4}: {r['images_per_sec']:10.1f} images/s, "
        f"latency median {r['latency_ms_median']:.2f} ms, p95 {r['latency_ms_p95']:.2f} ms"
    )


def render(rows: list[dict], args, device: torch.device, calibrated: str, seconds: float, done: bool = True) -> str:
    """The markdown table with what it was measured on (`done` False: the cells measured so far)."""
    try:
        import torchao

        ao = torchao.__version__
    except ImportError:
        ao = "not installed"
    git = code_state()
    head = [
        f"# Inference: {rows[0]['model']} on {device.type}",
        "",
        f"Command: `reproduce bench-inference {' '.join(sys.argv[2:]) if sys.argv[1:2] == ['bench-inference'] else ''}`".rstrip(),
        f"Machine: {machine()}; torch {torch.__version__}, torchao {ao}, {torch.get_num_threads()} threads.",
        f"Code: {git}; {time.strftime('%Y-%m-%d %H:%M %Z')}; {seconds:.0f} s in all.",
        f"Each cell: {args.warmup} untimed forwards, then {args.iterations} timed one by one on a fixed batch of "
        f"random input; int8 calibrated on {calibrated}.",
        *(
            []
            if done
            else ["", f"**Partial**: the {len(rows)} cells measured before the command stopped or is still running."]
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    body = [
        "| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |" for r in rows
    ]
    return "\n".join(head + body) + "\n"


def write(rows: list[dict], text: str, out: Path, stem: str) -> tuple[Path, Path]:
    """The table as CSV and markdown, each written atomically."""
    lines = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in rows]
    csv = atomic_write_text(out / f"{stem}.csv", "\n".join(lines) + "\n")
    return csv, atomic_write_text(out / f"{stem}.md", text)


def log_run(rows: list[dict], text: str, files: tuple[Path, Path], stem: str) -> str:
    """The table as an MLflow run (experiment `bench`, tag reproduce.kind=bench); its id."""
    import mlflow

    from reproduce.tracking import prepare_store

    prepare_store()
    mlflow.set_experiment("bench")
    git = code_state()
    tags = {
        "reproduce.kind": "bench",
        "reproduce.bench": "inference",
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "mlflow.source.git.commit": git.commit,
        "reproduce.machine": machine(),
        "reproduce.torch": torch.__version__,
        "mlflow.note.content": text,
    }
    with mlflow.start_run(run_name=f"inference-{stem}", tags=tags) as run:
        keys = ("images_per_sec", "latency_ms_median", "latency_ms_p95")
        mlflow.log_metrics(
            {f"{r['numerics']}.{r['export']}.b{r['batch']}.{k}": float(r[k]) for r in rows for k in keys}
        )
        for path in files:
            mlflow.log_artifact(str(path))
    return run.info.run_id


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.no_mlflow:
        from reproduce.tracking import check_reachable

        check_reachable()  # before minutes of measuring
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if "int8" in args.numerics and device.type != "cpu":
        raise InferenceRefused("int8 is quantized for the x86 CPU backend; use --device cpu or leave int8 out")
    began = time.perf_counter()
    name, fp32 = network(args)
    stem = f"{name}-{device.type}"

    def keep(rows: list[dict], calibrated: str) -> None:
        write(rows, render(rows, args, device, calibrated, time.perf_counter() - began, done=False), args.out, stem)

    rows, calibrated = measure(args, name, fp32.to(device), device, keep)
    text = render(rows, args, device, calibrated, time.perf_counter() - began)
    files = write(rows, text, args.out, stem)
    where = "" if args.no_mlflow else f"; MLflow run {log_run(rows, text, files, stem)}"
    print(f"wrote {files[0]} and {files[1]}{where}")
    return 0
