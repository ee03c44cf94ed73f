"""What the engine asks of MongoDB so that an acknowledged write survives a crash, and the check
that the server it was given can honour it.

Every write, inside a transaction or not, is sent with `DURABLE` (`w: "majority", j: true`): the
server answers only once a majority of the replica set has the write in its on-disk journal, so
neither a `kill -9` nor a power loss nor a failover takes back an acknowledged change of money.
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo import WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from billing.config import ConfigError

log = logging.getLogger(__name__)

DURABLE = WriteConcern("majority", j=True)

#: MongoDB's error code for a command the connected user may not run.
UNAUTHORIZED = 13


async def check_durable(admin: AsyncDatabase[dict[str, Any]]) -> None:
    """Refuse (`ConfigError`) a server whose settings cannot give `DURABLE`.

    - A standalone `mongod` has no replica set: no transactions, and no majority to wait for.
    - A storage engine that is not persistent (`inMemory`) keeps no journal.

    SecantusDB (the embedded server) is durable only when it runs with `--sync-on-commit`
    (`billing dev` and the test fixtures start it so); no command reports that flag, so against an
    external SecantusDB the check can only say so in the log.
    """
    hello = await admin.command("hello")
    if "setName" not in hello and hello.get("msg") != "isdbgrid":
        raise ConfigError(
            "MongoDB is a standalone server: the engine writes with w: \"majority\" in "
            "transactions, which need a replica set (a one-node replica set will do: "
            "docker-compose.yml runs one)")
    try:
        status = await admin.command("serverStatus", repl=0, metrics=0, locks=0)
    except OperationFailure as exc:
        if exc.code != UNAUTHORIZED:
            raise
        log.info("MongoDB durability: serverStatus is not allowed for this user; the storage "
                 "engine was not checked")
        return
    engine = status.get("storageEngine", {})
    if engine.get("persistent") is False:
        raise ConfigError(
            f"MongoDB's storage engine {engine.get('name', '?')!r} is not persistent: an "
            "acknowledged write would not survive a restart")
    if status.get("process") == "secantus":
        log.info("MongoDB durability: SecantusDB keeps acknowledged commits across a crash only "
                 "when started with --sync-on-commit, which no command reports")
