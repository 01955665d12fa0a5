"""The suite itself: what CI and operators run it with must not break it."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_test_records_junit_properties() -> None:
    """``record_property`` warns under junit_family xunit2, and warnings are errors here:
    ``pytest --junitxml`` would turn such a test into an error. Print figures instead."""
    users = [
        str(path.relative_to(TESTS))
        for path in TESTS.rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.arg) and node.arg in {"record_property", "record_xml_attribute"}
    ]
    assert users == []
