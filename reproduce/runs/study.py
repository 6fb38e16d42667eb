"""The depth study, the suite's main job: plain against residual networks on CIFAR-10 (the
paper's Fig. 6 and Table 6), sized to the machine it runs on.

  reproduce study --data ../shared/data/cifar10-jpeg.tar.gz     (or set REPRODUCE_CIFAR10)
  reproduce study --budget full --data /data/cifar-10-batches-py   (a GPU: Table 6 at the paper's schedule)

--budget cpu (the default without a CUDA GPU): sized to --minutes (10): it first times a few steps,
an evaluation and a checkpoint of one network per depth (bench/plan.py's measure, a few seconds
each, counted in the budget), then picks the iterations, seeds and networks that fill the rest
(size_study): at least plain-20, plain-56 and ResNet-56, two seeds, 80 iterations; more iterations,
then up to 4 seeds, where the machine is fast; ResNet-20 too where the budget holds
THIRD_ITERATIONS iterations of all four. A budget too small for the minimum is refused in one
line, with the minutes it would take. Precedence: --iterations given skips the measuring and the
sizing (its old behaviour: seeds 0 1, the three networks); --seeds and --models given are kept and the
sizing fills in the rest. The runs follow the paper's recipe (batch 128, SGD momentum 0.9, weight
decay 1e-4; all 50k training images, as no validation error is read) at the rate the paper starts its deepest CIFAR net with, lr 0.01 (§4.2: for
ResNet-110 "0.1 is slightly too large to start converging"; on the JPEG copy of CIFAR-10 our
56-layer nets at 0.1 stayed at chance for their first 160 (ResNet) and 400 (plain) iterations,
results/quick-study.md). It compares training error, as the paper's dashed curves do, averaged
over the last fifth of the run, and says for each of the paper's findings whether this run
shows it by a margin larger than the seed-to-seed spread (of the per-seed differences: a seed fixes
the batches, whatever the network): the deeper plain net is worse than the shallower one
(degradation), and at the same depth the residual net is better. That a deeper ResNet beats a
shallower one needs ResNet-20 and about THIRD_ITERATIONS iterations; the output says whether this
budget showed it, and which budget would.

--budget full (the default with a CUDA GPU): the paper's full recipe for plain and ResNet
20/32/44/56/110 (64k iterations; ResNet-110 with its warm-up), seed 0, four runs at a time
sharing the GPU (`reproduce sweep --parallel 4`, CIFAR-10 held on the GPU, bf16, channels_last,
CUDA graphs).

Both end with `reproduce report`'s table (ours beside the paper's numbers) and Fig. 6, written
to --out. In MLflow the study is one parent run (tag reproduce.kind=study, named study-<models>)
with its training runs nested under it; it holds those files, the summary over seeds as metrics
(per network <model>/train_err_mean, _std, test_err_mean, _std, n; per finding
margin/<worse>-<better>/train_err and _spread) and the tables as its description. Running the
study again (resumed, or with more --seeds) reuses that parent run. With no --data and no
REPRODUCE_CIFAR10, torchvision downloads CIFAR-10 into ./data.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reproduce import provenance
from reproduce.errors import ArgumentParser, Refused, command

CONFIGS = provenance.CONFIGS / "cifar10"
CPU_MODELS = ["plain20", "plain56", "resnet56"]
FULL_MODELS = [f"{net}{depth}" for depth in (20, 56, 32, 44, 110) for net in ("resnet", "plain")]
THIRD_MODELS = [*CPU_MODELS, "resnet20"]  # ResNet-56 ahead of ResNet-20: the third finding
MIN_ITERATIONS, MIN_SEEDS, MAX_SEEDS = 80, 2, 4
# The run length from which the study shows ResNet-56 ahead of ResNet-20 at lr 0.01 on this data.
# Measured (results/plan/crossing.md, 2 seeds x 3,000 iterations): the curves cross at 525 and 975
# iterations; the last-fifth margin beats the spread of the per-seed differences from 1,050 on at
# every length measured (1.5 against 0.3 points at 1,050; 1.0 against 0.4 at 3,000), never the
# unpaired spread. 1,500 leaves room for more seeds, whose range of differences is wider.
THIRD_ITERATIONS = 1500
PAPER_ITERATIONS = 64000
RUN_OVERHEAD_S = 5.0  # per run, not in the projection: process start-up, MLflow, logging
REPORT_S = 15.0  # the end: MLflow read once, the report's table and Fig. 6
MEASURE = argparse.Namespace(warmup=1, steps=2, repeats=2)  # bench/plan.py's timing: a few seconds a network


class StudyRefused(Refused, ValueError):
    """A study that cannot run as asked (a budget too small for its minimum); one line."""


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
    parser.add_argument("--seeds", nargs="+", type=int, help="default: sized to --minutes (cpu), 0 (full)")
    parser.add_argument(
        "--minutes",
        type=float,
        help="cpu budget: wall time to fill, measuring included (default 10): iterations, seeds and networks "
        "are sized to it. Precedence: --iterations skips the sizing; --seeds / --models given are kept",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        help="cpu budget: iterations per run at lr 0.01, no measuring or sizing (then seeds 0 1 and the three "
        "networks unless given; the paper's whole schedule is 64000)",
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
    if not cpu and args.minutes is not None:
        parser.error("--minutes sizes the cpu budget; --budget full runs the paper's schedule")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be above 0, got {args.minutes:g}")
    args.sized = cpu and args.iterations is None  # sized to --minutes after measuring (main)
    args.minutes = args.minutes or 10.0
    args.fixed = {"models": args.models, "seeds": args.seeds}  # what the sizing keeps
    args.iterations = args.iterations or MIN_ITERATIONS
    args.sizing_note = ""
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
    from reproduce.runs import parent, sweep

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if problem := unknown_model(args.models) or _out_problem(args.out):  # before any training
        print(f"error: {problem}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    try:
        common, configs = _configs(args)
        if args.sized:  # measure here, size to what is left of --minutes, then the recipe of that size
            sizing = size_study(measure_costs(args, common), args.minutes * 60 - (time.perf_counter() - began))
            _apply(args, sizing)
            common, configs = _configs(args, common[-2:])
    except Refused as err:
        print(f"error: {err}", file=sys.stderr)
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
    runs = parent.open_parents(runs, "study", "reproduce study " + shlex.join(argv))  # the runs nest under it
    code = sweep.run(runs, args.parallel if args.budget == "full" else 1)
    if code not in (0, 1):  # refused before training (2) or stopped on request (143): nothing to compare
        parent.end_parent(runs[0].parent, "KILLED")  # as its runs; the same command opens it again
        return code
    # A failed run (1) leaves the others: the table shows them, and a finding that needs it says
    # "not measured"; the exit status still says that a run failed.
    parent_id = runs[0].parent
    runs = study_runs(args, configs)  # MLflow is read once, for the findings, the report and the parent run
    findings = compare(args, configs, runs)
    print()
    print(findings.text)
    return write_outputs(args, argv, findings, runs, parent_id) or code


def _configs(args: argparse.Namespace, numerics: list[str] | None = None) -> tuple[list[str], dict]:
    """What every run gets (numerics decided once on a CPU, or those given) and each network's config;
    a bad override is a ConfigError (one line), before any measuring or training."""
    from reproduce.config import ConfigError, load_config

    common = run_overrides(args)
    if args.budget == "cpu":
        common += numerics or numerics_for(args, common)
    configs = {}
    for name in args.models:
        try:
            configs[name] = load_config(CONFIGS / f"{name}.yaml", common)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    return common, configs


@dataclass(frozen=True)
class Cost:
    """One run of a network here: seconds whatever its length (setup, evaluations, checkpoints, start-up)
    plus seconds per iteration."""

    fixed_s: float
    step_s: float

    def seconds(self, iterations: int) -> float:
        return self.fixed_s + iterations * self.step_s


@dataclass(frozen=True)
class Sizing:
    models: list[str]
    seeds: list[int]
    iterations: int
    seconds: float  # projected, training runs only
    note: str  # what this budget shows, and which budget would show the rest


def _total(costs: dict[str, Cost], models: list[str], seeds: int, iterations: int) -> float:
    return seeds * sum(costs[m].seconds(iterations) for m in models)  # one run at a time


def _fit(costs: dict[str, Cost], models: list[str], seeds: int, budget_s: float) -> int:
    """The most iterations (a multiple of 10, at most the paper's schedule) that `seeds` x `models` fit in."""
    left = budget_s / seeds - sum(costs[m].fixed_s for m in models)
    n = int(left / max(sum(costs[m].step_s for m in models), 1e-9)) // 10 * 10
    return max(0, min(n, PAPER_ITERATIONS))


def size_study(costs: dict[str, Cost], budget_s: float, models=None, seeds=None) -> Sizing:
    """The study that fills `budget_s` seconds, given each network's measured Cost (pure). The third
    finding's four networks at THIRD_ITERATIONS or more where they fit, else the three networks at
    MIN_ITERATIONS or more; seeds from MIN_SEEDS to MAX_SEEDS, one more for each doubling of the
    iterations over that floor. Given `models` or `seeds` are kept. StudyRefused when even the
    minimum does not fit."""
    options = [(models, MIN_ITERATIONS)] if models else [(THIRD_MODELS, THIRD_ITERATIONS), (CPU_MODELS, MIN_ITERATIONS)]
    for nets, floor in options:
        for s in [len(seeds)] if seeds else range(MAX_SEEDS, MIN_SEEDS - 1, -1):
            n = _fit(costs, nets, s, budget_s)
            if n >= (floor if seeds else floor * 2 ** (s - MIN_SEEDS)):  # a seed more per doubling
                chosen = list(seeds) if seeds else list(range(s))
                return Sizing(list(nets), chosen, n, _total(costs, nets, s, n), _note(costs, nets, s, n, floor))
    nets, s = models or CPU_MODELS, len(seeds) if seeds else MIN_SEEDS
    need = _total(costs, nets, s, MIN_ITERATIONS) + REPORT_S
    raise StudyRefused(
        f"--minutes: {budget_s / 60:.1f} min left after measuring is too small for the smallest study here "
        f"({len(nets)} networks x {s} seeds x {MIN_ITERATIONS} iterations: {need / 60:.1f} min); give --minutes "
        f"{math.ceil((need + 60) / 60)} or more, or --iterations N"
    )


def _note(costs: dict[str, Cost], nets: list[str], seeds: int, n: int, floor: int) -> str:
    """What the sized study can show, and the budget that would show the third finding where it cannot."""
    slow = (
        f"this machine fits only about the minimum in this budget ({n} iterations); " if n < 2 * MIN_ITERATIONS else ""
    )
    if {"resnet20", "resnet56"} <= set(nets) and n >= THIRD_ITERATIONS:
        return slow + f"ResNet-20 included: {n} iterations, past the {THIRD_ITERATIONS} that showed it here"
    if not set(THIRD_MODELS) <= set(costs):
        return slow + "the third finding needs resnet20 and resnet56 in --models"
    need = _total(costs, THIRD_MODELS, MIN_SEEDS, THIRD_ITERATIONS) + REPORT_S + 60  # + measuring
    return slow + (
        f"the third finding (ResNet-56 ahead of ResNet-20) needs ResNet-20 and about {THIRD_ITERATIONS} "
        f"iterations: `--minutes {math.ceil(need / 60)}` on this machine, or `--budget full` on a GPU"
    )


def _apply(args: argparse.Namespace, sizing: Sizing) -> None:
    args.models, args.seeds, args.iterations, args.sizing_note = (
        sizing.models,
        sizing.seeds,
        sizing.iterations,
        sizing.note,
    )
    print(
        f"sized to --minutes {args.minutes:g}: {len(sizing.models)} networks x {len(sizing.seeds)} seeds x "
        f"{sizing.iterations} iterations, about {sizing.seconds / 60:.1f} min of training; {sizing.note}",
        flush=True,
    )


def measure_costs(args: argparse.Namespace, common: list[str]) -> dict[str, Cost]:
    """Each candidate network's Cost here: bench/plan.py's measure (a few steps on the real input,
    an evaluation, a checkpoint, the setup) of one network per depth, projected (bench/projection.py)
    over this study's evaluations and checkpoints."""
    from reproduce import distributed
    from reproduce.bench.plan import measure
    from reproduce.bench.projection import AllReduce, dataset_sizes, job_of, project
    from reproduce.config import load_config
    from reproduce.data import build_data
    from reproduce.models import MODELS

    info, rates, costs, data = distributed.setup("cpu"), {}, {}, None
    for name in args.fixed["models"] or THIRD_MODELS:
        cfg = load_config(CONFIGS / f"{name}.yaml", common)
        if data is None:
            start = time.perf_counter()
            data = build_data(cfg)
            data_s = time.perf_counter() - start
        depth = MODELS[name].depth
        if depth not in rates:  # plain and residual nets of one depth cost the same
            rates[depth] = measure(cfg, data, data_s, info, MEASURE)
            print(f"measured {name}: {rates[depth].images_per_sec:.0f} images/s (depth {depth})", flush=True)
        row = project(job_of(cfg, name, *dataset_sizes(cfg, data), 0), rates[depth], 1, 1, AllReduce(0.0, None, ""))
        costs[name] = Cost(row["wall_s"] - row["train_s"] + RUN_OVERHEAD_S, row["step_s"])
    return costs


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
    from reproduce.runs.parent import recipe_runs

    return recipe_runs(args.experiment, "cifar10", {cfg.recipe_hash() for cfg in configs.values()})


def compare(args: argparse.Namespace, configs: dict, runs: list[dict]) -> Findings:
    """One row per model from its finished runs among `runs` (n, mean and std over seeds: the
    report's summary, reproduce/report/summary.py), then the paper's findings, each as shown or not."""
    from reproduce.report import summary
    from reproduce.report.runs import select_runs
    from reproduce.report.tables import load_paper, paper_reference

    paper = load_paper()
    groups = {g.key[0]: g for g in select_runs(runs, "cifar10").main}
    networks, _ = summary.summarize([groups[name] for name in configs if name in groups])
    by_model = {n.model: n for n in networks}
    rows = []
    for name, cfg in configs.items():
        net = by_model.get(name) or summary.Network(name, name, [], [], [])
        # The report's reference: the paper's mean of 5 runs where it gives one (ResNet-110), not its best.
        shortcut = cfg.model.shortcut.value if cfg.model.shortcut else ""
        ref = paper_reference(paper, (name, shortcut, None, "single"), "test_top1_err")["reference"]
        rows.append({"model": name, "network": net, "n": net.n, "paper": ref, "run_ids": net.run_ids})
    return Findings(rows, render(args, rows))


def verdict(finding) -> str:
    """Whether the finding (summary.Finding) is shown: the worse network trains to a higher error
    than the better one by more than the seed-to-seed spread (summary.py: of the per-seed differences
    where the runs pair by seed, else the larger range of the two networks)."""
    claim, worse, better = finding.claim, finding.worse, finding.better
    (margin, spread), w, b = finding.margin("train"), worse.stats("train")[0], better.stats("train")[0]
    if math.isnan(margin):
        return f"- {claim}: not measured (a run did not finish)"
    said = f"{worse.model} {w:.1f}% vs {better.model} {b:.1f}% training error, a margin of {margin:.1f} points"
    if math.isnan(spread):
        return f"- {claim}: {said}; one seed, so no spread to hold it against (use --seeds 0 1)"
    against = (
        f"the spread of its {len(finding.pairs('train'))} per-seed differences, {spread:.1f}"
        if finding.paired()
        else f"a seed-to-seed spread of {spread:.1f}"
    )
    return f"- {claim}: {'SHOWN' if finding.shown else 'NOT shown'}: {said} against {against}"


def _table(rows: list[dict]) -> list[str]:
    def cell(net, error: str) -> str:
        mean, std, _ = net.stats(error)
        return "-" if math.isnan(mean) else f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")

    header = ("model", "n", "train err %", "test err %", "paper test err %", "MLflow run ids")
    table = [header] + [
        (
            r["model"],
            str(r["n"]),
            cell(r["network"], "train"),
            cell(r["network"], "test"),
            "-" if math.isnan(r["paper"]) else f"{r['paper']:.2f}",
            " ".join(r["run_ids"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render(args: argparse.Namespace, rows: list[dict]) -> str:
    from reproduce.report import summary

    lines = _table(rows)
    if args.budget == "cpu":
        lines.append(
            f"\nours: after {args.iterations} iterations of 64,000 at lr 0.01, mean ± sample std over seeds; train error "
            f"is the mean over the last {summary.LAST_FRACTION:.0%} of the run on augmented batches; test error on "
            "at most 2,000 test images (eval.max_images; single view). The paper's column is the end of its full schedule (Table 6; it gives "
            "no number for plain nets): it is there for scale, not as a target for a run this short."
        )
    else:
        lines.append(
            "\nours: the paper's full schedule, mean ± sample std over seeds; test error on the 10,000 test images "
            "(single view); paper: Table 6"
        )
    by_model = {r["model"]: r["network"] for r in rows}
    lines.append("\nThe paper's findings in this run:")
    lines += [verdict(f) for f in summary.findings(list(by_model.values()))]
    if args.budget == "cpu" and not {"resnet20", "resnet56"} <= set(by_model):
        lines.append(
            "- deeper ResNets are better (ResNet-56 ahead of ResNet-20, Table 6): not shown by this budget; the "
            "paper's curves cross after thousands of iterations: `reproduce study --budget full` on a GPU"
        )
    if args.sizing_note:
        lines.append(f"\nsized to --minutes {args.minutes:g} on this machine: {args.sizing_note}")
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, argv: list[str], findings: Findings, runs: list[dict], parent: str) -> int:
    """The report's table and Fig. 6 of this study's runs, plus the study's own summary, in --out
    and in the study's parent MLflow run (its artifacts, metrics and description)."""
    import mlflow

    from reproduce.io import atomic_write_text
    from reproduce.report.command import write_report
    from reproduce.report.tables import load_paper
    from reproduce.runs.parent import report_to_parent

    source = f"MLflow experiment `{args.experiment}` at {mlflow.get_tracking_uri()}"
    command = "reproduce study " + shlex.join(argv)
    written = write_report(runs, "cifar10", args.out, load_paper(), command, source)
    git = provenance.code_state()
    atomic_write_text(
        args.out / "study.md",
        f"# The depth study\n\nCommand: `{command}`\n\nCommit {git}; machine: "
        f"{provenance.machine()}\n\n```\n{findings.text}\n```\n",
    )
    names = ["study.md", *written]
    head = f"The depth study `{command}` (commit {git}): its training runs are nested under this run."
    report_to_parent(parent, runs, "cifar10", args.out, names, head)
    print(f"\nwrote {', '.join(str(args.out / n) for n in names)}")
    print(f"stored in MLflow: the study's run {parent} (experiment `{args.experiment}`, its runs nested under it)")
    print(
        f"the table: {args.out / 'table.md'}; Fig. 6: {args.out / 'fig6.png'}; browse them with `mlflow ui` "
        '(experiment page, "Model training", the run named study-...)'
    )
    return 0
