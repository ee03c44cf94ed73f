"""Stripe flows as data: every `tests/scenarios/*.yaml` played through the signed webhook.

Each file is played in order (checking every step's `expect`) and twice shuffled with every
event delivered twice (checking `final`), all three at once with their own ids. The format is
described in `tests/scenarios/README.md`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from scenario_play import FILES, HERE, Play, load
from stripe_fake import StripeFake
from temporalio.client import Client
from temporalio.worker import Worker

from billing.config import load_config
from billing.runtime import Runtime
from billing.store.database import Database
from starter.api.app import create_app
from worker import build_worker

# ---- fixtures: the engine on the scenarios' configuration ----------------------------------------


@pytest.fixture(scope="session")
async def scenario_runtime(stripe_runtime: Runtime) -> AsyncIterator[Runtime]:
    settings = stripe_runtime.settings.model_copy(
        update={"temporal_task_queue": f"billing-scenarios-{uuid.uuid4().hex[:8]}"})
    db = Database(settings.mongodb_uri, settings.mongodb_db)
    yield Runtime(settings=settings, config=load_config(HERE / "billing.toml"), db=db)
    await db.close()


@pytest.fixture(scope="session")
async def scenario_worker(temporal_client: Client,
                          scenario_runtime: Runtime) -> AsyncIterator[Worker]:
    async with build_worker(temporal_client, scenario_runtime) as running:
        yield running


@pytest.fixture(scope="session")
async def scenario_api(scenario_runtime: Runtime,
                       temporal_client: Client) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(scenario_runtime, temporal_client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                 headers={"Authorization": "Bearer test-token"}) as client:
        yield client


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_scenario(path: Path, scenario_api: httpx.AsyncClient, scenario_worker: Worker,
                        temporal_client: Client, stripe_fake: StripeFake,
                        scenario_runtime: Runtime) -> None:
    scenario = load(path)
    assert scenario.get("steps"), f"{path.name} has no steps"

    def play(label: str) -> Play:
        return Play(scenario, scenario_api, temporal_client, stripe_fake, scenario_runtime, label)

    seed = sum(path.stem.encode())
    await asyncio.gather(play("in order").in_order(),
                         play("shuffled, duplicated").shuffled(seed),
                         play("shuffled again").shuffled(seed + 1))


def test_there_are_enough_scenarios() -> None:
    assert len(FILES) >= 25
