"""results/reliability.md is built from the fault tests' docstrings and a JUnit report."""
from __future__ import annotations

from reproduce import reliability

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.test_faults" name="test_unreachable_tracking_server_is_refused_before_training" time="9.1"/>
<testcase classname="tests.test_faults" name="test_bad_dataset_archive_is_refused_before_training[empty]" time="0.2"/>
<testcase classname="tests.test_faults" name="test_bad_dataset_archive_is_refused_before_training[truncated]" time="0.3">
  <failure message="boom"/></testcase>
<testcase classname="tests.test_ffcv" name="test_files_prepared_otherwise_are_refused[overrides0-message0]" time="1.0">
  <skipped message="FFCV is not installed"/></testcase>
<testcase classname="tests.test_ffcv" name="test_round_trip_of_generated_images" time="3.0"/>
<testcase classname="tests.test_train" name="test_resume_is_bitwise" time="5.0"/>
</testsuite></testsuites>
"""


def test_every_fault_test_states_all_four_fields():
    stmts = reliability.statements()
    faults = [k for k in stmts if k.startswith("test_faults::")]
    assert len(faults) >= 13  # the eight faults, several with more than one test
    assert any(k.startswith("test_ffcv::") for k in stmts)
    for name, fields in stmts.items():
        assert set(fields) == set(reliability.FIELDS) and all(fields.values()), name
    assert "test_ffcv::test_round_trip_of_generated_images" not in stmts  # not a fault test


def test_table_from_a_junit_report(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    results = reliability.read_junit(report)
    assert set(results) == {"test_faults::test_unreachable_tracking_server_is_refused_before_training",
                            "test_faults::test_bad_dataset_archive_is_refused_before_training",
                            "test_ffcv::test_files_prepared_otherwise_are_refused",
                            "test_ffcv::test_round_trip_of_generated_images"}
    assert results["test_faults::test_bad_dataset_archive_is_refused_before_training"] == [
        ("empty", "passed", 0.2), ("truncated", "FAILED", 0.3)]
    out = tmp_path / "reliability.md"
    assert reliability.main(["--from-junit", str(report), "--out", str(out)]) == 1  # a failure is not hidden
    text = out.read_text()
    assert "| passed (9 s) |" in text and "empty: passed (0 s); truncated: FAILED (0 s)" in text
    assert "overrides0-message0: skipped (1 s)" in text and "| not run |" in text
    assert "- command: `python -m reproduce.reliability --from-junit" in text and "- commit: " in text
