"""Ledger activities: the writes of SPEC §5.1 that workflows orchestrate."""

from __future__ import annotations

from temporalio import activity

from billing.models import ExpirePage, ExpirePageResult
from billing.runtime import Runtime


class LedgerActivities:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @activity.defn(name="expire_credit_page")
    async def expire_credit_page(self, page: ExpirePage) -> ExpirePageResult:
        """Expire one page of lots past their `expires_at`; each lot is its own transaction."""
        lots = await self.runtime.ledger.expired_lots(page.now, page.after, page.limit)
        expired = units = 0
        for lot in lots:
            result = await self.runtime.ledger.expire(lot["org_id"], lot["_id"], page.now)
            if result.applied:
                expired += 1
                units -= result.amount
        next_after = lots[-1]["_id"] if len(lots) == page.limit else None
        return ExpirePageResult(expired=expired, units=units, next_after=next_after)
