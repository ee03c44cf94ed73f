"""The chaos soak's invariants, checked once everything is healed and quiet. Each check returns
violations (what is wrong, naming the organization) instead of stopping at the first."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from dataclasses import dataclass

from faults import assert_ledger_invariants
from soak_workload import TOPUP_MAX_PER_MONTH, ScenarioPlay, UsageOrg
from stripe_fake import StripeFake
from temporalio.client import Client
from webhook_receiver import Receiver

from billing.store.database import Database
from starter.embedded import find_binary
from starter.operations.failures import list_failed


@dataclass(frozen=True)
class Violation:
    org: str
    what: str

    def __str__(self) -> str:
        return f"{self.org}: {self.what}"


async def ledger(db: Database, org: str) -> list[Violation]:
    """SPEC §5.1 on what is stored: balance == sum(entries) == lots' remaining - debts, each key
    once, signs by kind, no purchase clawed back beyond what it bought."""
    try:
        await assert_ledger_invariants(db, org)
    except AssertionError as exc:
        return [Violation(org, f"ledger invariant broken: {exc}")]
    return []


async def feed(db: Database, receiver: Receiver, org: str) -> list[Violation]:
    """The feed is gapless (`seq` 1..n) and the receiver heard every notification at least once."""
    found: list[Violation] = []
    seqs = [n["seq"] async for n in db.notifications.find(
        {"org_id": org}, {"seq": 1}).sort("seq", 1)]
    if seqs != list(range(1, len(seqs) + 1)):
        found.append(Violation(org, f"the feed has gaps or repeats: {seqs}"))
    heard = {r.body["seq"] for r in receiver.of(org) if r.verified}
    missing = sorted(set(seqs) - heard)
    if missing:
        found.append(Violation(org, f"notifications never delivered: seq {missing}"))
    return found


async def usage_org(db: Database, fake: StripeFake, model: UsageOrg) -> list[Violation]:
    """The organization's balance, week usage and top-ups against the model."""
    org = model.org
    found = [Violation(org, problem) for problem in model.problems]
    intents = fake.intents_of(model.customer) if model.customer else []
    paid = [pi for pi in intents if pi["status"] == "succeeded"]
    if len(paid) > TOPUP_MAX_PER_MONTH:
        found.append(Violation(org, f"{len(paid)} top-ups, at most {TOPUP_MAX_PER_MONTH} a month"))
    for pi in paid:
        if await db.ledger.count_documents({"org_id": org, "key": f"payment:{pi['id']}"}) != 1:
            found.append(Violation(org, f"top-up {pi['id']} paid on Stripe, not credited once"))
    account = await db.accounts.find_one({"_id": org})
    balance = account["balance"] if account else None
    expected = model.expected_balance(len(paid))
    if balance != expected:
        found.append(Violation(org, f"balance {balance}, the model says {expected} (used "
                                    f"{model.used}, packs {model.packs}, credited "
                                    f"{model.credited}, top-ups {len(paid)})"))
    used = sum([m["used"] async for m in db.meters.find({"org_id": org}, {"used": 1})])
    if used != model.used:
        found.append(Violation(org, f"meters count {used} units, {model.records} acknowledged "
                                    f"records carry {model.used}"))
    return found


async def scenario(play: ScenarioPlay) -> list[Violation]:
    """The scenario's `final` (balance, lots, plan, notifications, failed runs)."""
    try:
        await play.finish()
    except AssertionError as exc:
        return [Violation(play.org, f"{play.scenario['name']}: {exc}")]
    return []


async def failed_workflows(client: Client, task_queue: str,
                           expected: Counter[str]) -> list[Violation]:
    """Failed workflows beyond those a scenario expects of its organization."""
    found: list[Violation] = []
    failed = Counter(f.org_id or "?" for f in await list_failed(client, task_queue=task_queue))
    for org, count in failed.items():
        if count > expected[org]:
            found.append(Violation(org, f"{count} failed workflows, {expected[org]} expected"))
    return found


async def reconciliation(env: dict[str, str]) -> list[Violation]:
    """`billing reconcile --now` afterwards finds no divergence and repairs no missed event."""
    done = await asyncio.to_thread(
        subprocess.run, [find_binary("billing"), "reconcile", "--now", "--json"], env=env,
        capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return [Violation("-", f"billing reconcile --now exited {done.returncode}: "
                               f"{done.stderr.strip()[-500:]}")]
    report = json.loads(done.stdout)
    found = [Violation(d.get("org_id") or "-", f"reconciliation: {d}")
             for d in report["divergences"]]
    found += [Violation(r.get("org_id") or "-", f"reconciliation repaired a missed event: {r}")
              for r in report["repaired_events"]]
    if report.get("events_error"):
        found.append(Violation("-", f"reconciliation: {report['events_error']}"))
    return found
