"""The process-wide objects every entry point builds once: settings, configuration, database and
the stores over it. `Meters` keeps per-process locks, so a process must share one."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from billing.config import BillingConfig, Settings, load_config
from billing.store.accounts import Accounts
from billing.store.auto_topups import AutoTopUps
from billing.store.checkouts import Checkouts
from billing.store.database import Database
from billing.store.ledger import Ledger
from billing.store.meters import Meters
from billing.store.reconcile import ReconcileStore
from billing.store.subscriptions import Subscriptions

SERVER_SELECTION_TIMEOUT_MS = 5000


@dataclass
class Runtime:
    settings: Settings
    config: BillingConfig
    db: Database

    @classmethod
    def from_settings(cls, settings: Settings, config: BillingConfig | None = None) -> Runtime:
        """Every process builds its runtime here. MongoDB server selection gives up after 5 s
        (the driver waits 30 s): an outage then fails an activity attempt quickly and Temporal's
        retry policy, not a hidden wait, is the budget."""
        return cls(
            settings=settings,
            config=config or load_config(settings.billing_config),
            db=Database(settings.mongodb_uri, settings.mongodb_db,
                        serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS),
        )

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.db)

    @cached_property
    def accounts(self) -> Accounts:
        return Accounts(self.db, self.config)

    @cached_property
    def meters(self) -> Meters:
        return Meters(self.db, self.config)

    @cached_property
    def subscriptions(self) -> Subscriptions:
        return Subscriptions(self.db)

    @cached_property
    def reports(self) -> ReconcileStore:
        return ReconcileStore(self.db)

    @cached_property
    def auto_topups(self) -> AutoTopUps:
        return AutoTopUps(self.db, self.config)

    @cached_property
    def checkouts(self) -> Checkouts:
        return Checkouts(self.db)
