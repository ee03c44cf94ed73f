"""What every billing workflow shares: the activity retry policy and a typed activity call.

Workflows never import an I/O library, so they call the activities' typed stubs
(`workflows.steps`) rather than the implementations.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

A = TypeVar("A")
T = TypeVar("T")

#: An activity's stub (`workflows.steps`): one argument, a typed result.
Step = Callable[[A], Awaitable[T]]

#: SPEC §6: at most five attempts with exponential backoff, then the workflow fails and stays
#: in Temporal as the dead letter. Invalid input is raised as a non-retryable ApplicationError.
ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)

#: Start-to-close of an activity that writes one event's or one organization's change: it takes
#: milliseconds, so a worker killed in the middle of one is retried after seconds, not a minute.
ACTIVITY_TIMEOUT = timedelta(seconds=20)
#: A Stripe API read (the SDK's own retries are off; Temporal's attempts are the visible ones,
#: run by the worker for a local step).
STRIPE_TIMEOUT = timedelta(seconds=30)
#: Work over many documents: a page of the reconciliation, one organization's lots.
PAGE_TIMEOUT = timedelta(seconds=120)

#: The errors a bug or a malformed payload raises in workflow code: they fail the workflow (a
#: visible dead letter) instead of retrying its task forever (set on every workflow definition as
#: `failure_exception_types`). Deliberately not `Exception`: a `NondeterminismError` after a deploy
#: (new code that no longer replays a running workflow's history) must fail only the task, which
#: Temporal retries until a worker that replays it rolls out, instead of failing every run in
#: flight. The engine's own `ApplicationError`s and exhausted activities fail the workflow anyway.
FAIL_ON: list[type[BaseException]] = [
    ArithmeticError, AssertionError, AttributeError, LookupError, TypeError, ValueError,
]


def _backoffs(policy: RetryPolicy) -> tuple[int, timedelta]:
    """The attempts of `policy` and the sum of the backoffs between them."""
    attempts = policy.maximum_attempts
    if attempts < 1:
        raise ValueError("a local activity needs a bounded number of attempts")
    # Temporal's default maximum interval is 100 times the initial one.
    longest = policy.maximum_interval or policy.initial_interval * 100
    interval, waits = policy.initial_interval, timedelta(0)
    for _ in range(attempts - 1):
        waits += interval
        interval = min(interval * policy.backoff_coefficient, longest)
    return attempts, waits


def retry_budget(attempt: timedelta, policy: RetryPolicy = ACTIVITY_RETRY) -> timedelta:
    """Every attempt of `policy` at `attempt` each, and the backoffs between them: a local
    activity's start-to-close. The SDK's core ends a local activity's attempt when the
    start-to-close timer of any earlier attempt fires (measured: the fifth attempt of a 20 s
    step, begun 19 s after the first, timed out at 20 s and its real error was lost), so a local
    step gets its whole budget there, and the worker bounds each attempt (`attempt_limit`)."""
    attempts, waits = _backoffs(policy)
    return attempt * attempts + waits


def attempt_limit(budget: timedelta, policy: RetryPolicy = ACTIVITY_RETRY) -> timedelta:
    """The time one attempt of a local step may take, from its `retry_budget`."""
    attempts, waits = _backoffs(policy)
    return (budget - waits) / attempts


async def call(
    activity: Step[A, T], arg: A, *, start_to_close: timedelta = ACTIVITY_TIMEOUT,
    heartbeat: timedelta | None = None, retry_policy: RetryPolicy = ACTIVITY_RETRY,
    schedule_to_close: timedelta | None = None, local: bool = False,
) -> T:
    """Run `activity` (a stub of `workflows.steps`) with the shared retry policy (unless another
    is given) and return its result, typed as the stub says; a long activity that heartbeats
    passes its `heartbeat` timeout.

    `local` runs it as a local activity: in the worker running the workflow task, recorded as a
    marker in that task's completion. That spares the server an activity task and the workflow
    a second task, so it suits a short step that cannot heartbeat. Each attempt is still bounded
    by `start_to_close` (the worker enforces it: `worker.LocalAttemptLimit`); the attempts are
    retried by the worker (the same five) and are visible only in its logs and metrics until the
    last one fails the workflow.
    """
    if local:
        if heartbeat is not None or retry_policy is not ACTIVITY_RETRY:
            raise ValueError(f"{activity.__name__}: a local step has the shared retry policy, "
                             "no heartbeat")
        return await workflow.execute_local_activity(
            activity,
            arg,
            start_to_close_timeout=retry_budget(start_to_close, retry_policy),
            schedule_to_close_timeout=schedule_to_close,
            retry_policy=retry_policy,
        )
    return await workflow.execute_activity(
        activity,
        arg,
        start_to_close_timeout=start_to_close,
        heartbeat_timeout=heartbeat,
        schedule_to_close_timeout=schedule_to_close,
        retry_policy=retry_policy,
    )
