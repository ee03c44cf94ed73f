"""Deploy safety: every recorded history (tests/recorded_histories.py) replays on today's
workflow code. A change of command order in a workflow that may be running fails here; make it
with `workflow.patched` (README, "Versioning workflows") and record the histories again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from recorded_histories import HISTORIES, load, record
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker import SANDBOX, WORKFLOWS

FILES = sorted(HISTORIES.glob("*.json"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_a_recorded_history_replays(path: Path) -> None:
    data = load(path)
    history = WorkflowHistory.from_json(data["workflow_id"], json.dumps(data["history"]))
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=pydantic_data_converter,
                        workflow_runner=SANDBOX)
    await replayer.replay_workflow(history)


def test_every_workflow_type_has_a_recorded_history() -> None:
    recorded = {load(path)["workflow_type"] for path in FILES}
    assert recorded == {w.__name__ for w in WORKFLOWS}


@pytest.mark.skipif(not os.environ.get("RECORD_HISTORIES"),
                    reason="records the histories only with RECORD_HISTORIES=1")
async def test_record_histories(temporal_client: Client) -> None:
    """Runs last (conftest orders it): the histories of everything the suite ran."""
    tag = os.environ["RECORD_HISTORIES"]
    written = await record(temporal_client, [w.__name__ for w in WORKFLOWS],
                           "" if tag == "1" else tag)
    assert written >= 1


def test_a_nondeterministic_task_retries_while_a_bug_fails_the_workflow() -> None:
    """After a deploy that breaks replay, only the task fails (and retries until a fixed worker
    rolls out); a bug or a malformed payload in workflow code fails the workflow visibly."""
    from temporalio.workflow import NondeterminismError

    from workflows.common import FAIL_ON

    assert not any(issubclass(NondeterminismError, kind) for kind in FAIL_ON)
    for bug in (KeyError, TypeError, ValueError, AttributeError, IndexError, AssertionError):
        assert any(issubclass(bug, kind) for kind in FAIL_ON)
