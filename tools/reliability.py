"""Run the fault-injection suite and write results/reliability.md from what happened.

  python tools/reliability.py [--out results/reliability.md] [--from-junit FILE] [pytest args...]

Every test of tests/test_faults*.py, and the fault tests of tests/test_ffcv.py (.beton files)
, tests/test_sweep.py (parallel sweeps) and tests/test_slurm.py (scancel on a real cluster), states in its
docstring the fault, how it is injected, what the suite does and what is lost; this script
runs those tests for real (pytest with a JUnit report) and puts each statement beside the
test's outcome and duration.

This script is not part of the installed package; it uses the checkout's `reproduce`
(its provenance and atomic writes), found from the script's own location.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # this checkout (tools/..): tests/, results/, reproduce/
FIELDS = ("Fault", "Injected", "Suite", "Lost")
COMMAND = "python tools/reliability.py"


# Every test of a test_faults*.py file is a fault test (test_faults.py, or the files it was
# split into); test_ffcv.py and test_sweep.py hold some among others, known by their docstrings.
FAULT_SUITES = tuple(sorted((REPO / "tests").glob("test_faults*.py")))
SUITES = (*FAULT_SUITES, *(REPO / "tests" / f"{name}.py" for name in ("test_ffcv", "test_sweep", "test_slurm")))


def _parse(source: str) -> ast.Module:
    """ast.parse, retried: CPython 3.11 keeps the AST constructor's recursion counter per
    interpreter, not per thread, so a parse that races another thread's (a library's background
    thread in the same pytest process) can fail with a spurious "SystemError: AST constructor
    recursion depth mismatch" (python/cpython#106905). The counter is reset on each call."""
    for attempt in range(3):
        try:
            return ast.parse(source)
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _tests(suite: Path) -> list[ast.FunctionDef]:
    return [n for n in _parse(suite.read_text()).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def statements() -> dict[str, dict[str, str]]:
    """test name -> {Fault, Injected, Suite, Lost} from the docstrings of the suites: every
    test of the test_faults*.py files, and those of the other files whose docstring names a Fault."""
    out = {}
    for suite in SUITES:
        for node in _tests(suite):
            fields = {}
            for line in (ast.get_docstring(node) or "").splitlines():
                key, _, text = line.partition(":")
                if key.strip() in FIELDS:
                    fields[key.strip()] = text.strip()
            if suite in FAULT_SUITES or "Fault" in fields:
                out[f"{suite.stem}::{node.name}"] = fields
    return out


def node_ids(stmts: dict) -> list[str]:
    """pytest node ids of the documented tests: whole files where every test is one."""
    whole = [s for s in SUITES if sum(k.startswith(s.stem + "::") for k in stmts) == len(_tests(s))]
    return [str(s) for s in whole] + [
        str(REPO / "tests" / f"{k.split('::')[0]}.py") + "::" + k.split("::")[1]
        for k in stmts
        if not any(k.startswith(s.stem + "::") for s in whole)
    ]


def run_suite(stmts: dict, extra: list[str]) -> dict[str, list[tuple[str, str, float]]]:
    """ "file::test" -> [(case id, outcome, seconds)] from a real pytest run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *node_ids(stmts),
                "-p",
                "no:cacheprovider",
                "-q",
                f"--junitxml={report}",
                *extra,
            ],
            cwd=REPO,
        )
        return read_junit(report)


def read_junit(report: Path) -> dict[str, list[tuple[str, str, float]]]:
    results: dict[str, list] = {}
    stems = {s.stem for s in SUITES}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rpartition(".")[2]
        if module in stems:
            base, _, param = case.get("name", "").partition("[")
            base = f"{module}::{base}"
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
            results.setdefault(base, []).append((param.rstrip("]"), outcome, float(case.get("time", 0))))
    return results


def render(stmts, results, command: str, junit_command: str = "") -> str:
    git = _reproduce().provenance.git_state(REPO)
    faults = ", ".join(f"`tests/{s.name}`" for s in FAULT_SUITES)
    lines = [
        "# Reliability: faults injected for real, and what was lost",
        "",
        f"Each row is a test of {faults} (for FFCV files `tests/test_ffcv.py`, for parallel",
        "sweeps `tests/test_sweep.py`) that injects the fault into real processes (torchrun jobs with gloo,",
        "a real `mlflow server`, real files) on CPU. The goal: never lose more than the work since the last checkpoint, never a",
        "silently wrong result, never a hung job.",
        "",
        "| fault | injected | what the suite did | lost | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, fields in stmts.items():
        cases = results.get(name, [])
        if not cases:
            outcome = "not run"
        else:
            outcome = "; ".join(f"{(p + ': ') if p else ''}{o} ({t:.0f} s)" for p, o, t in cases)
        row = [fields.get(k, "").replace("|", "\\|") for k in FIELDS]
        lines.append(f"| {' | '.join(row)} | {outcome} |")
    lines += [
        "",
        "## Provenance",
        f"- command: `{command}`" + (f" (from the JUnit report of: `{junit_command}`)" if junit_command else ""),
        f"- commit: {git.commit}{' (with uncommitted changes)' if git.dirty else ''}",
        f"- host: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
    ]
    return "\n".join(lines)


def _reproduce():
    """The checkout's `reproduce` package (provenance, io), put on sys.path on first use: the
    script runs from tools/, which is what `python tools/reliability.py` puts there."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import reproduce.io
    import reproduce.provenance

    return reproduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "reliability.md")
    parser.add_argument(
        "--from-junit",
        type=Path,
        help="a JUnit XML of a pytest run that included tests/test_faults*.py, "
        "test_ffcv.py and test_sweep.py, instead of running the suite again",
    )
    args, extra = parser.parse_known_args(argv)
    command = COMMAND + (" " + " ".join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    stmts = statements()
    results = read_junit(args.from_junit) if args.from_junit else run_suite(stmts, extra)
    text = render(stmts, results, command, "python -m pytest --junitxml=FILE" if args.from_junit else "")
    _reproduce().io.atomic_write_text(args.out, text)
    print(text)
    failed = [n for n, cases in results.items() for _, o, _ in cases if o in ("FAILED", "ERROR")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
