"""`AdminAdjustmentWorkflow` (id `admin-<request id>`): an operator's credit or debit.

Above the approval threshold it waits for an `approve` or `reject` signal from a second
operator; the ledger key `admin:<request id>` makes a repeated request a no-op.
"""

from __future__ import annotations

from temporalio import workflow

from billing.models import AdminPosted, AdminPosting, AdminRequest, AdminResult, Decision
from workflows.common import FAIL_ON, call
from workflows.search import ORG_ID


def admin_workflow_id(request_id: str) -> str:
    return f"admin-{request_id}"


@workflow.defn(failure_exception_types=FAIL_ON)
class AdminAdjustmentWorkflow:
    def __init__(self) -> None:
        self._request: AdminRequest | None = None
        self._approved: Decision | None = None
        self._rejected: Decision | None = None
        self._waiting = False

    @workflow.run
    async def run(self, request: AdminRequest) -> AdminResult:
        self._request = request
        workflow.upsert_search_attributes([ORG_ID.value_set(request.org_id)])
        if await call("admin_requires_approval", request, bool):
            self._waiting = True
            await workflow.wait_condition(
                lambda: self._approved is not None or self._rejected is not None
            )
            self._waiting = False
            if self._rejected is not None:
                return AdminResult(request_id=request.request_id, status="rejected",
                                   units=request.units, rejected_by=self._rejected.by,
                                   note=self._rejected.note)
        approved_by = self._approved.by if self._approved else None
        posted = await call("admin_post_adjustment",
                            AdminPosting(request=request, approved_by=approved_by), AdminPosted)
        return AdminResult(request_id=request.request_id,
                           status="applied" if posted.applied else "duplicate",
                           units=request.units, balance=posted.balance, approved_by=approved_by)

    @workflow.signal
    def approve(self, decision: Decision) -> None:
        """Approval by a second operator: the requester cannot approve their own request."""
        if self._request is not None and decision.by == self._request.requested_by:
            workflow.logger.warning("ignored self-approval by %s", decision.by)
            return
        if self._rejected is None:
            self._approved = decision

    @workflow.signal
    def reject(self, decision: Decision) -> None:
        if self._approved is None:
            self._rejected = decision

    @workflow.query
    def waiting_for_approval(self) -> bool:
        return self._waiting
