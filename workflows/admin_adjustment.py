"""`AdminAdjustmentWorkflow` (id `admin-<request id>`): an operator's credit or debit.

Above the approval threshold it waits for a second operator's decision. `billing approve` and
`billing reject` send it through the `decide` update, whose validator refuses a self-approval and
a decision on a request that waits for none, so the operator is told at once and the CLI exits
non-zero; an accepted decision answers with the outcome. The `approve` and `reject` signals stay
for the plain `temporal` CLI: a signal the workflow refuses is recorded and shown by the `status`
query, never dropped silently. The ledger key `admin:<request id>` makes a repeated request a
no-op.
"""

from __future__ import annotations

from temporalio import workflow

from billing.models import (
    AdjustmentStatus,
    AdminPosting,
    AdminRequest,
    AdminResult,
    Decision,
    DecisionRequest,
    RefusedDecision,
)
from workflows import steps
from workflows.common import FAIL_ON, call
from workflows.search import ORG_ID

CHECKING = "checking"  # asking whether the amount needs an approval
WAITING = "waiting"  # for a second operator
DECIDING = "deciding"  # decided or approved: posting
DONE = "done"


def admin_workflow_id(request_id: str) -> str:
    return f"admin-{request_id}"


@workflow.defn(failure_exception_types=FAIL_ON)
class AdminAdjustmentWorkflow:
    @workflow.init
    def __init__(self, request: AdminRequest) -> None:
        # Set before any handler runs: a decision delivered with the start sees the request.
        self._request = request
        self._phase = CHECKING
        self._approved: Decision | None = None
        self._rejected: Decision | None = None
        self._refused: list[RefusedDecision] = []
        self._result: AdminResult | None = None

    @workflow.run
    async def run(self, request: AdminRequest) -> AdminResult:
        workflow.upsert_search_attributes([ORG_ID.value_set(request.org_id)])
        if await call(steps.admin_requires_approval, request):
            self._phase = WAITING
            await workflow.wait_condition(
                lambda: self._approved is not None or self._rejected is not None
            )
        self._phase = DECIDING
        if self._rejected is not None:
            result = AdminResult(request_id=request.request_id, status="rejected",
                                 units=request.units, rejected_by=self._rejected.by,
                                 note=self._rejected.note)
        else:
            approved_by = self._approved.by if self._approved else None
            posted = await call(steps.admin_post_adjustment,
                                AdminPosting(request=request, approved_by=approved_by))
            result = AdminResult(request_id=request.request_id,
                                 status="applied" if posted.applied else "duplicate",
                                 units=request.units, balance=posted.balance,
                                 approved_by=approved_by)
        self._result = result
        self._phase = DONE
        await workflow.wait_condition(workflow.all_handlers_finished)
        return result

    def _refusal(self, decision: Decision, *, approve: bool) -> str | None:
        """Why a decision cannot be taken now, or None."""
        if self._phase in (DECIDING, DONE) or self._approved or self._rejected:
            return f"request {self._request.request_id} waits for no decision: it is decided"
        if approve and decision.by == self._request.requested_by:
            return (f"{decision.by} requested {self._request.request_id} and cannot approve it: "
                    "a second operator must")
        return None

    def _take(self, decision: Decision, *, approve: bool) -> None:
        if approve:
            self._approved = decision
        else:
            self._rejected = decision

    @workflow.update
    async def decide(self, decision: DecisionRequest) -> AdminResult:
        """Approve or reject, and answer with the outcome once it is written."""
        self._take(Decision(by=decision.by, note=decision.note), approve=decision.approve)
        await workflow.wait_condition(lambda: self._result is not None)
        assert self._result is not None
        return self._result

    @decide.validator
    def _validate_decide(self, decision: DecisionRequest) -> None:
        reason = self._refusal(decision, approve=decision.approve)
        if reason is not None:
            raise ValueError(reason)

    def _signal(self, decision: Decision, *, approve: bool) -> None:
        reason = self._refusal(decision, approve=approve)
        if reason is None:
            self._take(decision, approve=approve)
            return
        self._refused.append(RefusedDecision(action="approve" if approve else "reject",
                                             by=decision.by, reason=reason))
        workflow.logger.warning("refused %s by %s: %s", "approval" if approve else "rejection",
                                decision.by, reason)

    @workflow.signal
    def approve(self, decision: Decision) -> None:
        """Approval by a second operator (the plain `temporal` CLI's way)."""
        self._signal(decision, approve=True)

    @workflow.signal
    def reject(self, decision: Decision) -> None:
        self._signal(decision, approve=False)

    @workflow.query
    def waiting_for_approval(self) -> bool:
        return self._phase == WAITING

    @workflow.query
    def status(self) -> AdjustmentStatus:
        return AdjustmentStatus(
            request=self._request, phase=self._phase,
            approved_by=self._approved.by if self._approved else None,
            rejected_by=self._rejected.by if self._rejected else None,
            refused=list(self._refused),
        )
