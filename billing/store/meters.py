"""The weekly meter on MongoDB (SPEC §5.2, §5.3): usage records, plan changes, the weekly reset.

A meter is one document per organization and ISO week holding `used` and a snapshot of the
plan it is metered on (`quota`, `plan_id`, `ratio_version`), kept live by plan changes.

Recording usage is the hot path and takes no workflow. A record increments the meter, debits
the overflow (ledger key `usage:<run_id>:<step>`), writes the notifications it triggers, inserts
the usage record, which carries the response, and settles the balance hold it names (SPEC
§5.11: the hold comes off the meter that keeps it), all in one transaction, planned on the write
engine (`billing.store.books`) with the meter rules of `billing.store.meter_writes`. The
record's `_id` is its key `(org_id, run_id, step)` (`usage_id`), so a replay aborts that
transaction on a duplicate key (as the ledger key does); the stored first result is then
returned with `applied: false`. The key is the `_id` rather than a unique secondary index
because on the embedded server every index entry costs each insert about as much as the
document itself.

Records and holds of a process are committed in groups (`billing.store.usage_group`): share
one `Meters` per process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from pymongo.asynchronous.client_session import AsyncClientSession

from billing.config import BillingConfig
from billing.errors import BillingError, InvalidInput, OrgNotFound
from billing.holds import Hold, HoldRequest, Refusal, Reservation, held
from billing.ledger import EntryKind
from billing.metering import Gate, UsageRequest, plan_quota, quota_gate, settlement_units
from billing.models import ResetOrgResult
from billing.store import holds
from billing.store.accounts import Accounts, check_org_id
from billing.store.books import Books
from billing.store.database import Database
from billing.store.documents import Account, MeterWeek
from billing.store.ledger import Ledger
from billing.store.meter_writes import MeterWrites, UsageResult
from billing.store.transactions import run_in_transaction
from billing.store.usage_group import GroupCommit, HoldOrder
from billing.weeks import iso_week


@dataclass(frozen=True)
class MeterView:
    org_id: str
    week: str
    used: int
    quota: int
    plan_id: str
    held: int  # units active holds reserve (SPEC §5.11)

    @property
    def remaining(self) -> int:
        """The week's quota left once every active hold is used."""
        return max(0, self.quota - self.used - self.held)


class Meters:
    def __init__(self, db: Database, config: BillingConfig) -> None:
        self.db = db
        self.config = config
        self.ledger = Ledger(db)
        self.writes = MeterWrites(config)
        self._commit = GroupCommit(db, self.writes, self._gate_of)

    # ---- the hot path ---------------------------------------------------------------------------

    async def record(self, request: UsageRequest, now: datetime) -> UsageResult:
        """Record one usage record; a replay of `(org_id, run_id, step)` returns the first result
        with `applied: false` and writes nothing."""
        result = await self._commit.submit(request, now)
        assert isinstance(result, UsageResult)
        return result

    async def record_many(
        self, requests: list[UsageRequest], now: datetime
    ) -> list[UsageResult | BillingError]:
        """Record several usage records, each with its own idempotency, in their order (so a
        repeated `(run_id, step)` replays the first): they join the group commit together. A
        record refused (unknown organization, invalid units) is answered with its error and does
        not stop the others; a failure of the database fails the call, and a retry of it is
        safe."""

        async def one(request: UsageRequest) -> UsageResult | BillingError:
            try:
                return await self.record(request, now)
            except BillingError as exc:
                return exc

        return list(await asyncio.gather(*(one(request) for request in requests)))

    # ---- reads ----------------------------------------------------------------------------------

    async def current(self, org_id: str, now: datetime) -> MeterView:
        """This week's meter; a week without usage yet shows the plan it would open with."""
        return (await self._read_gate(org_id, now))[1]

    async def gate(self, org_id: str, now: datetime) -> Gate:
        """The quota gate of SPEC §5.2, net of every active hold (§5.11): may this organization
        start more work now?"""
        return (await self._read_gate(org_id, now))[0]

    async def _read_gate(self, org_id: str, now: datetime) -> tuple[Gate, MeterView]:
        check_org_id(org_id)
        account = await self.db.accounts.find_one({"_id": org_id})
        if account is None:
            raise OrgNotFound(org_id)
        meters = await holds.read_meters(self.db, org_id, now)  # this week's and the holds'
        active = [h for meter in meters.values() for h in meter.holds]
        return self._gate(Account.from_doc(account), meters.get(iso_week(now)), active, now)

    def _gate_of(self, books: Books, org_id: str, now: datetime) -> tuple[Gate, str]:
        """The gate of an organization a group commit read, and the plan its units are priced
        on (a hold's costs, like a record's)."""
        gate, view = self._gate(books.account(org_id), books.meter(org_id, iso_week(now)),
                                holds.active(books, org_id, now), now)
        return gate, view.plan_id

    def _gate(self, account: Account, meter: MeterWeek | None, active: list[Reservation],
              now: datetime) -> tuple[Gate, MeterView]:
        """The gate and the meter view of an organization from what was read of it: its account
        (with its subscription standing), this week's meter (None: not opened yet, shown with
        the plan it would open with) and its holds (those expired at `now` count for nothing)."""
        week = iso_week(now)
        reserved = held(active, now)
        if meter is None:
            meter = self.writes.opened(account, self.writes.opening_plan(account), week)
        view = MeterView(account.org_id, week, meter.used, meter.quota, meter.plan_id, reserved)
        gate = quota_gate(
            quota=view.quota, used=view.used, balance=account.balance, status=account.status,
            past_due_since=account.past_due_since,
            grace_days=self.config.subscriptions.grace_days, now=now, held=reserved,
        )
        return gate, view

    # ---- balance holds (SPEC §5.11) -------------------------------------------------------------

    async def hold(self, org_id: str, request: HoldRequest, now: datetime) -> Hold | Refusal:
        """Reserve units when the gate's remaining, net of every active hold, covers them. A
        granted `hold_id` answers its first hold, whatever the request says now; a refusal
        writes nothing.

        The hold joins the group commit (`billing.store.usage_group`): the holds of a process
        are decided in memory one after the other, with the records around them, inside shared
        transactions, so they never conflict with each other. Across processes, every
        transaction that grants a hold writes the meter that keeps it (`billing.store.holds`):
        grants that run at once write-conflict, MongoDB orders them, and the loser starts again
        and sees the winner's hold."""
        check_org_id(org_id)
        result = await self._commit.submit(HoldOrder(org_id, request), now)
        assert not isinstance(result, UsageResult)
        return result

    # ---- plan changes (called inside the Stripe event's transaction) ----------------------------

    async def apply_plan_change_in(
        self, session: AsyncClientSession, org_id: str, plan_id: str, now: datetime, *,
        seats: int = 1,
    ) -> bool:
        """Put the organization on `plan_id` (with `seats`, for a `per_seat` plan) and meter the
        rest of this week on it.

        Writes the account's `plan_id` and `seats` (the source of truth) and this week's quota
        snapshot; the week's usage is kept. Call it after writing the subscription's status in
        the same session: the metered plan is the default one while the status does not pay for
        a plan. Raises `plan.changed` (and any quota alert the new quota implies) and returns
        True only when the metered plan or its quota actually changes (a seat count too).
        """
        if plan_id not in self.config.plans_by_id:
            raise InvalidInput(f"unknown plan {plan_id!r}", code="UNKNOWN_PLAN")
        week = iso_week(now)
        books = Books(self.db, session)
        await books.load([org_id], [(org_id, week)])
        account = books.account(org_id)
        meter = self.writes.week_of(books, org_id, week)
        previous, previous_quota = meter.plan_id, meter.quota
        await self.db.accounts.update_one(
            {"_id": org_id}, {"$set": {"plan_id": plan_id, "seats": max(seats, 1),
                                       "updated_at": now}}, session=session)
        account.plan_id, account.seats = plan_id, max(seats, 1)
        plan = self.writes.opening_plan(account)
        books.set_meter(meter, plan_id=plan.id, quota=plan_quota(plan, account.seats),
                        ratio_version=self.config.meter.ratio_version)
        changed = (previous, previous_quota) != (plan.id, meter.quota)
        if changed:
            books.notify(
                org_id, type="plan.changed",
                key=f"plan.changed:{now.isoformat()}:{previous}:{plan.id}:{meter.quota}",
                payload={"week": week, "from": previous, "to": plan.id, "quota": meter.quota,
                         "used": meter.used},
                now=now,
            )
            self.writes.threshold_alerts(books, meter, 0, now)
        await books.flush(now)
        return changed

    async def reset_week_usage_in(
        self, session: AsyncClientSession, org_id: str, now: datetime
    ) -> int:
        """Set this week's usage back to 0 (a deleted subscription); returns the units removed.

        Alerts already raised this week stay raised (once per week and threshold).
        """
        week = iso_week(now)
        meter = await self.db.meters.find_one({"org_id": org_id, "week": week}, session=session)
        if meter is None or meter["used"] <= 0:
            return 0
        await self.db.meters.update_one(
            {"_id": meter["_id"]},
            {"$set": {"used": 0, "updated_at": now},
             "$push": {"usage_resets": {"at": now, "units": meter["used"]}}},
            session=session,
        )
        return int(meter["used"])

    # ---- the weekly reset (SPEC §5.3) -----------------------------------------------------------

    async def reset_candidates(self, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """One page of accounts (by `_id`) and those of them with a meter or a subscription."""
        ids = await Accounts(self.db, self.config).page_ids(after, limit)
        next_after = ids[-1] if len(ids) == limit else None
        if not ids:
            return [], None
        metered = set(await self.db.meters.distinct("org_id", {"org_id": {"$in": ids}}))
        cursor = self.db.subscriptions.find({"_id": {"$in": ids}}, {"_id": 1})
        subscribed = {doc["_id"] async for doc in cursor}
        return [org for org in ids if org in metered or org in subscribed], next_after

    async def reset_org(self, org_id: str, week: str, now: datetime) -> ResetOrgResult:
        """Open `week` for one organization: archive older weeks, snapshot the plan, settle the
        usage debt (`settle:<week>`, counted as used in the week). Once per organization and
        week: the meter's `reset_at` and the ledger key make every later run a no-op."""
        check_org_id(org_id)

        async def work(session: AsyncClientSession) -> ResetOrgResult:
            books = Books(self.db, session)
            await books.load([org_id], [(org_id, week)])
            account = books.account(org_id)
            meter = self.writes.week_of(books, org_id, week)
            if meter.reset_at is not None:
                return ResetOrgResult(org_id=org_id, week=week, applied=False,
                                      settled=meter.settled, used=meter.used, quota=meter.quota)
            await self.db.meters.update_many(
                {"org_id": org_id, "week": {"$lt": week}, "archived_at": None},
                {"$set": {"archived_at": now}},
                session=session,
            )
            settle = await self._settle(books, account, meter, now)
            prev_used = meter.used
            books.add_usage(meter, settle)
            books.set_meter(meter, reset_at=now, settled=settle)
            self.writes.threshold_alerts(books, meter, prev_used, now)
            await books.flush(now)
            return ResetOrgResult(org_id=org_id, week=week, applied=True, settled=settle,
                                  used=meter.used, quota=meter.quota)

        return await run_in_transaction(self.db.client, work)

    async def _settle(self, books: Books, account: Account, meter: MeterWeek,
                      now: datetime) -> int:
        """Plan the week's settlement of usage debt (`settle:<week>`); the units it settles."""
        settle = settlement_units(quota=meter.quota, used=meter.used,
                                  usage_debt=account.usage_debt)
        key = f"settle:{meter.week}"
        if settle <= 0 or await self.ledger.existing_in(books.session, account.org_id, key):
            return 0
        posted = books.post(account.org_id, key=key, kind=EntryKind.SETTLEMENT,
                                  amount=settle, now=now, meta={"week": meter.week},
                                  memo=f"usage debt settled by the quota of {meter.week}")
        return posted.amount
