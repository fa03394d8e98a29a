"""The S3 conformance suite (Ceph's s3-tests, read from ../shared/s3-tests) on a real cluster:
every test named in tests/s3_conformance/selection.txt must pass, but for those the suite
itself marks as failing on AWS. One pytest process runs the whole selection
(tests/s3_conformance/run.py); without the suite on this machine, this skips and says why.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from cluster import open_dir

_spec = importlib.util.spec_from_file_location("s3_conformance_run", Path(__file__).parent / "s3_conformance" / "run.py")
conformance = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # its dataclasses look there
_spec.loader.exec_module(conformance)


def test_selection_names_only_tests_of_the_suite_each_once():
    sel = conformance.read_selection()
    assert sel.selected and all(reason for reason in sel.left_out.values())
    suite = conformance.suite_dir()
    if suite is None:
        pytest.skip("no ../shared/s3-tests beside the repository: the selection is not checked")
    tests = conformance.suite_tests(suite)
    named = set(sel.selected) | set(sel.left_out)
    assert not named - set(tests), f"not tests of the suite: {sorted(named - set(tests))[:10]}"
    assert not set(tests) - named, f"tests neither selected nor left out: {sorted(set(tests) - named)[:10]}"


def test_s3_conformance_selection_passes():
    suite = conformance.suite_dir()
    if suite is None:
        pytest.skip("S3 conformance suite skipped: no ../shared/s3-tests beside the repository "
                    "(set MINIKV_S3_TESTS to its folder)")
    pytest.importorskip("munch", reason="the suite's dependencies are missing: ./dev test installs them")
    work = open_dir()
    try:
        result = conformance.run(suite, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    selected = conformance.read_selection().selected
    missing = [n for n in selected if n not in result.outcomes]
    print(f"s3 conformance: {len(result.passed())} of {len(selected)} selected tests passed")
    assert not missing, f"selected tests that did not run: {missing[:10]}\n{result.output[-3000:]}"
    assert not result.broken(), f"failed: {result.broken()}\n{result.output[-6000:]}"
