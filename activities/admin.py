"""Admin adjustment activities (SPEC §6): the approval policy and the ledger write."""

from __future__ import annotations

from temporalio import activity

from activities.errors import final_on_bad_input
from billing.clock import utcnow
from billing.ledger import EntryKind
from billing.models import AdminPosted, AdminPosting, AdminRequest
from billing.runtime import Runtime


class AdminActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @activity.defn(name="admin_requires_approval")
    async def admin_requires_approval(self, request: AdminRequest) -> bool:
        """Adjustments above `[admin] approval_threshold_units` wait for a second operator."""
        with final_on_bad_input():
            await self.runtime.accounts.get(request.org_id)
        return abs(request.units) > self.runtime.config.admin.approval_threshold_units

    @activity.defn(name="admin_post_adjustment")
    async def admin_post_adjustment(self, posting: AdminPosting) -> AdminPosted:
        request = posting.request
        meta = {"requested_by": request.requested_by, "approved_by": posting.approved_by}
        with final_on_bad_input():
            result = await self.runtime.ledger.write(
                request.org_id,
                key=f"admin:{request.request_id}",
                kind=EntryKind.ADJUSTMENT,
                amount=request.units,
                now=utcnow(),
                memo=request.reason,
                meta=meta,
            )
        entry_id = str(result.entry["_id"]) if result.entry else None
        return AdminPosted(applied=result.applied, entry_id=entry_id, balance=result.balance)
