"""The time a local step is given: every attempt of its retry policy and the backoffs between."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.common import RetryPolicy

from workflows.common import ACTIVITY_RETRY, ACTIVITY_TIMEOUT, attempt_limit, retry_budget


def test_five_attempts_and_their_doubling_backoffs() -> None:
    # 5 x 20 s, then 1 + 2 + 4 + 8 s between them.
    assert retry_budget(ACTIVITY_TIMEOUT, ACTIVITY_RETRY) == timedelta(seconds=115)


def test_the_backoff_stops_at_its_maximum_interval() -> None:
    policy = RetryPolicy(initial_interval=timedelta(seconds=10), backoff_coefficient=3.0,
                         maximum_interval=timedelta(seconds=20), maximum_attempts=4)
    assert retry_budget(timedelta(seconds=1), policy) == timedelta(seconds=4 + 10 + 20 + 20)


def test_one_attempt_has_no_backoff() -> None:
    policy = RetryPolicy(maximum_attempts=1)
    assert retry_budget(timedelta(seconds=7), policy) == timedelta(seconds=7)


def test_unlimited_attempts_have_no_budget() -> None:
    with pytest.raises(ValueError, match="bounded"):
        retry_budget(timedelta(seconds=1), RetryPolicy(maximum_attempts=0))


def test_the_attempt_limit_is_the_inverse_of_the_budget() -> None:
    for seconds in (1, 20, 30, 80):
        attempt = timedelta(seconds=seconds)
        assert attempt_limit(retry_budget(attempt)) == attempt
