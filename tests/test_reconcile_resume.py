"""A reconciliation page whose activity attempt fails half-way resumes from its heartbeat.

The engine runs on a database of its own (so the page holds exactly the organizations made
here) with a named MongoDB client: a `failCommand` fail point fails the fourth organization's
snapshot read, and a command listener counts what each attempt read.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from faults import fail_point, runtime_on
from pymongo import monitoring
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from test_query_shapes import index_backed

from billing.clock import utcnow
from billing.config import BillingConfig
from billing.metering import UsageRequest
from billing.models import ReconcileReport
from billing.runtime import Runtime
from billing.store.accounts import Accounts
from billing.store.database import Database
from billing.store.meters import Meters
from worker import build_worker
from workflows.reconcile import ReconcileWorkflow

APP_NAME = "billing-reconcile-resume"


class OrgReads(monitoring.CommandListener):
    """Per organization: the ledger chunks read (`seq` ranges) and the snapshots begun (the
    week's meter read, one per snapshot); and every read's filter."""

    def __init__(self) -> None:
        self.chunks: Counter[tuple[str, int]] = Counter()
        self.snapshots: Counter[str] = Counter()
        self.filters: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command: dict[str, Any] = event.command
        if event.command_name == "find":
            self.filters.append((command["find"], command.get("filter") or {}))
        elif event.command_name == "aggregate":
            self.filters.append((command["aggregate"], command["pipeline"][0].get("$match", {})))
        if event.command_name == "find" and command.get("find") == "ledger":
            query = command.get("filter") or {}
            upto = (query.get("seq") or {}).get("$lte")
            if upto is not None:
                self.chunks[(query["org_id"], upto)] += 1
        elif event.command_name == "find" and command.get("find") == "meters":
            self.snapshots[command["filter"]["org_id"]] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def attempts(client: Client, workflow_id: str, activity_type: str) -> list[int]:
    """The attempt number of each started attempt of `activity_type` that the history records
    (a retried activity records only its last started attempt)."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    scheduled = {e.event_id for e in history.events
                 if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                 and e.activity_task_scheduled_event_attributes.activity_type.name
                 == activity_type}
    return [e.activity_task_started_event_attributes.attempt for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and e.activity_task_started_event_attributes.scheduled_event_id in scheduled]


async def test_a_failed_attempt_resumes_after_the_organizations_it_finished(
    stripe_runtime: Runtime, temporal_client: Client, db: Database, config: BillingConfig,
) -> None:
    reads = OrgReads()
    suffix = uuid.uuid4().hex[:8]
    engine = runtime_on(stripe_runtime, mongodb_db=f"billing_resume_{suffix}",
                        temporal_task_queue=f"billing-resume-{suffix}",
                        client_options={"appname": APP_NAME, "event_listeners": [reads]})
    setup = Database(engine.settings.mongodb_uri, engine.settings.mongodb_db)
    orgs = [f"res-{i}-{suffix}" for i in range(6)]
    try:
        await setup.ensure_indexes()
        accounts, meters = Accounts(setup, config), Meters(setup, config)
        for org in orgs:
            await accounts.register(org, utcnow())  # a 500-unit grant on the free plan
            for run in range(3):
                await meters.record(UsageRequest(org_id=org, run_id=f"run-{run}", units=100),
                                    utcnow())
        # One divergent organization before the failure, one after it.
        await setup.accounts.update_one({"_id": orgs[1]}, {"$inc": {"balance": 7}})
        await setup.accounts.update_one({"_id": orgs[4]}, {"$inc": {"lots.0.remaining": -100}})

        workflow_id = f"reconcile-resume-{suffix}"
        # The commits before the fourth organization's snapshot: three snapshots and the
        # notification of the divergence found on the second organization.
        async with build_worker(temporal_client, engine), fail_point(
                db, app_name=APP_NAME, commands=["commitTransaction"], skip=4, times=1,
                error_code=8):
            report: ReconcileReport = await temporal_client.execute_workflow(
                ReconcileWorkflow.run, id=workflow_id,
                task_queue=engine.settings.temporal_task_queue)

        # The page's activity failed once (the fourth snapshot) and its retry finished it.
        assert await attempts(temporal_client, workflow_id, "reconcile_org_page") == [2]
        assert [reads.snapshots[org] for org in orgs] == [1, 1, 1, 2, 1, 1]
        # No ledger chunk was read twice, not even the failed organization's: it was carried.
        assert set(reads.chunks) >= {(org, 4) for org in orgs}
        assert [k for k, n in reads.chunks.items() if n > 1] == []
        # Every read is an index lookup (the first page of accounts walks the `_id` index).
        assert [(c, q) for c, q in reads.filters
                if not index_backed(c, q) and (c, q) != ("accounts", {})] == []
        # The report is that of an uninterrupted run.
        assert report.counts.orgs == 6
        assert (report.counts.ledger_divergent, report.counts.meter_divergent) == (2, 0)
        assert sorted((d.org_id, d.kind, d.expected, d.actual) for d in report.divergences) == [
            (orgs[1], "balance_vs_entries", 200, 207), (orgs[1], "balance_vs_lots", 200, 207),
            (orgs[4], "balance_vs_lots", 100, 200), (orgs[4], "lot_remaining", 200, 100)]
        notes = [(n["org_id"], n["payload"]["check"]) async for n in setup.notifications.find(
            {"type": "reconcile.divergence"})]
        assert sorted(notes) == [(orgs[1], "ledger"), (orgs[4], "ledger")]
    finally:
        await setup.client.drop_database(engine.settings.mongodb_db)
        await setup.close()
        await engine.db.close()
