"""Run the fault-injection suite and write results/reliability.md from what happened.

  python -m reproduce.reliability [--out results/reliability.md] [pytest args...]

Every test in tests/test_faults.py states in its docstring the fault, how it is injected,
what the suite does and what is lost; this script runs the tests for real (pytest with a
JUnit report) and puts each statement beside the test's outcome and duration.
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

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "tests" / "test_faults.py"
FIELDS = ("Fault", "Injected", "Suite", "Lost")


def statements() -> dict[str, dict[str, str]]:
    """test name -> {Fault, Injected, Suite, Lost} from the docstrings of the suite."""
    out = {}
    for node in ast.parse(SUITE.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = ast.get_docstring(node) or ""
            fields = {}
            for line in doc.splitlines():
                key, _, text = line.partition(":")
                if key.strip() in FIELDS:
                    fields[key.strip()] = text.strip()
            out[node.name] = fields
    return out


def run_suite(extra: list[str]) -> dict[str, list[tuple[str, str, float]]]:
    """test name -> [(case id, outcome, seconds)] from a real pytest run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", str(SUITE), "-p", "no:cacheprovider", "-q",
                        f"--junitxml={report}", *extra], cwd=REPO)
        return read_junit(report)


def read_junit(report: Path) -> dict[str, list[tuple[str, str, float]]]:
    results: dict[str, list] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.get("classname", "").endswith("test_faults"):
            name = case.get("name", "")
            base, _, param = name.partition("[")
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
            results.setdefault(base, []).append((param.rstrip("]"), outcome, float(case.get("time", 0))))
    return results


def render(stmts, results, command: str, junit_command: str = "") -> str:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    lines = [
        "# Reliability: faults injected for real, and what was lost",
        "",
        "Each row is a test of `tests/test_faults.py` that injects the fault into real processes",
        "(torchrun jobs with gloo, a real `mlflow server`, real files) on CPU. The goal: never lose more",
        "than the work since the last checkpoint, never a silently wrong result, never a hung job.",
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
        "Not covered here: a .beton written with other settings than the config expects is refused by the",
        "FFCV loader's own checks (tests/test_ffcv.py).",
        "",
        "## Provenance",
        f"- command: `{command}`" + (f" (from the JUnit report of: `{junit_command}`)" if junit_command else ""),
        f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
        f"- host: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "reliability.md")
    parser.add_argument("--from-junit", type=Path, help="a JUnit XML of a pytest run that included tests/test_faults.py, "
                        "instead of running the suite again")
    args, extra = parser.parse_known_args(argv)
    command = "python -m reproduce.reliability" + (" " + " ".join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    results = read_junit(args.from_junit) if args.from_junit else run_suite(extra)
    text = render(statements(), results, command, "python -m pytest --junitxml=FILE" if args.from_junit else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)
    failed = [n for n, cases in results.items() for _, o, _ in cases if o in ("FAILED", "ERROR")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
