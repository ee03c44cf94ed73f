"""Admin adjustments (SPEC §6): threshold, approval by a second operator, rejection, idempotency."""

from __future__ import annotations

import asyncio

import pytest
from cli_helpers import cli
from pydantic import ValidationError
from temporalio.client import WorkflowFailureError

from billing.models import AdminRequest, AdminResult
from starter.operations.adjustments import (
    DecisionRefused,
    adjustment_status,
    decide,
    new_request_id,
    start_adjustment,
)
from workflows.admin_adjustment import AdminAdjustmentWorkflow


async def _wait_until_waiting(handle) -> None:
    for _ in range(100):
        if await handle.query(AdminAdjustmentWorkflow.waiting_for_approval):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the adjustment never waited for approval")


async def _admin_entries(runtime, org):
    return [e for e in await runtime.ledger.entries(org, limit=50) if e["kind"] == "adjustment"]


async def test_small_credit_applies_at_once(runtime, temporal_client, worker, settings, org, now):
    await runtime.accounts.register(org, now)
    request = AdminRequest(request_id=new_request_id(), org_id=org, units=700, reason="goodwill")
    handle, started = await start_adjustment(temporal_client, request, settings.temporal_task_queue)
    result = await handle.result()
    assert started and result.status == "applied" and result.balance == 500 + 700
    entries = await _admin_entries(runtime, org)
    assert [(e["amount"], e["key"], e["memo"]) for e in entries] == [
        (700, f"admin:{request.request_id}", "goodwill")
    ]


async def test_large_credit_waits_then_applies_once_on_approval(
    runtime, temporal_client, worker, settings, org, now
):
    await runtime.accounts.register(org, now)
    units = runtime.config.admin.approval_threshold_units + 1
    request = AdminRequest(request_id=new_request_id(), org_id=org, units=units,
                           reason="enterprise deal", requested_by="alice")
    handle, _ = await start_adjustment(temporal_client, request, settings.temporal_task_queue)
    await _wait_until_waiting(handle)
    assert await _admin_entries(runtime, org) == []
    # the requester cannot approve their own request: refused out loud, nothing changes
    with pytest.raises(DecisionRefused, match="alice requested"):
        await decide(temporal_client, request.request_id, approve=True, by="alice")
    assert await handle.query(AdminAdjustmentWorkflow.waiting_for_approval)
    approved = await decide(temporal_client, request.request_id, approve=True, by="bob")
    assert (approved.status, approved.balance) == ("applied", 500 + units)
    with pytest.raises(DecisionRefused, match="waits for no decision"):
        await decide(temporal_client, request.request_id, approve=True, by="carol")
    result: AdminResult = await handle.result()
    assert result.status == "applied" and result.approved_by == "bob"
    entries = await _admin_entries(runtime, org)
    assert len(entries) == 1 and entries[0]["amount"] == units
    assert entries[0]["meta"] == {"requested_by": "alice", "approved_by": "bob"}


async def test_rejection_writes_nothing(runtime, temporal_client, worker, settings, org, now):
    await runtime.accounts.register(org, now)
    request = AdminRequest(request_id=new_request_id(), org_id=org,
                           units=-(runtime.config.admin.approval_threshold_units + 5),
                           reason="clawback", requested_by="alice")
    handle, _ = await start_adjustment(temporal_client, request, settings.temporal_task_queue)
    await _wait_until_waiting(handle)
    rejected = await decide(temporal_client, request.request_id, approve=False, by="bob",
                            note="no")
    assert rejected.status == "rejected"
    result = await handle.result()
    assert result.status == "rejected" and result.rejected_by == "bob"
    assert await _admin_entries(runtime, org) == []
    assert (await runtime.accounts.get(org))["balance"] == 500


async def test_same_request_id_credits_once(runtime, temporal_client, worker, settings, org, now):
    await runtime.accounts.register(org, now)
    request = AdminRequest(request_id=new_request_id(), org_id=org, units=300,
                           reason="refund goodwill")
    first, started = await start_adjustment(temporal_client, request, settings.temporal_task_queue)
    await first.result()
    again, started_again = await start_adjustment(temporal_client, request,
                                                  settings.temporal_task_queue)
    assert started and not started_again
    assert (await again.result()).status == "applied"
    # Even once Temporal has forgotten the workflow, the ledger key keeps it a no-op.
    replay = await temporal_client.execute_workflow(
        AdminAdjustmentWorkflow.run, request, id=f"admin-{request.request_id}-late",
        task_queue=settings.temporal_task_queue)
    assert replay.status == "duplicate"
    assert len(await _admin_entries(runtime, org)) == 1
    assert (await runtime.accounts.get(org))["balance"] == 800


async def test_unknown_org_fails_without_retrying(runtime, temporal_client, worker, settings, org):
    request = AdminRequest(request_id=new_request_id(), org_id=org, units=10, reason="typo org")
    handle, _ = await start_adjustment(temporal_client, request, settings.temporal_task_queue)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    history = await handle.fetch_history()
    started = [e.activity_task_started_event_attributes for e in history.events
               if e.HasField("activity_task_started_event_attributes")]
    assert [s.attempt for s in started] == [1]  # bad input is final: no retry


@pytest.mark.parametrize("reason", ["", "  ", "no", " ok "])
def test_reason_shorter_than_three_characters_is_rejected_before_anything_starts(reason, org):
    with pytest.raises(ValidationError):
        AdminRequest(request_id="r1", org_id=org, units=10, reason=reason)


def test_zero_units_rejected(org):
    with pytest.raises(ValidationError):
        AdminRequest(request_id="r1", org_id=org, units=0, reason="nothing")


async def test_plain_temporal_cli_starts_and_approves(
    runtime, temporal_client, worker, settings, org, now
):
    """The README's `temporal workflow start` / `temporal workflow update execute` recipe works
    as is, and a self-approval sent as a plain signal is refused and recorded, not dropped."""
    import json

    from starter.embedded import find_binary

    await runtime.accounts.register(org, now)
    request_id = new_request_id()
    units = runtime.config.admin.approval_threshold_units + 10
    address = temporal_client.service_client.config.target_host

    async def temporal(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            find_binary("temporal"), *args, "--address", address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, (out + err).decode()

    await temporal("workflow", "start", "--task-queue", settings.temporal_task_queue,
                   "--type", "AdminAdjustmentWorkflow", "--workflow-id", f"admin-{request_id}",
                   "--input", json.dumps({"request_id": request_id, "org_id": org, "units": units,
                                          "reason": "enterprise deal", "requested_by": "alice"}))
    handle = temporal_client.get_workflow_handle_for(AdminAdjustmentWorkflow.run,
                                                     f"admin-{request_id}")
    await _wait_until_waiting(handle)
    await temporal("workflow", "signal", "--workflow-id", f"admin-{request_id}",
                   "--name", "approve", "--input", json.dumps({"by": "alice"}))
    for _ in range(50):
        refused = (await adjustment_status(temporal_client, request_id)).refused
        if refused:
            break
        await asyncio.sleep(0.1)
    assert [(r.action, r.by) for r in refused] == [("approve", "alice")]
    await temporal("workflow", "update", "execute", "--workflow-id", f"admin-{request_id}",
                   "--name", "decide", "--input", json.dumps({"approve": True, "by": "bob"}))
    result = await handle.result()
    assert result.status == "applied" and result.approved_by == "bob"
    assert (await runtime.accounts.get(org))["balance"] == 500 + units


async def test_cli_approve_refuses_a_self_approval_out_loud_then_prints_the_outcome(
    runtime, temporal_client, worker, settings, org, now
):

    await runtime.accounts.register(org, now)
    units = runtime.config.admin.approval_threshold_units + 3
    request = AdminRequest(request_id=new_request_id(), org_id=org, units=units,
                           reason="big deal", requested_by="alice")
    handle, _ = await start_adjustment(temporal_client, request, settings.temporal_task_queue)
    await _wait_until_waiting(handle)
    own = await asyncio.to_thread(cli, temporal_client, runtime, "approve", request.request_id,
                                  "--by", "alice")
    assert own.exit_code == 1
    assert "DECISION_REFUSED" in own.output and "cannot approve" in own.output
    ok = await asyncio.to_thread(cli, temporal_client, runtime, "approve", request.request_id,
                                 "--by", "bob")
    assert ok.exit_code == 0, ok.output
    assert f"approved: {request.request_id}: applied +{units} units, balance {500 + units}" \
        in ok.output
    late = await asyncio.to_thread(cli, temporal_client, runtime, "reject", request.request_id,
                                   "--by", "carol")
    assert late.exit_code == 1 and "waits for no decision" in late.output
    status = await asyncio.to_thread(cli, temporal_client, runtime, "adjustment",
                                     request.request_id, "--json")
    assert status.exit_code == 0, status.output
    assert '"phase":"done"' in status.output and '"approved_by":"bob"' in status.output
