import asyncio
from datetime import timedelta

from billing.ledger import EntryKind
from billing.store.ledger import LotTerms


async def test_register_credit_debit(accounts, ledger, org, now, db):
    reg = await accounts.register(org, now)
    assert reg.created and reg.plan_id == "free"
    assert (await accounts.get(org))["balance"] == 500
    r = await ledger.write(org, key="payment:pi_1", kind=EntryKind.TOPUP, amount=500000, now=now,
                           terms=LotTerms(payment_intent="pi_1", price_cents=4900, pack_id="pack_500k",
                                          expires_at=now + timedelta(days=365)))
    assert r.applied and r.balance == 500500
    again = await ledger.write(org, key="payment:pi_1", kind=EntryKind.TOPUP, amount=500000, now=now)
    assert not again.applied and again.balance == 500500
    results = await asyncio.gather(*[
        ledger.write(org, key=f"usage:r{i}:initial", kind=EntryKind.DEBIT, amount=-20000, now=now)
        for i in range(50)])
    assert all(r.applied for r in results)
    acct = await accounts.get(org)
    assert acct["balance"] == 500500 - 50 * 20000
    assert acct["usage_debt"] == 500000 - 500
