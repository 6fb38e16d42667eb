"""The quick depth study, the suite's main job on a fresh machine (no GPU, no server):
plain and residual networks of 20 and 56 layers trained on CIFAR-10 with the paper's recipe
on a shortened schedule, each logged to MLflow, then one comparison table.

  reproduce study --data ../shared/data/cifar10-jpeg.tar.gz     (or set REPRODUCE_CIFAR10)

With no --data and no REPRODUCE_CIFAR10, CIFAR-10 is downloaded by torchvision into ./data.
At the default 150 iterations it shows the left half of the paper's Fig. 6: the deeper plain
net is far worse than the shallower one (results/quick-study.md). That deeper ResNets do better
needs a longer schedule (--iterations N; the paper's is 64000, a GPU job).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from reproduce import provenance

CONFIGS = provenance.CONFIGS / "cifar10"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reproduce study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("REPRODUCE_CIFAR10"),
                        help="CIFAR-10 source (batches folder, image tree or .tar.gz); default $REPRODUCE_CIFAR10, else download")
    parser.add_argument("--models", nargs="+", default=["plain20", "plain56", "resnet20", "resnet56"])
    parser.add_argument("--iterations", type=int, default=150, help="per model (paper: 64000); lr /10 at 50%% and 75%%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default="cifar10-quick")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run, e.g. data.workers=2")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # may follow --models
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    from reproduce import train
    from reproduce.config import ConfigError, load_config

    args = parse_args(argv)
    n = args.iterations
    common = [
        f"experiment={args.experiment}", f"seed={args.seed}", f"schedule.iterations={n}",
        f"schedule.milestones=[{n // 2},{3 * n // 4}]", f"eval.every={n}", f"run.checkpoint_every={max(1, n // 3)}",
        "eval.batch_size=500", "data.workers=0", "run.log_every=" + str(max(1, n // 50)),
    ]
    if args.data:
        common.append(f"data.path={args.data}")
    common += args.overrides
    configs = {}
    for name in args.models:
        path = CONFIGS / f"{name}.yaml"
        try:
            configs[name] = load_config(path, common)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for name, cfg in configs.items():
        print(f"\n== {name}: {n} iterations, batch {cfg.optim.batch_size}, {cfg.data.dataset} ==", flush=True)
        code = train.main(["--config", str(CONFIGS / f"{name}.yaml"), *common])
        if code != 0:
            return code
    print()
    print(summary_table(configs))
    return 0


def summary_table(configs: dict) -> str:
    """One row per model from its finished MLflow run."""
    import mlflow

    rows = []
    for name, cfg in configs.items():
        runs = mlflow.search_runs(
            experiment_names=[cfg.experiment], order_by=["attributes.start_time DESC"], max_results=1,
            filter_string=f"tags.`reproduce.recipe` = '{cfg.recipe_hash()}' and tags.`reproduce.seed` = '{cfg.seed}' "
                          "and attributes.status = 'FINISHED'",
        )
        if runs.empty:
            rows.append((name, "-", "-", "-", "no finished run"))
            continue
        run = runs.iloc[0]
        rows.append((name, f"{run['metrics.train_top1_err']:.2f}", f"{run['metrics.val_top1_err']:.2f}",
                     f"{run['metrics.test_top1_err']:.2f}", run["run_id"]))
    header = ("model", "train err %", "val err %", "test err %", "MLflow run id")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    iters = next(iter(configs.values())).schedule.iterations
    lines.append(f"\n(final iteration {iters}; train error over the last logging window, on augmented batches; "
                 f"test error on the single original view; browse the runs with `mlflow ui`)")
    return "\n".join(lines)
