"""Every activity a workflow calls by name is one the worker registers, and every registered
activity is called by some workflow: workflows call activities by name (they import no I/O
module), so only this test ties the two together."""

from __future__ import annotations

import re
from pathlib import Path

from temporalio import activity

from billing.runtime import Runtime
from worker import activities_for
from workflows.org_sweep import ACTIVITIES

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
#: The helpers that take an activity name as their first argument.
CALLED = re.compile(
    r'\b(?:call|_call|_read|_read_unless_missing|_list|_step|_outcome|_clawback)\(\s*"([a-z_]+)"')


def called_by_workflows() -> set[str]:
    names = {name for path in WORKFLOWS.glob("*.py")
             for name in CALLED.findall(path.read_text(encoding="utf-8"))}
    return names | {name for pair in ACTIVITIES.values() for name in pair}


def test_workflows_call_only_registered_activities_and_every_one_is_called(
    runtime: Runtime,
) -> None:
    registered = {activity._Definition.must_from_callable(fn).name
                  for fn in activities_for(runtime)}
    called = called_by_workflows()
    assert called - registered == set(), "called but not registered"
    assert registered - called == set(), "registered but never called"
