"""The weekly meter on MongoDB (SPEC §5.2, §5.3): usage records, plan changes, the weekly reset.

A meter is one document per organization and ISO week holding `used` and a snapshot of the
plan it is metered on (`quota`, `plan_id`, `ratio_version`), kept live by plan changes.

Recording usage is the hot path and takes no workflow. A record reads the account, increments
the meter, debits the overflow (ledger key `usage:<run_id>:<step>`), writes the notifications it
triggers, inserts the usage record, which carries the response, and settles the balance hold it
names (SPEC §5.11), all in one transaction. The
record's `_id` is its key `(org_id, run_id, step)` (`usage_id`), so a replay aborts that
transaction on a duplicate key (as the ledger key does); the stored first result is then returned
with `applied: false`. The key is the `_id` rather than a unique secondary index because on the
embedded server every index entry costs each insert about as much as the document itself.

Every record of an organization increments the same meter document, so concurrent transactions
on one organization conflict and start again. A `Meters` instance therefore commits the records
of its process in groups, one transaction at a time (`record`): within a process records never
conflict, and a commit carries every record that arrived while the previous one committed
(transactions stay the guarantee across processes). Balance holds (`hold`) join the same groups.
Share one instance per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError, DuplicateKeyError

from billing.config import BillingConfig, PlanConfig
from billing.errors import BillingError, InvalidInput, OrgNotFound
from billing.holds import Hold, HoldRequest, Refusal, decide_hold, held
from billing.ledger import EntryKind
from billing.metering import (
    Gate,
    Metered,
    UsageRequest,
    effective_plan,
    grant_alert,
    is_runaway,
    meter_usage,
    overflow,
    plan_quota,
    quota_gate,
    settlement_units,
    thresholds_crossed,
    units_from_costs,
)
from billing.models import ResetOrgResult
from billing.store import holds
from billing.store.accounts import Accounts, check_org_id
from billing.store.auto_topups import would_trigger
from billing.store.database import DUPLICATE_KEY, LEGACY_USAGE_KEY, Database, Doc
from billing.store.holds import hold_key
from billing.store.ledger import Debits, Ledger
from billing.store.notifications import notify
from billing.store.transactions import run_in_transaction
from billing.weeks import iso_week

#: A duplicate key that is not a replay (two transactions opening the same meter or writing the
#: same notification) is retried this many times before it is reported.
DUPLICATE_RETRIES = 5
#: Records committed in one transaction at most (a whole `POST /v1/usage/batch`). On the embedded
#: server a group's cost is mostly one write per document, and each organization's meter is
#: written once per group however many of its records the group holds, so bigger groups cost
#: less per record (BENCHMARKS.md, usage). The transaction stays well under a second and a few
#: hundred kilobytes.
GROUP_MAX = 1000


@dataclass(frozen=True)
class UsageResult:
    """The answer of `POST /v1/usage`."""

    applied: bool
    units: int
    overflow: int
    week: str
    used: int
    quota: int
    balance: int


#: Set on a meter when it opens: its `overflow` counts every unit debited past its quota (what
#: the reconciliation compares with the week's usage debits). A meter opened by a release before
#: the counter has none of the overflow before the upgrade, so it is not compared.
OVERFLOW_COUNTED = {"overflow": 0, "overflow_counted": True}


def _debit_terms(request: UsageRequest, week: str) -> dict[str, Any]:
    """The ledger entry of a record's overflow: its key, memo and meta."""
    return {"key": f"usage:{request.run_id}:{request.step}", "memo": f"usage overflow {week}",
            "meta": {"week": week, "run_id": request.run_id, "step": request.step}}


def usage_id(request: UsageRequest) -> str:
    """A usage record's `_id`: its idempotency key. Unambiguous, as no part may contain `/`."""
    return f"{request.org_id}/{request.run_id}/{request.step}"


def _settle(request: UsageRequest, now: datetime) -> UpdateOne:
    """The write by which a record settles the hold it names."""
    assert request.hold_id is not None
    return holds.settle(request.org_id, request.hold_id, usage_id(request), now)


@dataclass(frozen=True)
class HoldOrder:
    """A balance hold asked of `Meters.hold`: it waits in the group commit like a record."""

    org_id: str
    request: HoldRequest


#: What a member of a group commit answers.
Outcome = UsageResult | Hold | Refusal


@dataclass
class _Pending:
    """A usage record or a hold waiting for its group's commit, and where its caller waits."""

    request: UsageRequest | HoldOrder
    now: datetime
    result: asyncio.Future[Outcome]

    def succeed(self, result: Outcome) -> None:
        if not self.result.done():  # the caller may have gone (a cancelled request)
            self.result.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(exc)


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


def _stored_result(record: Doc) -> UsageResult:
    return UsageResult(
        applied=False, units=record["units"], overflow=record["overflow"], week=record["week"],
        used=record["used"], quota=record["quota"], balance=record["balance"],
    )


class Meters:
    def __init__(self, db: Database, config: BillingConfig) -> None:
        self.db = db
        self.config = config
        self.ledger = Ledger(db)
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None

    # ---- shared steps ---------------------------------------------------------------------------

    def _snapshot(self, plan: PlanConfig, account: Doc) -> Doc:
        return {
            "quota": plan_quota(plan, int(account.get("seats") or 1)),
            "plan_id": plan.id,
            "ratio_version": self.config.meter.ratio_version,
        }

    async def _status_in(self, session: AsyncClientSession | None, org_id: str) -> Doc:
        subscription = await self.db.subscriptions.find_one(
            {"_id": org_id}, {"status": 1, "past_due_since": 1}, session=session
        )
        return subscription or {}

    async def _plan_in(self, session: AsyncClientSession | None, account: Doc) -> PlanConfig:
        status = (await self._status_in(session, account["_id"])).get("status")
        return effective_plan(self.config, account.get("plan_id"), status)

    async def _open_in(
        self, session: AsyncClientSession, account: Doc, week: str, now: datetime, units: int = 0
    ) -> Doc:
        """The week's meter after adding `units`, created with the plan snapshot if it does not
        exist yet."""
        plan = await self._plan_in(session, account)
        key = {"org_id": account["_id"], "week": week}
        await self.db.meters.update_one(
            key,
            {"$setOnInsert": {**key, "created_at": now, "updated_at": now, **OVERFLOW_COUNTED,
                              **self._snapshot(plan, account)},
             "$inc": {"used": units}},
            upsert=True,
            session=session,
        )
        return await self._meter_in(session, key)

    async def _add_in(
        self, session: AsyncClientSession, account: Doc, week: str, units: int, now: datetime
    ) -> Doc:
        """Increment the week's meter by `units` and return it after the increment."""
        key = {"org_id": account["_id"], "week": week}
        added = await self.db.meters.update_one(
            key, {"$inc": {"used": units}, "$set": {"updated_at": now}}, session=session
        )
        if added.matched_count == 0:
            return await self._open_in(session, account, week, now, units)
        return await self._meter_in(session, key)

    async def _meter_in(self, session: AsyncClientSession, key: Doc) -> Doc:
        """The meter just written in this transaction, read by its unique `(org_id, week)` index.
        Writes and reads by index, never a findAndModify: the embedded server runs that as a
        collection scan, and meters grow by one document per organization and week."""
        meter = await self.db.meters.find_one(key, session=session)
        assert meter is not None
        return meter

    async def _threshold_alerts_in(
        self, session: AsyncClientSession, meter: Doc, prev_used: int, now: datetime
    ) -> None:
        for pct in thresholds_crossed(
            prev_used, meter["used"], meter["quota"], self.config.meter.alert_thresholds
        ):
            await notify(
                self.db, session, org_id=meter["org_id"], type="meter.threshold_crossed",
                key=f"meter.threshold_crossed:{meter['week']}:{pct}",
                payload={"week": meter["week"], "threshold": pct, "used": meter["used"],
                         "quota": meter["quota"], "plan_id": meter["plan_id"]},
                now=now,
            )

    # ---- the hot path ---------------------------------------------------------------------------

    async def record(self, request: UsageRequest, now: datetime) -> UsageResult:
        """Record one usage record; a replay of `(org_id, run_id, step)` returns the first result
        with `applied: false` and writes nothing."""
        result = await self._enqueue(request, now)
        assert isinstance(result, UsageResult)
        return result

    async def _enqueue(self, request: UsageRequest | HoldOrder, now: datetime) -> Outcome:
        """Apply a usage record or a hold in the next group commit.

        Group commit: the records that arrive while a group is committing wait for the next one,
        and each group is ONE transaction (records of any organization, applied in arrival
        order), so under load a commit carries many records and at low load a lone record
        commits at once. A record that fails inside a group (a replay's duplicate key, an
        unknown organization) aborts that attempt; its neighbours are committed again without it
        and it runs alone, in arrival order."""
        loop = asyncio.get_running_loop()
        if self._committer is not None and self._committer.get_loop() is not loop:
            # Used from another event loop than before (tests, embedded runs): records queued
            # on the old loop cannot be served from this one.
            self._queue = [p for p in self._queue if p.result.get_loop() is loop]
            self._committer = None
        pending = _Pending(request, now, loop.create_future())
        self._queue.append(pending)
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_groups())
        return await pending.result

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

    async def _commit_groups(self) -> None:
        group: list[_Pending] = []
        try:
            while self._queue:
                group, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
                await self._commit(group)
        except BaseException as exc:  # cancelled with its loop: nobody may wait forever
            for pending in group + self._queue:
                pending.fail(exc if isinstance(exc, Exception) else RuntimeError("stopped"))
            self._queue = []
            raise

    async def _commit(self, group: list[_Pending]) -> None:
        """Commit `group` in one transaction. A record that fails is taken out: the records
        before it commit, then it runs alone (its own result or error), then the ones after it:
        every record applies in arrival order, as if each had its own transaction.

        A duplicate key first makes the group run again reading its stored records up front, so
        a batch sent again answers its replays in one transaction instead of one each."""
        replays = False
        while group:

            failing = [0]  # which record failed: set by the group's application

            async def apply(session: AsyncClientSession, members: list[_Pending] = group,
                            failed: list[int] = failing,
                            read_stored: bool = replays) -> list[Outcome]:
                return await _Group(self, session, members, failed, read_stored).apply()

            try:
                results = await run_in_transaction(self.db.client, apply)
            except (DuplicateKeyError, BillingError) as exc:
                if isinstance(exc, DuplicateKeyError) and not replays:
                    replays = True
                    continue
                at = failing[0]
                before, alone, group = group[:at], group[at], group[at + 1:]
                await self._commit(before)  # arrival order holds: a repeat replays the first
                try:
                    alone.succeed(await self._apply_alone(alone.request, alone.now))
                except Exception as exc:
                    alone.fail(exc)
                continue
            except Exception as exc:  # the database failed: every record of the group says so
                for pending in group:
                    pending.fail(exc)
                return
            for pending, result in zip(group, results, strict=True):
                pending.succeed(result)
            return

    async def _apply_alone(self, request: UsageRequest | HoldOrder, now: datetime) -> Outcome:
        """A record or a hold in a transaction of its own."""
        if isinstance(request, HoldOrder):
            alone = _Pending(request, now, asyncio.get_running_loop().create_future())

            async def apply(session: AsyncClientSession) -> list[Outcome]:
                return await _Group(self, session, [alone], [0], replays=True).apply()

            return (await run_in_transaction(self.db.client, apply))[0]
        return await self._record_alone(request, now)

    async def _record_alone(self, request: UsageRequest, now: datetime) -> UsageResult:
        """One record in a transaction of its own: a replay answers the stored first result."""
        for _ in range(DUPLICATE_RETRIES):
            try:
                return await run_in_transaction(
                    self.db.client, lambda session: self._record_in(session, request, now)
                )
            except DuplicateKeyError:
                stored = await self._stored(request)
                if stored is not None:
                    return _stored_result(stored)
        raise RuntimeError(f"usage {request.run_id}:{request.step} kept hitting duplicate keys")

    async def _stored(self, request: UsageRequest) -> Doc | None:
        """The first record of `request`'s key, if one is stored. A database created before
        keys became `_id`s may hold it under an `ObjectId`: it is found by `LEGACY_USAGE_KEY`
        while that index exists (its duplicate key is what brought the replay here)."""
        stored = await self.db.usage.find_one({"_id": usage_id(request)})
        if stored is None and LEGACY_USAGE_KEY in await self.db.usage.index_information():
            stored = await self.db.usage.find_one(
                {"org_id": request.org_id, "run_id": request.run_id, "step": request.step})
        return stored

    async def _record_in(
        self, session: AsyncClientSession, request: UsageRequest, now: datetime
    ) -> UsageResult:
        org_id = request.org_id
        week = iso_week(now)
        meter_config = self.config.meter
        # The meter's plan is the account's plan unless the subscription's status overrides it
        # (rare): price with the account's plan, and correct once the meter says otherwise.
        account = await self.db.accounts.find_one(
            {"_id": org_id}, {"balance": 1, "plan_id": 1, "seats": 1}, session=session
        )
        if account is None:
            raise OrgNotFound(org_id)
        guess = self.config.plan(account.get("plan_id"))
        metered = meter_usage(request, guess, meter_config)
        meter = await self._add_in(session, account, week, metered.units, now)
        plan = self.config.plan(meter["plan_id"])
        if plan.ratios != guess.ratios:
            corrected = meter_usage(request, plan, meter_config)
            meter = await self._add_in(session, account, week, corrected.units - metered.units, now)
            metered = corrected
        used, quota = int(meter["used"]), int(meter["quota"])
        prev_used = used - metered.units
        over = overflow(prev_used, used, quota)
        balance = int(account["balance"])
        if over > 0:
            balance = await self._debit_in(session, request, meter, plan, over, now)
        await self._threshold_alerts_in(session, meter, prev_used, now)
        await self.db.usage.insert_one(
            self._usage_doc(request, metered, meter, over, balance, now), session=session
        )
        if request.hold_id is not None:
            await self.db.holds.bulk_write([_settle(request, now)], session=session)
        return UsageResult(applied=True, units=metered.units, overflow=over, week=week,
                           used=used, quota=quota, balance=balance)

    async def _debit_in(
        self,
        session: AsyncClientSession,
        request: UsageRequest,
        meter: Doc,
        plan: PlanConfig,
        units: int,
        now: datetime,
    ) -> int:
        """Debit the overflow from extras and raise the balance alerts it triggers."""
        org_id, week = request.org_id, meter["week"]
        account = await self.ledger.lock_in(session, org_id)
        posted = await self.ledger.post_in(
            session, account, kind=EntryKind.DEBIT, amount=-units, now=now,
            **_debit_terms(request, week),
        )
        balance = posted.balance
        pct, runaway = self._debit_alerts(meter, plan, balance + units, balance)
        if pct is not None:
            await notify(
                self.db, session, org_id=org_id, type="extras.balance_threshold_crossed",
                key=f"extras.balance_threshold_crossed:{week}:{pct}",
                payload={"week": week, "threshold": pct, "balance": balance,
                         "grant": plan.signup_grant},
                now=now,
            )
        counted: Doc = {"$inc": {"overflow": units}}
        if runaway:
            await notify(
                self.db, session, org_id=org_id, type="extras.runaway_debit",
                key=f"extras.runaway_debit:{week}",
                payload={"week": week, "balance": balance, "quota": meter["quota"],
                         "factor": self.config.meter.runaway_factor},
                now=now,
            )
            counted["$set"] = {"runaway_alerted": True}
        await self.db.meters.update_one({"_id": meter["_id"]}, counted, session=session)
        return balance

    def _debit_alerts(self, meter: Doc, plan: PlanConfig, balance_before: int,
                      balance_after: int) -> tuple[int | None, bool]:
        """The alerts an overflow debit raises: the signup grant's threshold crossed (plans
        without quota), and whether the week turns runaway."""
        pct = (grant_alert(balance_before, balance_after, plan.signup_grant)
               if meter["quota"] == 0 else None)
        runaway = (is_runaway(balance_after, meter["quota"], self.config.meter.runaway_factor)
                   and not meter.get("runaway_alerted"))
        return pct, runaway

    def _usage_doc(
        self,
        request: UsageRequest,
        metered: Metered,
        meter: Doc,
        over: int,
        balance: int,
        now: datetime,
    ) -> Doc:
        costs = None if request.costs is None else {k: str(v) for k, v in request.costs.items()}
        return {
            "_id": usage_id(request),
            "org_id": request.org_id,
            "run_id": request.run_id,
            "step": request.step,
            "week": meter["week"],
            "costs": costs,
            "units_given": request.units,
            "units": metered.units,
            "breakdown": metered.breakdown,
            "result": metered.result,
            "capped": metered.capped,
            "overflow": over,
            "used": meter["used"],
            "quota": meter["quota"],
            "balance": balance,
            "plan_id": meter["plan_id"],
            "ratio_version": self.config.meter.ratio_version,
            "hold_id": request.hold_id,
            "created_at": now,
        }

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
        week = iso_week(now)
        meter = await self.db.meters.find_one({"org_id": org_id, "week": week})
        subscription = await self._status_in(None, org_id)
        active = (await holds.active_in(self.db, None, [org_id], now))[org_id]
        return self._gate(account, meter, subscription, active, now)

    def _gate(self, account: Doc, meter: Doc | None, subscription: Doc, active: list[Hold],
              now: datetime) -> tuple[Gate, MeterView]:
        """The gate and the meter view of an organization from what was read of it: its account,
        this week's meter (None: not opened yet, shown with the plan it would open with), its
        subscription and its active holds."""
        org_id, week = account["_id"], iso_week(now)
        reserved = held(active, now)
        if meter is not None:
            view = MeterView(org_id, week, int(meter["used"]), int(meter["quota"]),
                             meter["plan_id"], reserved)
        else:
            plan = effective_plan(self.config, account.get("plan_id"), subscription.get("status"))
            view = MeterView(org_id, week, 0, plan_quota(plan, int(account.get("seats") or 1)),
                             plan.id, reserved)
        gate = quota_gate(
            quota=view.quota, used=view.used, balance=int(account["balance"]),
            status=subscription.get("status"), past_due_since=subscription.get("past_due_since"),
            grace_days=self.config.subscriptions.grace_days, now=now, held=reserved,
        )
        return gate, view

    # ---- balance holds (SPEC §5.11) -------------------------------------------------------------

    async def hold(self, org_id: str, request: HoldRequest, now: datetime) -> Hold | Refusal:
        """Reserve units when the gate's remaining, net of every active hold, covers them. A
        granted `hold_id` answers its first hold, whatever the request says now; a refusal
        writes nothing.

        The hold joins the group commit (`_enqueue`): the holds of a process are decided in
        memory one after the other, with the records around them, inside shared transactions,
        so they never conflict with each other. Across processes, every transaction that grants
        a hold bumps its organization's hold lock (`billing.store.holds.lock_in`): grants that
        run at once write-conflict, MongoDB orders them, and the loser starts again and sees
        the winner's hold."""
        check_org_id(org_id)
        result = await self._enqueue(HoldOrder(org_id, request), now)
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
        before = await self.db.accounts.find_one({"_id": org_id}, {"plan_id": 1, "seats": 1},
                                                 session=session)
        if before is None:
            raise OrgNotFound(org_id)
        account = {"_id": org_id, "plan_id": plan_id, "seats": max(seats, 1)}
        await self.db.accounts.update_one(
            {"_id": org_id}, {"$set": {"plan_id": plan_id, "seats": account["seats"],
                                       "updated_at": now}}, session=session
        )
        status = (await self._status_in(session, org_id)).get("status")
        plan = effective_plan(self.config, plan_id, status)
        snapshot = self._snapshot(plan, account)
        week = iso_week(now)
        key = {"org_id": org_id, "week": week}
        previous_meter = await self.db.meters.find_one(key, session=session)
        await self.db.meters.update_one(
            key,
            {"$set": {**snapshot, "updated_at": now},
             "$setOnInsert": {**key, "used": 0, "created_at": now, **OVERFLOW_COUNTED}},
            upsert=True,
            session=session,
        )
        if previous_meter is not None:
            previous, previous_quota = previous_meter["plan_id"], previous_meter["quota"]
        else:
            earlier = effective_plan(self.config, before.get("plan_id"), status)
            previous = earlier.id
            previous_quota = plan_quota(earlier, int(before.get("seats") or 1))
        if (previous, previous_quota) == (plan.id, snapshot["quota"]):
            return False
        used = int(previous_meter["used"]) if previous_meter is not None else 0
        await notify(
            self.db, session, org_id=org_id, type="plan.changed",
            key=f"plan.changed:{now.isoformat()}:{previous}:{plan.id}:{snapshot['quota']}",
            payload={"week": week, "from": previous, "to": plan.id, "quota": snapshot["quota"],
                     "used": used},
            now=now,
        )
        meter = {"org_id": org_id, "week": week, "used": used, "quota": snapshot["quota"],
                 "plan_id": plan.id}
        await self._threshold_alerts_in(session, meter, 0, now)
        return True

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
            account = await self.db.accounts.find_one({"_id": org_id}, session=session)
            if account is None:
                raise OrgNotFound(org_id)
            meter = await self._open_in(session, account, week, now)
            if meter.get("reset_at") is not None:
                return ResetOrgResult(org_id=org_id, week=week, applied=False,
                                      settled=meter.get("settled", 0), used=meter["used"],
                                      quota=meter["quota"])
            await self.db.meters.update_many(
                {"org_id": org_id, "week": {"$lt": week}, "archived_at": None},
                {"$set": {"archived_at": now}},
                session=session,
            )
            settle = settlement_units(quota=meter["quota"], used=meter["used"],
                                      usage_debt=int(account.get("usage_debt", 0)))
            if settle > 0:
                posted = await self.ledger.write_in(
                    session, org_id, key=f"settle:{week}", kind=EntryKind.SETTLEMENT,
                    amount=settle, now=now, memo=f"usage debt settled by the quota of {week}",
                    meta={"week": week},
                )
                settle = posted.amount if posted.applied else 0
            # The meter was read in this transaction (a concurrent change is a write conflict
            # that restarts it), so the document after the update is known without reading it
            # back.
            await self.db.meters.update_one(
                {"_id": meter["_id"]},
                {"$set": {"reset_at": now, "settled": settle, "updated_at": now},
                 "$inc": {"used": settle}},
                session=session,
            )
            after = {**meter, "used": meter["used"] + settle}
            await self._threshold_alerts_in(session, after, meter["used"], now)
            return ResetOrgResult(org_id=org_id, week=week, applied=True, settled=settle,
                                  used=after["used"], quota=after["quota"])

        return await run_in_transaction(self.db.client, work)


class _Group:
    """One group's records applied in one transaction with a few commands for all of them: the
    accounts and meters they touch are read once, each record is decided in memory in arrival
    order, and the meter increments and usage records are written in bulk. The organizations
    some record takes past its quota are locked together and their overflow debits planned on
    a copy of their ledger (`billing.store.ledger.Debits`), then written in bulk too. A record
    that needs more (a meter to open, a plan that prices differently, an alert, an automatic
    top-up) is applied by `Meters._record_in` after the writes decided before it, so every
    record sees exactly the state the records before it left. Balance holds are decided in
    memory too, on the same accounts and meters plus their organizations' subscriptions and
    active holds (read once), in arrival order with the records (a record that settles a hold
    frees it for the holds after it); the holds granted are inserted in bulk, and each of their
    organizations' hold locks bumped once per flush.

    A record repeating the key of an earlier one in the group answers that one's result; with
    `replays`, records already stored are read first and answer their stored result.

    `failing[0]` names the record that raised, so the caller can take it out."""

    def __init__(self, meters: Meters, session: AsyncClientSession, members: list[_Pending],
                 failing: list[int], replays: bool = False) -> None:
        self.meters = meters
        self.replays = replays
        self.db = meters.db
        self.session = session
        self.members = members
        self.failing = failing
        self.accounts: dict[str, Doc] = {}
        self.open: dict[tuple[str, str], Doc] = {}
        #: per meter: units and overflow to add, and when
        self.increments: dict[tuple[str, str], tuple[int, int, datetime]] = {}
        self.records: list[tuple[int, Doc]] = []
        self.settles: list[UpdateOne] = []  # holds the records decided so far settle
        self.debits = Debits(meters.ledger, session)
        self.debited: list[int] = []  # the record behind each debit not written yet
        self.metered: dict[int, tuple[str, Metered]] = {}  # by record: (plan id, its units)
        # balance holds: each organization's subscription and active holds, as read and then
        # as the group changes them; the holds granted and the organizations to lock
        self.subscriptions: dict[str, Doc] = {}
        self.active: dict[str, list[Hold]] = {}
        self.granted: dict[str, Hold] = {}  # by key: a key repeated in the group answers it
        self.hold_docs: list[tuple[int, Doc]] = []
        self.to_lock: set[str] = set()

    async def apply(self) -> list[Outcome]:
        records = {i: p.request for i, p in enumerate(self.members)
                   if isinstance(p.request, UsageRequest)}
        orders = {i: p.request for i, p in enumerate(self.members)
                  if isinstance(p.request, HoldOrder)}
        await self._read({p.request.org_id for p in self.members},
                         {(p.request.org_id, iso_week(p.now)) for p in self.members})
        await self.debits.lock(self._overflowing(records))
        stored_holds: dict[str, Hold] = {}
        if orders:
            stored_holds = await self._read_holds(orders)
        keys = {i: usage_id(request) for i, request in records.items()}
        stored: dict[str, Doc] = {}
        if self.replays:
            cursor = self.db.usage.find({"_id": {"$in": list(keys.values())}},
                                        session=self.session)
            stored = {doc["_id"]: doc async for doc in cursor}
        first: dict[str, UsageResult] = {}
        results: list[Outcome] = []
        refused: dict[int, str] = {}  # refused holds, by index: their key
        for index, pending in enumerate(self.members):
            self.failing[0] = index
            if isinstance(pending.request, HoldOrder):
                decided = self._decide_hold(index, pending.request, pending.now, stored_holds)
                if isinstance(decided, Refusal):
                    refused[index] = hold_key(pending.request.org_id,
                                              pending.request.request.hold_id)
                results.append(decided)
                continue
            request, key = pending.request, keys[index]
            if key in stored:
                results.append(_stored_result(stored[key]))
                continue
            if key in first:
                results.append(replace(first[key], applied=False))
                continue
            fast = await self._decide(index, request, pending.now)
            if fast is None:
                await self._flush()
                self.debits.forget(request.org_id)
                fast = await self.meters._record_in(self.session, request, pending.now)
                await self._read({request.org_id}, {(request.org_id, iso_week(pending.now))})
            results.append(fast)
            first[key] = fast
            if request.hold_id is not None:
                self._settled(request.org_id, request.hold_id, pending.now)
        await self._flush()
        if refused:  # a repeated hold id answers its first hold, even when it would not fit now
            found = await holds.stored_in(self.db, self.session, refused.values())
            for index, key in refused.items():
                results[index] = found.get(key, results[index])
        return results

    async def _read_holds(self, orders: dict[int, HoldOrder]) -> dict[str, Hold]:
        """Read what the group's holds are decided on: their organizations' subscriptions and
        active holds, and (with `replays`) the holds stored under their keys."""
        orgs = sorted({order.org_id for order in orders.values()})
        cursor = self.db.subscriptions.find({"_id": {"$in": orgs}},
                                            {"status": 1, "past_due_since": 1},
                                            session=self.session)
        self.subscriptions = {doc["_id"]: doc async for doc in cursor}
        since = min(self.members[i].now for i in orders)
        self.active = await holds.active_in(self.db, self.session, orgs, since)
        if not self.replays:
            return {}
        return await holds.stored_in(self.db, self.session, (
            hold_key(order.org_id, order.request.hold_id) for order in orders.values()))

    def _decide_hold(self, index: int, order: HoldOrder, now: datetime,
                     stored: dict[str, Hold]) -> Hold | Refusal:
        """Decide one hold on the group's state (`billing.holds.decide_hold`); a granted one
        counts for the ones after it and is written by the next flush."""
        org_id, request = order.org_id, order.request
        key = hold_key(org_id, request.hold_id)
        if key in stored or key in self.granted:
            return stored.get(key) or self.granted[key]
        account = self.accounts.get(org_id)
        if account is None:
            raise OrgNotFound(org_id)
        gate, view = self.meters._gate(account, self.open.get((org_id, iso_week(now))),
                                       self.subscriptions.get(org_id, {}),
                                       self.active[org_id], now)
        units = request.units
        if units is None:
            config = self.meters.config
            units = units_from_costs(request.costs, config.plan(view.plan_id),
                                     config.meter).units
        decided = decide_hold(gate, hold_id=request.hold_id, units=units,
                              ttl_seconds=request.ttl_seconds, now=now)
        if isinstance(decided, Hold):
            self.active[org_id].append(decided)
            self.granted[key] = decided
            self.hold_docs.append((index, holds.hold_doc(org_id, decided, now)))
            self.to_lock.add(org_id)
        return decided

    def _settled(self, org_id: str, hold_id: str, now: datetime) -> None:
        """A record settled `hold_id`: it no longer counts for the group's next holds."""
        if org_id in self.active:
            self.active[org_id] = [hold for hold in self.active[org_id]
                                   if hold.hold_id != hold_id or not hold.active(now)]

    def _overflowing(self, records: dict[int, UsageRequest]) -> set[str]:
        """The organizations some record takes past its quota, as far as the meters read say."""
        used = {key: int(meter["used"]) for key, meter in self.open.items()}
        found: set[str] = set()
        for index, request in records.items():
            key = (request.org_id, iso_week(self.members[index].now))
            meter = self.open.get(key)
            if meter is None or key[0] not in self.accounts:
                continue
            try:
                used[key] += self._metered(index, meter).units
            except BillingError:
                continue  # refused when it is decided
            if used[key] > int(meter["quota"]):
                found.add(key[0])
        return found

    def _metered(self, index: int, meter: Doc) -> Metered:
        """The units of record `index` on `meter`'s plan, worked out once per group."""
        plan_id = str(meter["plan_id"])
        known = self.metered.get(index)
        if known is None or known[0] != plan_id:
            config = self.meters.config
            request = self.members[index].request
            assert isinstance(request, UsageRequest)
            known = (plan_id, meter_usage(request, config.plan(plan_id), config.meter))
            self.metered[index] = known
        return known[1]

    async def _read(self, orgs: set[str], keys: set[tuple[str, str]]) -> None:
        cursor = self.db.accounts.find({"_id": {"$in": sorted(orgs)}},
                                       {"balance": 1, "plan_id": 1, "seats": 1},
                                       session=self.session)
        self.accounts.update({doc["_id"]: doc async for doc in cursor})
        weeks = {week for _, week in keys}
        cursor = self.db.meters.find({"org_id": {"$in": sorted(orgs)},
                                      "week": {"$in": sorted(weeks)}}, session=self.session)
        found = {(doc["org_id"], doc["week"]): doc async for doc in cursor}
        for key in keys:
            if key in found:
                self.open[key] = found[key]
            else:
                self.open.pop(key, None)

    async def _decide(self, index: int, request: UsageRequest,
                      now: datetime) -> UsageResult | None:
        """The record's result when the bulk path can apply it, else None."""
        account = self.accounts.get(request.org_id)
        if account is None:
            raise OrgNotFound(request.org_id)
        week = iso_week(now)
        meter = self.open.get((request.org_id, week))
        if meter is None:
            return None
        config = self.meters.config
        plan = config.plan(meter["plan_id"])
        if plan.ratios != config.plan(account.get("plan_id")).ratios:
            return None
        metered = self._metered(index, meter)
        prev_used, quota = int(meter["used"]), int(meter["quota"])
        used = prev_used + metered.units
        if thresholds_crossed(prev_used, used, quota, config.meter.alert_thresholds):
            return None
        over = overflow(prev_used, used, quota)
        if over > 0:
            await self.debits.lock({request.org_id})
            planned = self.debits.plan(request.org_id, over, now)
            pct, runaway = self.meters._debit_alerts(meter, plan, planned.balance_before,
                                                     planned.balance_after)
            if pct is not None or runaway or would_trigger(
                    self.debits.account(request.org_id), balance_after=planned.balance_after,
                    now=now):
                return None
            self.debits.apply(planned, now=now, **_debit_terms(request, week))
            self.debited.append(index)
            account["balance"] = planned.balance_after
        meter["used"] = used
        units, overflowed, _ = self.increments.get((request.org_id, week), (0, 0, now))
        self.increments[(request.org_id, week)] = (units + metered.units, overflowed + over, now)
        balance = int(account["balance"])
        self.records.append((index, self.meters._usage_doc(request, metered, meter, over,
                                                           balance, now)))
        if request.hold_id is not None:
            self.settles.append(_settle(request, now))
        return UsageResult(applied=True, units=metered.units, overflow=over, week=week,
                           used=used, quota=quota, balance=balance)

    async def _flush(self) -> None:
        """Write what the records decided so far: the usage records (first: a repeated key
        shows there), the meter increments and the debits, each in one bulk command."""
        if self.records:
            records, self.records = self.records, []
            await self._bulk(records, self.db.usage.insert_many([doc for _, doc in records],
                                                                ordered=True,
                                                                session=self.session))
        if self.increments:
            await self.db.meters.bulk_write([
                UpdateOne({"org_id": org, "week": week},
                          {"$inc": {"used": units, "overflow": overflowed},
                           "$set": {"updated_at": now}})
                for (org, week), (units, overflowed, now) in self.increments.items()
            ], ordered=True, session=self.session)
            self.increments = {}
        if self.to_lock:
            to_lock, self.to_lock = self.to_lock, set()
            await holds.lock_in(self.db, self.session, to_lock)
        if self.hold_docs:  # before the settlements: a record may settle a hold of the group
            hold_docs, self.hold_docs = self.hold_docs, []
            await self._bulk(hold_docs, self.db.holds.insert_many(
                [doc for _, doc in hold_docs], ordered=True, session=self.session))
        if self.settles:
            settles, self.settles = self.settles, []
            await self.db.holds.bulk_write(settles, ordered=True, session=self.session)
        if self.debited:
            debited, self.debited = self.debited, []
            first = min(debited)
            await self._bulk([(i, {}) for i in debited], self.debits.flush(
                self.members[first].now))

    async def _bulk(self, written: list[tuple[int, Doc]], write: Awaitable[object]) -> None:
        """Run a bulk write of the records `written` (index in the group, document); a
        duplicate key names the record that wrote it, so the caller can take it out."""
        try:
            await write
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if errors and errors[0].get("code") == DUPLICATE_KEY:
                self.failing[0] = written[min(errors[0]["index"], len(written) - 1)][0]
                raise DuplicateKeyError(errors[0].get("errmsg", "duplicate key")) from exc
            raise
