"""Workflows call the activities' typed stubs (`workflows/steps.py`): the stubs are what the
worker registers, name and types (mypy then checks every call against them), and every stub is
called by some workflow."""

from __future__ import annotations

import ast
from pathlib import Path

from activities.registry import activities_for
from billing.runtime import Runtime
from starter.activity_stubs import STUBS, activity_name, render
from workflows import steps

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def test_the_stubs_are_the_registered_activities(runtime: Runtime) -> None:
    assert STUBS.read_text(encoding="utf-8") == render(activities_for(runtime)), (
        "workflows/steps.py is stale: run `python -m starter.activity_stubs`")


def test_a_changed_implementation_changes_the_stubs(runtime: Runtime) -> None:
    """The comparison above can fail: a registered activity missing from the stubs does."""
    registered = activities_for(runtime)
    assert render(registered[1:]) != render(registered)


def _stubs_named_by_workflows() -> set[str]:
    named = set()
    for path in WORKFLOWS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "steps"):
                named.add(node.attr)
    return named


def test_every_registered_activity_is_called_by_a_workflow(runtime: Runtime) -> None:
    registered = {activity_name(fn) for fn in activities_for(runtime)}
    stubs = {name for name in vars(steps) if name in registered}
    assert stubs == registered
    assert registered - _stubs_named_by_workflows() == set(), "registered but never called"
