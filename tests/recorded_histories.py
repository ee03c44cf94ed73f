"""Workflow histories recorded from a real run of the suite, replayed by `test_replay.py` so that
a change that breaks the replay of a running workflow fails CI before it reaches a deploy.

Record them with `RECORD_HISTORIES=1 .venv/bin/python -m pytest`: at the end of the session one
completed history per workflow type (and per Stripe event type) is written to
`tests/histories/`. After a patched change (`workflow.patched`), keep the histories of the old
path and add the new one's beside them: `RECORD_HISTORIES=<patch id>` suffixes the file names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHistory

from billing.stripe.events import DISPUTE_TYPES, REFUND_TYPES
from workflows.search import STRIPE_EVENT_TYPE

HISTORIES = Path(__file__).parent / "histories"
#: At most this many Stripe event types (and waited variants) get a history of their own (19
#: types are handled).
STRIPE_KINDS = 40
CLAWBACK_TYPES = REFUND_TYPES | DISPUTE_TYPES


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _waited(history: WorkflowHistory) -> bool:
    return any(e.HasField("timer_started_event_attributes") for e in history.events)


async def record(client: Client, workflow_types: list[str], tag: str = "") -> int:
    """Write one completed history per workflow type, and one per Stripe event type; `tag`
    (a patch id) is added to the file names. A refund or dispute also gets one of a run that
    waited for its purchase (`<type>-waited`), if the suite ran one: such runs are the likeliest
    to be open at a deploy."""
    HISTORIES.mkdir(exist_ok=True)
    written = 0
    for workflow_type in workflow_types:
        seen: set[str] = set()
        query = f'WorkflowType="{workflow_type}" AND ExecutionStatus="Completed"'
        async for execution in client.list_workflows(query, limit=2000):
            kind = execution.typed_search_attributes.get(STRIPE_EVENT_TYPE) or ""
            waits = kind in CLAWBACK_TYPES and f"{kind}-waited" not in seen
            if (kind in seen and not waits) or len(seen) >= STRIPE_KINDS:
                continue
            history = await client.get_workflow_handle(
                execution.id, run_id=execution.run_id).fetch_history()
            if kind in seen or (waits and _waited(history)):
                if not _waited(history):
                    continue
                kind = f"{kind}-waited"
            seen.add(kind)
            name = f"{workflow_type}{'-' + kind if kind else ''}{'@' + tag if tag else ''}.json"
            (HISTORIES / name).write_text(json.dumps({
                "workflow_id": execution.id, "workflow_type": workflow_type,
                "history": json.loads(history.to_json()),
            }, indent=None), encoding="utf-8")
            written += 1
            if workflow_type != "StripeEventWorkflow":
                break
    return written
