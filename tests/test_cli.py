"""The `billing` command line, run as the installed console script against the session database."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path

import pytest
from cli_helpers import billing

from billing.config import BillingConfig, Settings
from billing.ledger import EntryKind
from billing.store.accounts import Accounts
from billing.store.ledger import Ledger

EXAMPLE = Path(__file__).resolve().parents[1] / "billing" / "billing.example.toml"


@pytest.fixture
def store_env(settings: Settings) -> dict[str, str]:
    return {"MONGODB_URI": settings.mongodb_uri, "MONGODB_DB": settings.mongodb_db}


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "billing.toml"
    path.write_text(EXAMPLE.read_text().replace("dollars_to_units = 1000", "dollars_to_units = 0"))
    return path


async def test_balance_json_matches_the_store(
    org: str, accounts: Accounts, ledger: Ledger, config: BillingConfig, now: datetime,
    store_env: dict[str, str],
) -> None:
    await accounts.register(org, now)
    await ledger.write(org, key="admin:cli-1", kind=EntryKind.ADJUSTMENT, amount=1234, now=now)
    await ledger.write(org, key="usage:run-1:initial", kind=EntryKind.DEBIT, amount=-34, now=now)

    result = await billing("balance", org, "--json", env=store_env)

    assert result.code == 0, result.err
    body = json.loads(result.out)
    grant = config.default_plan.signup_grant
    assert body["org_id"] == org
    assert body["balance"] == grant + 1234 - 34
    assert sum(lot["remaining"] for lot in body["lots"]) == body["balance"]
    assert sorted(lot["units"] for lot in body["lots"]) == sorted([grant, 1234])
    assert set(body["lots"][0]) == {"id", "kind", "units", "remaining", "expires_at"}


async def test_ledger_json_is_newest_first_and_limited(
    org: str, accounts: Accounts, ledger: Ledger, now: datetime, store_env: dict[str, str],
) -> None:
    await accounts.register(org, now)
    await ledger.write(org, key="admin:cli-2", kind=EntryKind.ADJUSTMENT, amount=700, now=now)
    await ledger.write(org, key="usage:run-2:initial", kind=EntryKind.DEBIT, amount=-5, now=now)

    everything = await billing("ledger", org, "--json", env=store_env)
    first = await billing("ledger", org, "--json", "--limit", "1", env=store_env)

    assert everything.code == 0, everything.err
    entries = json.loads(everything.out)["entries"]
    assert [e["key"] for e in entries] == ["usage:run-2:initial", "admin:cli-2", "grant:signup"]
    assert [e["amount"] for e in entries[:2]] == [-5, 700]
    assert json.loads(everything.out)["next_cursor"] is None
    page = json.loads(first.out)
    assert [e["key"] for e in page["entries"]] == ["usage:run-2:initial"]
    assert page["next_cursor"] is not None


async def test_human_output_shows_balance_and_entries(
    org: str, accounts: Accounts, config: BillingConfig, now: datetime,
    store_env: dict[str, str],
) -> None:
    await accounts.register(org, now)

    shown = await billing("balance", org, env=store_env)
    listed = await billing("ledger", org, env=store_env)

    assert shown.code == 0, shown.err
    assert f"balance {config.default_plan.signup_grant} units" in shown.out
    assert listed.code == 0, listed.err
    assert "grant:signup" in listed.out
    assert f"+{config.default_plan.signup_grant}" in listed.out


async def test_tables_keep_every_id_whole_on_one_line_at_any_width(
    org: str, accounts: Accounts, ledger: Ledger, now: datetime, store_env: dict[str, str],
) -> None:
    """SPEC §7: an operator copies ids from the tables, so none is folded, whatever the
    terminal's width (here 40 columns, narrower than any row)."""
    await accounts.register(org, now)
    key = f"admin:{'a-long-request-id-' * 3}end"
    await ledger.write(org, key=key, kind=EntryKind.ADJUSTMENT, amount=7, now=now)
    lot = (await ledger.lots(org))[0]["_id"]

    listed = await billing("ledger", org, env={**store_env, "COLUMNS": "40"})
    shown = await billing("balance", org, env={**store_env, "COLUMNS": "40"})

    assert listed.code == 0 and shown.code == 0, listed.err + shown.err
    assert any(key in line for line in listed.out.splitlines()), listed.out
    assert any(lot in line for line in shown.out.splitlines()), shown.out


@pytest.mark.parametrize("command", ["balance", "ledger"])
async def test_unknown_org_exits_1_with_a_clear_message(
    command: str, org: str, store_env: dict[str, str],
) -> None:
    result = await billing(command, org, "--json", env=store_env)

    assert result.code == 1
    assert "ORG_NOT_FOUND" in result.err
    assert org in result.err
    assert "Traceback" not in result.err + result.out
    assert result.out == ""


async def test_invalid_org_id_exits_1(store_env: dict[str, str]) -> None:
    result = await billing("balance", "not a valid id!", env=store_env)

    assert result.code == 1
    assert "INVALID_ORG_ID" in result.err


@pytest.mark.parametrize("args", [["balance", "acme"], ["dev", "--data-dir", "{tmp}"], ["serve"]])
async def test_invalid_config_exits_2_naming_the_key(
    args: list[str], bad_config: Path, store_env: dict[str, str], tmp_path: Path,
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path / "dev")) for a in args]
    result = await billing(*argv, env={**store_env, "BILLING_CONFIG": str(bad_config),
                                       "BILLING_API_TOKEN": "t"})

    assert result.code == 2
    assert "meter.dollars_to_units" in result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "dev").exists()  # nothing started


async def test_serve_refuses_to_start_without_an_api_token(store_env: dict[str, str]) -> None:
    result = await billing("serve", env=store_env)

    assert result.code == 2
    assert "BILLING_API_TOKEN" in result.err


async def test_help_lists_the_commands_without_importing_the_engine() -> None:
    result = await billing("--help")
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import sys, starter.cli; "
        "print([m for m in ('pymongo', 'temporalio', 'fastapi', 'uvicorn') if m in sys.modules])",
        stdout=asyncio.subprocess.PIPE,
    )
    loaded, _ = await probe.communicate()

    assert result.code == 0
    for command in ("dev", "serve", "worker", "balance", "ledger"):
        assert f" {command} " in result.out
    assert loaded.decode().strip() == "[]"


async def test_meter_json_shows_this_weeks_usage(
    org: str, accounts: Accounts, runtime, store_env: dict[str, str],
) -> None:
    from billing.clock import utcnow
    from billing.metering import UsageRequest
    from billing.store.meters import Meters

    await accounts.register(org, utcnow())
    await Meters(runtime.db, runtime.config).record(
        UsageRequest(org_id=org, run_id="cli-run", units=42), utcnow())

    result = await billing("meter", org, "--json", env=store_env)

    assert result.code == 0, result.err
    body = json.loads(result.out)
    assert body["org_id"] == org and body["used"] == 42 and body["plan_id"] == "free"
    assert body["quota"] == 0 and body["remaining"] == 0
    human = await billing("meter", org, env=store_env)
    assert human.code == 0 and "42" in human.out


async def test_holds_lists_the_active_holds_with_whole_ids(
    org: str, accounts: Accounts, runtime, store_env: dict[str, str],
) -> None:
    from billing.clock import utcnow
    from billing.holds import HoldRequest

    await accounts.register(org, utcnow())
    empty = await billing("holds", org, env=store_env)
    assert empty.code == 0 and "no active holds" in empty.out
    long_id = "run-" + "x" * 100
    for hold_id, units in ((long_id, 75), ("short", 20)):
        await runtime.meters.hold(org, HoldRequest(hold_id=hold_id, units=units), utcnow())

    listed = await billing("holds", org, "--json", env=store_env)
    assert listed.code == 0, listed.err
    body = json.loads(listed.out)
    assert [(h["hold_id"], h["units"]) for h in body["holds"]] == [(long_id, 75), ("short", 20)]
    assert set(body["holds"][0]) == {"hold_id", "units", "expires_at"}
    human = await billing("holds", org, env={**store_env, "COLUMNS": "40"})
    assert human.code == 0, human.err
    assert any(long_id in line for line in human.out.splitlines()), human.out
    meter = json.loads((await billing("meter", org, "--json", env=store_env)).out)
    assert meter["held"] == 95
    unknown = await billing("holds", "nobody-registered-this", env=store_env)
    assert unknown.code == 1 and "ORG_NOT_FOUND" in unknown.err
