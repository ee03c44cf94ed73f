"""The `billing` application: one command group per module of this package, registered here.

Commands import the engine (pymongo, temporalio, FastAPI) only when they run, so `billing
--help` stays fast.
"""

from __future__ import annotations

import typer

from starter.cli import (
    adjustments,
    auto_topup,
    events,
    orgs,
    processes,
    reconcile,
    schedules,
    webhooks,
)

app = typer.Typer(
    name="billing",
    help="Billing engine: weekly plan quotas, prepaid credit packs and Stripe events on Temporal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold tokens and secrets
)

for group in (processes, orgs, adjustments, auto_topup, events, schedules, reconcile,
              webhooks):
    group.register(app)
