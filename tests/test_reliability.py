"""results/reliability.md is built from the fault tests' docstrings and a JUnit report
(tools/reliability.py, a script outside the package, loaded here from its file)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("reliability", REPO / "tools" / "reliability.py")
reliability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reliability)

# The fault tests live in tests/test_faults.py or in the tests/test_faults_*.py it is split into:
# {FAULTS_A} / {FAULTS_B} are the modules that hold the two tests named below.
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.{FAULTS_A}" name="test_unreachable_tracking_server_is_refused_before_training" time="9.1"/>
<testcase classname="tests.{FAULTS_B}" name="test_bad_dataset_archive_is_refused_before_training[empty]" time="0.2"/>
<testcase classname="tests.{FAULTS_B}" name="test_bad_dataset_archive_is_refused_before_training[truncated]" time="0.3">
  <failure message="boom"/></testcase>
<testcase classname="tests.test_ffcv" name="test_files_prepared_otherwise_are_refused[overrides0-message0]" time="1.0">
  <skipped message="FFCV is not installed"/></testcase>
<testcase classname="tests.test_ffcv" name="test_round_trip_of_generated_images" time="3.0"/>
<testcase classname="tests.test_train" name="test_resume_is_bitwise" time="5.0"/>
</testsuite></testsuites>
"""
FAULT_KEY = re.compile(r"test_faults(_\w+)?::")


def _module_of(stmts: dict, test: str) -> str:
    (key,) = [k for k in stmts if k.endswith("::" + test)]
    return key.split("::")[0]


def test_every_fault_test_states_all_four_fields():
    stmts = reliability.statements()
    faults = [k for k in stmts if FAULT_KEY.match(k)]
    assert len(faults) >= 13  # the eight faults, several with more than one test
    assert any(k.startswith("test_ffcv::") for k in stmts)
    for name, fields in stmts.items():
        assert set(fields) == set(reliability.FIELDS) and all(fields.values()), name
    assert "test_ffcv::test_round_trip_of_generated_images" not in stmts  # not a fault test


def test_table_from_a_junit_report(tmp_path):
    stmts = reliability.statements()
    faults_a = _module_of(stmts, "test_unreachable_tracking_server_is_refused_before_training")
    faults_b = _module_of(stmts, "test_bad_dataset_archive_is_refused_before_training")
    assert FAULT_KEY.match(faults_a + "::") and FAULT_KEY.match(faults_b + "::")
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT.replace("{FAULTS_A}", faults_a).replace("{FAULTS_B}", faults_b))
    results = reliability.read_junit(report)
    assert set(results) == {
        f"{faults_a}::test_unreachable_tracking_server_is_refused_before_training",
        f"{faults_b}::test_bad_dataset_archive_is_refused_before_training",
        "test_ffcv::test_files_prepared_otherwise_are_refused",
        "test_ffcv::test_round_trip_of_generated_images",
    }
    assert results[f"{faults_b}::test_bad_dataset_archive_is_refused_before_training"] == [
        ("empty", "passed", 0.2),
        ("truncated", "FAILED", 0.3),
    ]
    out = tmp_path / "reliability.md"
    assert reliability.main(["--from-junit", str(report), "--out", str(out)]) == 1  # a failure is not hidden
    text = out.read_text()
    assert "| passed (9 s) |" in text and "empty: passed (0 s); truncated: FAILED (0 s)" in text
    assert "overrides0-message0: skipped (1 s)" in text and "| not run |" in text
    assert "- command: `python tools/reliability.py --from-junit" in text and "- commit: " in text


def _load_copy(root):
    """tools/reliability.py copied into a checkout-shaped folder `root`, loaded from there."""
    (root / "tools").mkdir()
    (root / "tools" / "reliability.py").write_text((REPO / "tools" / "reliability.py").read_text())
    spec = importlib.util.spec_from_file_location("reliability_copy", root / "tools" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fault_files_split_in_several_are_all_read(tmp_path):
    """After tests/test_faults.py is split into tests/test_faults_*.py, every test of each is a
    fault test, and the files are run whole; test_ffcv.py and test_sweep.py still count only
    their documented tests."""
    doc = '    """Fault: {0}\n    Injected: i\n    Suite: s\n    Lost: l"""\n'
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_faults_data.py").write_text(f"def test_a():\n{doc.format('a')}\n\ndef helper():\n    pass\n")
    (tests / "test_faults_train.py").write_text(f"def test_b():\n{doc.format('b')}\n\ndef test_c():\n    pass\n")
    (tests / "test_ffcv.py").write_text(f"def test_d():\n{doc.format('d')}\n\ndef test_e():\n    pass\n")
    (tests / "test_sweep.py").write_text("def test_f():\n    pass\n")
    (tests / "test_slurm.py").write_text("def test_g():\n    pass\n")
    copy = _load_copy(tmp_path)
    assert [s.name for s in copy.SUITES] == [
        "test_faults_data.py",
        "test_faults_train.py",
        "test_ffcv.py",
        "test_sweep.py",
        "test_slurm.py",
    ]
    stmts = copy.statements()
    assert list(stmts) == [
        "test_faults_data::test_a",
        "test_faults_train::test_b",
        "test_faults_train::test_c",
        "test_ffcv::test_d",
    ]
    assert stmts["test_faults_train::test_c"] == {}  # undocumented, yet a fault test: its row shows the gaps
    assert copy.node_ids(stmts) == [
        str(tests / "test_faults_data.py"),
        str(tests / "test_faults_train.py"),
        str(tests / "test_ffcv.py") + "::test_d",
    ]


def test_a_spurious_ast_systemerror_is_retried(monkeypatch):
    """CPython 3.11's AST constructor shares its recursion counter between threads, so a parse
    can fail once with "AST constructor recursion depth mismatch" (it did, mid-suite): the
    docstrings are still read. A SystemError that persists is not hidden."""
    real_parse, calls = reliability.ast.parse, []

    def flaky(source, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=129, after=149)")
        return real_parse(source, *args, **kwargs)

    monkeypatch.setattr(reliability.ast, "parse", flaky)
    stmts = reliability.statements()
    assert len(calls) > 1 and any(FAULT_KEY.match(k) for k in stmts)

    def broken(source, *args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch")

    monkeypatch.setattr(reliability.ast, "parse", broken)
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        reliability.statements()
