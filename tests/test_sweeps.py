"""Daily sweeps run one organization at a time (`workflows/org_sweep.py`): an organization whose
work keeps failing fails its own child workflow, findable by organization, and the sweep still
does everyone else's work."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from stripe_payloads import new_id
from temporal_helpers import failed_ids
from temporalio.client import Client

from billing.models import DunningPageResult, ExpirePageResult
from billing.runtime import Runtime
from billing.store.database import Database
from workflows.dunning import DunningWorkflow
from workflows.expire_credits import ExpireCreditsWorkflow


async def test_dunning_isolates_an_organization_that_keeps_failing(
    api, stripe_worker, temporal_client: Client, stripe_runtime: Runtime, org: str, db: Database
) -> None:
    broken = f"{org}-broken"  # a subscription whose organization has no account: always fails
    long_ago = datetime.now(UTC) - timedelta(days=30)
    assert (await api.put(f"/v1/orgs/{org}")).status_code == 201
    subs = [{"_id": new_id("sub"), "org_id": who, "status": "past_due", "plan_id": "pro",
             "past_due_since": long_ago} for who in (org, broken)]
    await db.stripe_subscriptions.insert_many(subs)
    task_queue = stripe_runtime.settings.temporal_task_queue
    try:
        result = await temporal_client.execute_workflow(
            DunningWorkflow.run, id=f"dunning-isolation-{org}", result_type=DunningPageResult,
            task_queue=task_queue)
    finally:
        await db.stripe_subscriptions.delete_one({"_id": subs[1]["_id"]})
    assert broken in result.failed and org not in result.failed
    view = (await api.get(f"/v1/orgs/{org}/subscription")).json()
    assert (view["status"], view["plan_id"]) == ("unpaid", "free")
    day = f"{datetime.now(UTC):%Y-%m-%d}"
    assert await failed_ids(temporal_client, broken, task_queue) == {f"dunning-{broken}-{day}"}


async def test_expiry_runs_per_organization_and_reports_what_it_removed(
    accounts, ledger, org: str, temporal_client: Client, worker, settings
) -> None:
    from billing.ledger import EntryKind
    from billing.store.documents import LotTerms

    past = datetime.now(UTC) - timedelta(days=400)
    await accounts.register(org, past)
    await ledger.write(org, key="payment:pi_sweep", kind=EntryKind.TOPUP, amount=800, now=past,
                       terms=LotTerms(expires_at=past + timedelta(days=1), price_cents=100))
    result = await temporal_client.execute_workflow(
        ExpireCreditsWorkflow.run, id=f"expire-sweep-{org}", result_type=ExpirePageResult,
        task_queue=settings.temporal_task_queue)
    assert result.expired >= 1 and result.units >= 800 and result.failed == []
    assert (await accounts.get(org))["balance"] == 500
    day = f"{datetime.now(UTC):%Y-%m-%d}"
    description = await temporal_client.get_workflow_handle(f"expire-{org}-{day}").describe()
    assert description.status is not None and description.status.name == "COMPLETED"
