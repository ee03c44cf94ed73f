"""docker-compose.yml wires every service the engine needs to the right addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from billing.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _replset(services: dict[str, Any]) -> str:
    command: list[str] = services["mongo"]["command"]
    return command[command.index("--replSet") + 1]


def test_every_service_the_engine_needs_is_present() -> None:
    services = _compose()["services"]
    assert {"mongo", "postgresql", "temporal", "temporal-setup", "temporal-ui", "worker",
            "api"} <= set(services)


def test_mongo_is_a_replica_set_initiated_by_its_healthcheck() -> None:
    mongo = _compose()["services"]["mongo"]
    assert mongo["image"].startswith("mongo:") and int(mongo["image"].split(":")[1][0]) >= 7
    replset = _replset(_compose()["services"])
    check = " ".join(mongo["healthcheck"]["test"])
    assert "rs.initiate" in check and f"_id: '{replset}'" in check and "mongo:27017" in check


def test_engine_processes_point_at_mongo_and_temporal() -> None:
    services = _compose()["services"]
    mongo_replset = _replset(services)
    for name in ("worker", "api"):
        service = services[name]
        env = service["environment"]
        assert env["MONGODB_URI"] == f"mongodb://mongo:27017/?replicaSet={mongo_replset}"
        assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
        assert service["env_file"] == ".env"
        assert service["depends_on"]["mongo"]["condition"] == "service_healthy"
        assert service["depends_on"]["temporal-setup"]["condition"] == (
            "service_completed_successfully")
    assert services["worker"]["command"] == ["billing", "worker"]
    assert services["api"]["command"][:2] == ["billing", "serve"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])


def test_temporal_runs_on_postgresql_with_the_search_attributes_registered() -> None:
    services = _compose()["services"]
    assert services["temporal"]["environment"]["DB"].startswith("postgres")
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "postgresql"
    setup = " ".join(services["temporal-setup"]["command"])
    assert "OrgId StripeEventType" in setup and "--type Keyword" in setup
    assert services["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_env_example_covers_the_settings_the_compose_file_does_not_set() -> None:
    keys = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#") and "=" in line
    }
    compose_env = set(_compose()["services"]["api"]["environment"])
    settings = {name.upper() for name in Settings.model_fields}
    optional = {"STRIPE_API_BASE"}
    assert settings - compose_env - optional <= keys
