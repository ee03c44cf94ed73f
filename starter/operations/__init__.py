"""Operator tooling behind the CLI, one module per job: failures, retries, replay, schedules and
admin adjustments."""
