"""Run one unit of work in one MongoDB transaction, retrying what MongoDB says is transient."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pymongo import AsyncMongoClient, ReadPreference
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import (
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.read_concern import ReadConcern

from billing.store.durability import DURABLE

T = TypeVar("T")

Work = Callable[[AsyncClientSession], Awaitable[T]]

#: Give up after this long; the caller (an activity) then fails and Temporal retries it.
TRANSACTION_DEADLINE_S = 30.0

_AFTER_COMMIT: weakref.WeakKeyDictionary[AsyncClientSession, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


def after_commit(session: AsyncClientSession, callback: Callable[[], None]) -> None:
    """Run `callback` once the transaction of `session` has committed (metrics, never writes).

    A transaction that is retried or aborted drops the callbacks of its failed attempts, so a
    counter counts what was really written.
    """
    _AFTER_COMMIT.setdefault(session, []).append(callback)


def _has_label(exc: PyMongoError, label: str) -> bool:
    return exc.has_error_label(label)


def _server_unreachable(exc: PyMongoError) -> bool:
    """No server answered within `serverSelectionTimeoutMS`: this attempt is over. Retrying here
    would hide an outage inside one activity attempt; the caller's retry policy (Temporal's
    backoff, five attempts) is the budget."""
    return isinstance(exc, ServerSelectionTimeoutError)


def _is_transient(exc: PyMongoError) -> bool:
    if _server_unreachable(exc):
        return False
    if _has_label(exc, "TransientTransactionError"):
        return True
    # A write conflict outside the label (some servers omit it on the first statement).
    return isinstance(exc, OperationFailure) and exc.code == 112


async def run_in_transaction(
    client: AsyncMongoClient[dict[str, Any]],
    work: Work[T],
    *,
    deadline_s: float = TRANSACTION_DEADLINE_S,
) -> T:
    """Run `work(session)` inside a snapshot transaction committed with `DURABLE` writes.

    Write conflicts and other `TransientTransactionError`s restart the whole unit of work after a
    short jittered backoff (so 50 writers on one account converge instead of thrashing); an
    `UnknownTransactionCommitResult` retries the commit alone. Anything else propagates with the
    transaction aborted, so nothing is half-written.
    """
    started = time.monotonic()
    attempt = 0
    async with client.start_session() as session:
        while True:
            attempt += 1
            _AFTER_COMMIT.pop(session, None)
            await session.start_transaction(
                read_concern=ReadConcern("snapshot"),
                write_concern=DURABLE,
                read_preference=ReadPreference.PRIMARY,
            )
            try:
                result = await work(session)
            except PyMongoError as exc:
                await _abort(session)
                _AFTER_COMMIT.pop(session, None)
                if _is_transient(exc) and time.monotonic() - started < deadline_s:
                    await _backoff(attempt)
                    continue
                raise
            except BaseException:
                await _abort(session)
                _AFTER_COMMIT.pop(session, None)
                raise
            try:
                await _commit(session, started, deadline_s)
            except PyMongoError as exc:
                if _is_transient(exc) and time.monotonic() - started < deadline_s:
                    await _backoff(attempt)
                    continue
                raise
            for callback in _AFTER_COMMIT.pop(session, []):
                callback()
            return result


async def _commit(session: AsyncClientSession, started: float, deadline_s: float) -> None:
    while True:
        try:
            await session.commit_transaction()
            return
        except (ConnectionFailure, OperationFailure) as exc:
            if (
                _has_label(exc, "UnknownTransactionCommitResult")
                and not _server_unreachable(exc)
                and time.monotonic() - started < deadline_s
            ):
                continue
            raise


async def _abort(session: AsyncClientSession) -> None:
    if session.in_transaction:
        # When this fails the server aborts on its own once the session goes away.
        with contextlib.suppress(PyMongoError):
            await session.abort_transaction()


async def _backoff(attempt: int) -> None:
    cap = min(0.002 * (2 ** min(attempt, 8)), 0.25)
    await asyncio.sleep(random.uniform(0, cap))  # noqa: S311 - jitter, not cryptography
