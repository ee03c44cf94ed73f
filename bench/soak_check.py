"""The chaos soak's invariants, checked once everything is healed and quiet. Each check returns
violations (what is wrong, naming the organization) instead of stopping at the first."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from dataclasses import dataclass

from ledger_checks import violations
from soak_cluster import Cluster
from soak_workload import TOPUP_MAX_PER_MONTH, ScenarioPlay, UsageOrg
from stripe_fake import StripeFake
from temporalio.client import Client
from webhook_receiver import Receiver

from billing.clock import utcnow
from billing.store.database import Database
from billing.store.holds import active_in
from starter.embedded import find_binary
from starter.operations.failures import list_failed


@dataclass(frozen=True)
class Violation:
    org: str
    what: str

    def __str__(self) -> str:
        return f"{self.org}: {self.what}"


async def ledger(db: Database, org: str) -> list[Violation]:
    """SPEC §5.1 on what is stored (`tests/ledger_checks.py`, shared with the tests)."""
    return [Violation(org, f"ledger: {problem}") for problem in await violations(db, org)]


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
    found += await _purchases_and_holds(db, fake, model)
    used = sum([m["used"] async for m in db.meters.find({"org_id": org}, {"used": 1})])
    if used != model.used:
        found.append(Violation(org, f"meters count {used} units, {model.records} acknowledged "
                                    f"records carry {model.used}"))
    return found


async def _purchases_and_holds(db: Database, fake: StripeFake,
                               model: UsageOrg) -> list[Violation]:
    """One Checkout Session per checkout the engine answered (its idempotency keys held across
    the faults), one customer made for the organization when it checked out, and no hold left
    counting: every granted hold was settled by its run's usage or released."""
    org = model.org
    found = []
    sessions = [s for s in fake.created.get("checkout.session", [])
                if s["metadata"].get("org_id") == org]
    if len(sessions) != model.checkouts:
        found.append(Violation(org, f"{len(sessions)} Checkout Sessions for {model.checkouts} "
                                    "checkouts"))
    customers = [c for c in fake.created.get("customer", []) if c["metadata"].get("org_id") == org]
    if len(customers) != (1 if model.checkouts else 0):
        found.append(Violation(org, f"{len(customers)} customers made, {model.checkouts} "
                                    "checkouts"))
    counting = len(await active_in(db, org, utcnow()))
    if counting:
        found.append(Violation(org, f"{counting} holds still counting after every run ended"))
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


async def reconciliation(env: dict[str, str], expected: dict[str, set[str]]) -> list[Violation]:
    """`billing reconcile --now` afterwards repairs no missed event and reports exactly the
    divergences the scenarios expect (`final.reconcile`: a subscription whose price no plan has
    stays `plan_unresolved` until an operator configures it)."""
    done = await asyncio.to_thread(
        subprocess.run, [find_binary("billing"), "reconcile", "--now", "--json"], env=env,
        capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return [Violation("-", f"billing reconcile --now exited {done.returncode}: "
                               f"{done.stderr.strip()[-500:]}")]
    report = json.loads(done.stdout)
    found: list[Violation] = []
    reported: dict[str, set[str]] = {}
    for divergence in report["divergences"]:
        reported.setdefault(divergence.get("org_id") or "-", set()).add(divergence["kind"])
    for org in sorted(set(reported) | set(expected)):
        got, wanted = sorted(reported.get(org, [])), sorted(expected.get(org, []))
        if got != wanted:
            details = [d for d in report["divergences"] if d.get("org_id") == org]
            found.append(Violation(org, f"reconciliation reports {got}, expected {wanted}: "
                                        f"{details}"))
    found += [Violation(r.get("org_id") or "-", f"reconciliation repaired a missed event: {r}")
              for r in report["repaired_events"]]
    if report.get("events_error"):
        found.append(Violation("-", f"reconciliation: {report['events_error']}"))
    return found


async def check_all(plays: list[ScenarioPlay], orgs: list[UsageOrg], cluster: Cluster,
                    client: Client, db: Database) -> list[Violation]:
    """Every invariant of every organization, then the failed workflows and the
    reconciliation."""
    found: list[Violation] = []
    expected_failures: Counter[str] = Counter()
    expected_divergences: dict[str, set[str]] = {}
    for play in plays:
        found += await scenario(play)
        final = play.scenario.get("final") or {}
        expected_failures[play.org] += int(final.get("failed", 0))
        if final.get("reconcile"):
            expected_divergences[play.org] = set(final["reconcile"])
    for org in orgs:
        found += await usage_org(db, cluster.fake, org)
    for org_id in [p.org for p in plays] + [o.org for o in orgs]:
        if await db.accounts.count_documents({"_id": org_id}):
            found += await ledger(db, org_id)
        found += await feed(db, cluster.receiver, org_id)
    found += await failed_workflows(client, cluster.settings.temporal_task_queue,
                                    expected_failures)
    found += await reconciliation(cluster.environment(), expected_divergences)
    return found
