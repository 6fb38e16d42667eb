"""The depth study, the suite's main job: plain against residual networks on CIFAR-10 (the
paper's Fig. 6 and Table 6), sized to the machine it runs on.

  reproduce study --data ../shared/data/cifar10-jpeg.tar.gz     (or set REPRODUCE_CIFAR10)
  reproduce study --budget full --data /data/cifar-10-batches-py   (a GPU: Table 6 at the paper's schedule)

--budget cpu (the default without a CUDA GPU): plain-20, plain-56 and ResNet-56, two seeds
each, for the first --iterations (80) of the paper's recipe (batch 128, SGD momentum 0.9, weight
decay 1e-4; all 50k training images, as no validation error is read) at the rate the paper starts its deepest CIFAR net with, lr 0.01 (§4.2: for
ResNet-110 "0.1 is slightly too large to start converging"; on the JPEG copy of CIFAR-10 our
56-layer nets at 0.1 stayed at chance for their first 160 (ResNet) and 400 (plain) iterations,
results/quick-study.md). It compares training error, as the paper's dashed curves do, averaged
over the last fifth of the run, and says for each of the paper's findings whether this run
shows it by a margin larger than the seed-to-seed spread: the deeper plain net is worse than
the shallower one (degradation), and at the same depth the residual net is better. That a
deeper ResNet beats a shallower one takes the full schedule; the output says so.

--budget full (the default with a CUDA GPU): the paper's full recipe for plain and ResNet
20/32/44/56/110 (64k iterations; ResNet-110 with its warm-up), seed 0, four runs at a time
sharing the GPU (`reproduce sweep --parallel 4`, CIFAR-10 held on the GPU, bf16, channels_last,
CUDA graphs).

Both end with `reproduce report`'s table (ours beside the paper's numbers) and Fig. 6, written
to --out. With no --data and no REPRODUCE_CIFAR10, torchvision downloads CIFAR-10 into ./data.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from reproduce import provenance
from reproduce.errors import ArgumentParser, command

CONFIGS = provenance.CONFIGS / "cifar10"
CPU_MODELS = ["plain20", "plain56", "resnet56"]
FULL_MODELS = [f"{net}{depth}" for depth in (20, 56, 32, 44, 110) for net in ("resnet", "plain")]
LAST_FRACTION = 0.2  # training error: the mean of the logged windows over the last fifth of the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce study", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=os.environ.get("REPRODUCE_CIFAR10"),
        help="CIFAR-10 source (batches folder, image tree or .tar.gz); default $REPRODUCE_CIFAR10, else download",
    )
    parser.add_argument(
        "--budget",
        choices=["auto", "cpu", "full"],
        default="auto",
        help="cpu: the short study (minutes on 2 cores); full: Table 6 at the paper's schedule (a GPU "
        "job); auto (default): full when a CUDA GPU is visible, else cpu",
    )
    parser.add_argument(
        "--models", nargs="+", help=f"default: {' '.join(CPU_MODELS)} (cpu), {' '.join(FULL_MODELS)} (full)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 (cpu), 0 (full)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=80,
        help="cpu budget: iterations per run at lr 0.01 (default 80; the paper's whole schedule is 64000)",
    )
    parser.add_argument("--parallel", type=int, default=4, help="full budget: runs sharing the GPU (default 4)")
    parser.add_argument("--experiment", help="MLflow experiment (default cifar10-quick for cpu, cifar10 for full)")
    parser.add_argument("--out", type=Path, help="where the table and Fig. 6 go (default results/<experiment>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run, e.g. data.workers=2")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # may follow --models
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if args.budget == "auto":
        import torch

        args.budget = "full" if torch.cuda.is_available() else "cpu"
    cpu = args.budget == "cpu"
    args.models = args.models or (CPU_MODELS if cpu else FULL_MODELS)
    args.seeds = args.seeds or ([0, 1] if cpu else [0])
    args.experiment = args.experiment or ("cifar10-quick" if cpu else "cifar10")
    args.out = args.out or Path("results") / args.experiment
    if args.iterations < 10:
        parser.error(f"--iterations must be at least 10, got {args.iterations}")
    return args


def run_overrides(args: argparse.Namespace) -> list[str]:
    """What every run of the study gets on top of its config."""
    common = [f"experiment={args.experiment}"] + ([f"data.path={args.data}"] if args.data else [])
    if args.budget == "cpu":
        n = args.iterations
        common += [
            f"schedule.iterations={n}",
            "schedule.milestones=[]",
            "schedule.warmup_iterations=0",  # the paper's start:
            "optim.lr=0.01",  # the warm-up rate of its ResNet-110 (0.1 is too large to start the 56-layer nets here)
            f"eval.every={max(1, n // 4)}",
            "eval.max_images=2000",
            "eval.batch_size=500",  # 4 test points for Fig. 6
            "data.val_split=0",  # the study reads training and test error: a validation split would only cost time
            f"run.log_every={max(1, n // 40)}",
            f"run.checkpoint_every={max(1, n // 4)}",
            "data.loader=gpu",
            "run.device=cpu",  # CIFAR-10 held in memory and augmented per batch: no workers
        ]
    else:
        common += [
            "data.loader=gpu",
            "run.amp=true",
            "run.channels_last=true",
            "run.compile=true",
            "run.compile_mode=reduce-overhead",
            "run.progress=false",
        ]
    return common + args.overrides


@command
def main(argv: list[str] | None = None) -> int:
    from reproduce.config import ConfigError, load_config
    from reproduce.runs import sweep

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if problem := unknown_model(args.models) or _out_problem(args.out):  # before any training
        print(f"error: {problem}", file=sys.stderr)
        return 2
    common = run_overrides(args)
    if args.budget == "cpu":
        try:
            common += numerics_for(args, common)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    configs = {}
    for name in args.models:
        path = CONFIGS / f"{name}.yaml"
        try:
            configs[name] = load_config(path, common)
        except ConfigError as err:
            print(f"error: {name}: {err}", file=sys.stderr)
            return 2
    what = (
        f"the first {args.iterations} iterations ({100 * args.iterations / 64000:.2f}% of the paper's schedule) at lr 0.01"
        if args.budget == "cpu"
        else "the paper's full schedule (64k iterations)"
    )
    print(
        f"study ({args.budget} budget): {', '.join(args.models)} x seeds {' '.join(map(str, args.seeds))}, {what}; "
        f"MLflow experiment {args.experiment}",
        flush=True,
    )
    runs = [
        sweep.Planned(["--config", str(CONFIGS / f"{m}.yaml"), f"seed={s}", *common], configs[m].with_seed(s))
        for s in args.seeds
        for m in args.models
    ]  # seed-major, as a sweep: a study cut short still holds a complete depth comparison
    code = sweep.run(runs, args.parallel if args.budget == "full" else 1)
    if code not in (0, 1):  # refused before training (2) or stopped on request (143): nothing to compare
        return code
    # A failed run (1) leaves the others: the table shows them, and a finding that needs it says
    # "not measured"; the exit status still says that a run failed.
    runs = study_runs(args, configs)  # MLflow is read once, for the findings and the report
    findings = compare(args, configs, runs)
    print()
    print(findings.text)
    return write_outputs(args, argv, findings, runs) or code


def unknown_model(names: list[str]) -> str | None:
    """Why one of the --models is not a CIFAR-10 network of the registry, or None."""
    import difflib

    from reproduce.models import MODELS

    cifar = [name for name, spec in MODELS.items() if spec.family == "cifar"]
    for name in names:
        if name not in cifar:
            close = difflib.get_close_matches(name, cifar, n=1)
            return (
                f"--models {name}: not a CIFAR-10 network"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + f" (one of {', '.join(sorted(cifar))})"
            )
    return None


def _out_problem(out: Path) -> str | None:
    """Why the report could not be written to --out (checked before hours of training), or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder for the table and Fig. 6"
    parent = next((p for p in [out.absolute(), *out.absolute().parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out} cannot be written ({parent} is not a writable folder); give a writable folder"
    return None


def numerics_for(args: argparse.Namespace, common: list[str]) -> list[str]:
    """run.amp and run.channels_last for every run of a CPU study, decided once (`auto`: by this
    CPU's capabilities and a few timed steps of the largest network) unless given as overrides,
    so that all runs train with the same numerics."""
    import torch

    from reproduce.config import load_config
    from reproduce.models import MODELS
    from reproduce.numerics import resolve_numerics

    largest = max(args.models, key=lambda m: MODELS[m].depth)
    cfg = load_config(CONFIGS / f"{largest}.yaml", ["run.amp=auto", "run.channels_last=auto", *common])
    numerics = resolve_numerics(cfg, torch.device("cpu"), 10, cfg.optim.batch_size)
    print(
        f"numerics for every run: {'bf16 autocast' if numerics.amp else 'fp32'}, "
        f"{'channels_last' if numerics.channels_last else 'contiguous'} ({numerics.how}; {largest}, batch "
        f"{cfg.optim.batch_size}, this machine: {provenance.machine()})",
        flush=True,
    )
    return [f"run.amp={str(numerics.amp).lower()}", f"run.channels_last={str(numerics.channels_last).lower()}"]


@dataclass
class Findings:
    rows: list[dict]
    text: str


def study_runs(args: argparse.Namespace, configs: dict) -> list[dict]:
    """The runs of this study's recipes in its experiment (the experiment may hold runs of other lengths
    from earlier studies), read from MLflow once, in the report's run format (with their histories)."""
    from reproduce.report.runs import load_mlflow_runs

    recipes = {cfg.recipe_hash() for cfg in configs.values()}
    return [r for r in load_mlflow_runs(args.experiment, "cifar10") if r["tags"].get("reproduce.recipe") in recipes]


def compare(args: argparse.Namespace, configs: dict, runs: list[dict]) -> Findings:
    """One row per model from its finished runs among `runs` (mean and spread over seeds), then the
    paper's findings, each as shown or not by this run."""
    from reproduce.report.tables import load_paper, paper_reference

    paper = load_paper()
    rows = []
    for name, cfg in configs.items():
        mine = [r for r in runs if r["tags"].get("reproduce.recipe") == cfg.recipe_hash() and r["status"] == "FINISHED"]
        newest = {}
        for run in sorted(mine, key=lambda r: r["start_time"]):  # one run per seed: the newest
            newest[run["tags"]["reproduce.seed"]] = run
        picked = [newest[str(s)] for s in args.seeds if str(s) in newest]
        train = [train_error(r, cfg.schedule.iterations) for r in picked]
        test = [r["metrics"].get("test_top1_err", math.nan) for r in picked]
        # The report's reference: the paper's mean of 5 runs where it gives one (ResNet-110), not its best.
        shortcut = cfg.model.shortcut.value if cfg.model.shortcut else ""
        ref = paper_reference(paper, (name, shortcut, None, "single"), "test_top1_err")["reference"]
        rows.append(
            {
                "model": name,
                "n": len(picked),
                "train": train,
                "test": test,
                "paper": ref,
                "run_ids": [r["run_id"] for r in picked],
            }
        )
    return Findings(rows, render(args, rows))


def train_error(run: dict, iterations: int) -> float:
    """Training error (%) over the last LAST_FRACTION of the run: the mean of the logged windows
    (each the error on the augmented batches since the previous log line)."""
    history = run["history"].get("train_top1_err", [])
    tail = [value for step, value in history if step > iterations * (1 - LAST_FRACTION)]
    return sum(tail) / len(tail) if tail else math.nan


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, spread): the spread is the range over seeds (max - min), nan for one seed."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return sum(values) / len(values), (max(values) - min(values)) if len(values) > 1 else math.nan


def verdict(worse: dict, better: dict, claim: str) -> str:
    """`claim` is shown when `worse` trains to a higher error than `better` by more than the
    larger seed-to-seed spread of the two."""
    (w, w_spread), (b, b_spread) = _stats(worse["train"]), _stats(better["train"])
    margin, spread = w - b, max(w_spread, b_spread)
    if math.isnan(margin):
        return f"- {claim}: not measured (a run did not finish)"
    if math.isnan(spread):
        return (
            f"- {claim}: {worse['model']} {w:.1f}% vs {better['model']} {b:.1f}% training error, a margin of "
            f"{margin:.1f} points; one seed, so no spread to hold it against (use --seeds 0 1)"
        )
    shown = "SHOWN" if margin > spread else "NOT shown"
    return (
        f"- {claim}: {shown}: {worse['model']} {w:.1f}% vs {better['model']} {b:.1f}% training error, a margin of "
        f"{margin:.1f} points against a seed-to-seed spread of {spread:.1f}"
    )


def render(args: argparse.Namespace, rows: list[dict]) -> str:
    def cell(values: list[float]) -> str:
        mean, spread = _stats(values)
        return "-" if math.isnan(mean) else f"{mean:.2f}" + ("" if math.isnan(spread) else f" ± {spread / 2:.2f}")

    header = ("model", "n", "train err %", "test err %", "paper test err %", "MLflow run ids")
    table = [header] + [
        (
            r["model"],
            str(r["n"]),
            cell(r["train"]),
            cell(r["test"]),
            "-" if math.isnan(r["paper"]) else f"{r['paper']:.2f}",
            " ".join(r["run_ids"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if args.budget == "cpu":
        test_what = "test error on 2,000 test images (single view)"
        lines.append(
            f"\nours: after {args.iterations} iterations of 64,000 at lr 0.01, mean ± half the range over seeds; train error "
            f"is the mean over the last {LAST_FRACTION:.0%} of the run on augmented batches; {test_what}. "
            "The paper's column is the end of its full schedule (Table 6; it gives no number for plain nets): "
            "it is there for scale, not as a target for a run this short."
        )
    else:
        lines.append(
            "\nours: the paper's full schedule; test error on the 10,000 test images (single view); paper: Table 6"
        )
    by_name = {r["model"]: r for r in rows}
    lines.append("\nThe paper's findings in this run:")
    for worse, better, claim in (
        ("plain56", "plain20", "degradation (the deeper plain net trains worse, Fig. 6 left)"),
        ("plain56", "resnet56", "residual learning (at 56 layers the ResNet trains better)"),
        ("resnet20", "resnet56", "deeper ResNets are better (Fig. 6 middle, Table 6)"),
        ("plain20", "resnet20", "residual learning at 20 layers"),
    ):
        if worse in by_name and better in by_name:
            lines.append(verdict(by_name[worse], by_name[better], claim))
    if args.budget == "cpu" and not {"resnet20", "resnet56"} <= set(by_name):
        lines.append(
            "- deeper ResNets are better (ResNet-56 ahead of ResNet-20, Table 6): not shown by this budget; the "
            "paper's curves cross after thousands of iterations: `reproduce study --budget full` on a GPU"
        )
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, argv: list[str], findings: Findings, runs: list[dict]) -> int:
    """The report's table and Fig. 6 of this study's runs, plus the study's own summary."""
    import mlflow

    from reproduce.io import atomic_write_text
    from reproduce.report.command import store_report, write_report
    from reproduce.report.tables import load_paper

    source = f"MLflow experiment `{args.experiment}` at {mlflow.get_tracking_uri()}"
    command = "reproduce study " + shlex.join(argv)
    written = write_report(runs, "cifar10", args.out, load_paper(), command, source)
    store_report(args.experiment, "cifar10", args.out, written, command)
    git = provenance.code_state()
    atomic_write_text(
        args.out / "study.md",
        f"# The depth study\n\nCommand: `{command}`\n\nCommit {git}; machine: "
        f"{provenance.machine()}\n\n```\n{findings.text}\n```\n",
    )
    names = ["study.md", *written]
    print(f"\nwrote {', '.join(str(args.out / n) for n in names)}")
    print(
        f"the table: {args.out / 'table.md'}; Fig. 6: {args.out / 'fig6.png'}; browse the runs with `mlflow ui` "
        '(experiment page, then "Model training")'
    )
    return 0
