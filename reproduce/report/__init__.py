"""`reproduce report` and `reproduce analyze`: the paper's tables and figures from the stored runs.

Modules, each importing only those above it:
  runs       the runs of a study, from MLflow or an export file; which of them make the table
  summary    per network n, mean and std over seeds; the paper's findings' margins and seed spread (paired by seed)
  tables     the table beside results/paper.csv, the provenance, table.md
  figures    Fig. 4 / Fig. 6 (depth curves) and Fig. 7 (layer responses), from the chosen runs
  command    `reproduce report` (main), writing the files above (and storing them in MLflow)
  listing    `reproduce runs`: every training run, one line each, from mlflow.search_runs
  responses  `reproduce analyze responses`: measures what Fig. 7 draws (needs no other module here)

Importing this package imports none of them (nor pandas, MLflow or matplotlib).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`reproduce report ...` (reproduce.report.command.main)."""
    from reproduce.report.command import main as report_main

    return report_main(argv)
