"""Stripe's events and objects read as plain data (SPEC §5.1, §5.4, §5.5): every decision the
engine takes on a Stripe event is a pure function here, one module per event family.

No database, no clock, no I/O: activities read what a decision needs, call it, and write the
result in one transaction; the workflow calls the same functions to decide what to read.
"""

from datetime import timedelta

#: One request to the Stripe API: the engine's client gives up after this long, so an activity of
#: several reads can be given a bound (`workflows.stripe_event.PURCHASE_TIMEOUT`).
REQUEST_TIMEOUT = timedelta(seconds=20)
