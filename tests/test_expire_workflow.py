from datetime import timedelta

from billing.ledger import EntryKind
from billing.models import ExpirePageResult
from billing.store.documents import LotTerms
from workflows.expire_credits import ExpireCreditsWorkflow


async def test_expire_credits_workflow_removes_only_remainders(
    accounts, ledger, org, now, temporal_client, worker, settings
):
    past = now - timedelta(days=400)
    await accounts.register(org, past)
    await ledger.write(org, key="payment:pi_x", kind=EntryKind.TOPUP, amount=1000, now=past,
                       terms=LotTerms(expires_at=past + timedelta(days=1), price_cents=100))
    await ledger.write(org, key="usage:r:initial", kind=EntryKind.DEBIT, amount=-300, now=past)
    result = await temporal_client.execute_workflow(
        ExpireCreditsWorkflow.run, id=f"expire-test-{org}", task_queue=settings.temporal_task_queue,
        result_type=ExpirePageResult)
    assert result.expired >= 1
    account = await accounts.get(org)
    # 500 grant never expires; 1000 pack: the debit drew from it first (earliest expiry), 700 left
    assert account["balance"] == 500
    entries = await ledger.entries(org, limit=10)
    assert [e["amount"] for e in entries if e["kind"] == "expiration"] == [-700]
