"""`billing dev` as a user runs it: a real process tree on free ports and a temporary data dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from billing.config import BillingConfig
from starter.embedded import find_binary, free_port

BILLING = find_binary("billing")
READY_TIMEOUT_S = 60.0


class DevStack:
    """One `billing dev` process in its own process group, as a terminal would run it."""

    def __init__(self, data_dir: Path, ports: dict[str, int]) -> None:
        self.data_dir = data_dir
        self.ports = ports
        self.log = data_dir.parent / f"billing-dev-{uuid.uuid4().hex[:6]}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
        env["COLUMNS"] = "300"
        args = [BILLING, "dev", "--data-dir", str(data_dir)]
        for name, port in ports.items():
            args += [f"--{name}-port", str(port)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until `/readyz` answers 200 and the stack has printed where everything is."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"billing dev exited with {self.process.returncode}:\n{self.output()}")
            try:
                ready = httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready and "Press Ctrl-C to stop" in self.output():
                return
            time.sleep(0.3)
        pytest.fail(f"billing dev not ready within {READY_TIMEOUT_S:.0f} s:\n{self.output()}")

    def stop(self, sig: signal.Signals, *, whole_group: bool = False) -> int:
        if whole_group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        return self.process.wait(timeout=45)


def processes_using(path: Path) -> dict[int, str]:
    """Live processes whose command line names `path` (the data dir's servers): pid -> args."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in args:
            found[int(cmdline.parent.name)] = args
    return found


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_all_stopped(stack: DevStack) -> None:
    assert processes_using(stack.data_dir) == {}
    assert [port for port in stack.ports.values() if listening(port)] == []


@pytest.fixture
def ports() -> dict[str, int]:
    chosen: dict[str, int] = {}
    while len(set(chosen.values())) < 4:
        chosen = {name: free_port() for name in ("http", "temporal", "ui", "mongo")}
    return chosen


@pytest.fixture
def stacks() -> Iterator[list[DevStack]]:
    """Whatever a failing test leaves running is stopped, then killed (SecantusDB runs in a
    session of its own, so it is found by its data dir, not by the process group)."""
    started: list[DevStack] = []
    yield started
    for stack in started:
        if stack.process.poll() is None:
            stack.process.terminate()
            try:
                stack.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(stack.process.pid, signal.SIGKILL)
                stack.process.wait()
        for pid in processes_using(stack.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_dev_stack_starts_serves_stops_and_keeps_its_data(
    tmp_path: Path, ports: dict[str, int], stacks: list[DevStack], config: BillingConfig,
) -> None:
    data_dir = tmp_path / "dev"
    org = f"org-{uuid.uuid4().hex[:8]}"
    stack = DevStack(data_dir, ports)
    stacks.append(stack)
    stack.wait_ready()

    credentials = json.loads((data_dir / "dev-credentials.json").read_text())
    token = credentials["api_token"]
    headers = {"Authorization": f"Bearer {token}"}
    output = stack.output()
    assert token in output
    assert credentials["webhook_secret"] in output
    assert f"http://127.0.0.1:{ports['ui']}" in output
    assert "BILLING_WEBHOOK_URL=http://127.0.0.1:9000/hooks BILLING_WEBHOOK_SECRET=whsec_" in output
    assert httpx.get(f"http://127.0.0.1:{ports['ui']}/", timeout=5).status_code < 400
    assert httpx.get(f"{stack.api}/v1/orgs/{org}/balance", timeout=5).status_code == 401
    registered = httpx.put(f"{stack.api}/v1/orgs/{org}", headers=headers, timeout=10)
    assert registered.status_code == 201, registered.text
    balance = httpx.get(f"{stack.api}/v1/orgs/{org}/balance", headers=headers, timeout=5)
    assert balance.json()["balance"] == config.default_plan.signup_grant
    metrics = httpx.get(f"{stack.api}/metrics", timeout=10).text
    assert 'billing_ledger_entries_total{kind="grant"} 1.0' in metrics
    assert "billing_failed_workflows 0.0" in metrics
    assert "temporal_" in metrics  # the SDK's own metrics, re-exported

    # The README's first event: without STRIPE_API_KEY the stack reads Stripe at its stand-in.
    assert "starting the Stripe stand-in" in output
    sent = cli(stack, "send-test-event", "payment_intent.succeeded", "--org", org, "--pack",
               "pack_500k", "--url", f"{stack.api}/stripe/webhook")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    expected = config.default_plan.signup_grant + 500000
    wait_for_balance(stack, org, headers, expected)

    # The README's purchase: the engine makes the Checkout, the stand-in is paid and sends the
    # purchase's events, the organization is credited.
    made = cli(stack, "checkout", org, "--pack", "pack_500k", "--quantity", "2", "--json",
               "--url", stack.api)
    assert made.returncode == 0, made.stdout + made.stderr
    started = json.loads(made.stdout)
    assert started["units"] == 1_000_000
    paid = cli(stack, "send-test-event", "checkout.session.completed", "--checkout",
               started["checkout_id"])
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert "checkout.session.completed" in paid.stdout and "HTTP 200" in paid.stdout
    expected += 1_000_000
    wait_for_balance(stack, org, headers, expected)
    portal = httpx.post(f"{stack.api}/v1/orgs/{org}/billing-portal", headers=headers, timeout=10)
    assert portal.status_code == 200, portal.text

    # Ctrl-C in a terminal signals the whole foreground process group.
    assert stack.stop(signal.SIGINT, whole_group=True) == 0
    assert_all_stopped(stack)

    again = DevStack(data_dir, ports)
    stacks.append(again)
    again.wait_ready()
    assert json.loads((data_dir / "dev-credentials.json").read_text())["api_token"] == token
    kept = httpx.get(f"{again.api}/v1/orgs/{org}/balance", headers=headers, timeout=5)
    assert kept.status_code == 200, kept.text
    assert kept.json()["balance"] == expected
    # The stand-in kept the organization's customer: the engine still sells to it.
    sold = cli(again, "checkout", org, "--plan", "pro", "--url", again.api)
    assert sold.returncode == 0, sold.stdout + sold.stderr
    reregistered = httpx.put(f"{again.api}/v1/orgs/{org}", headers=headers, timeout=10)
    assert reregistered.status_code == 200

    # A service manager signals the main process only.
    assert again.stop(signal.SIGTERM) == 0
    assert_all_stopped(again)


def cli(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    """A `billing` command in another terminal: the dev stack's MongoDB, and its generated
    secrets read from the data directory."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MONGODB_", "TEMPORAL_", "STRIPE_", "BILLING_"))}
    env["MONGODB_URI"] = f"mongodb://127.0.0.1:{stack.ports['mongo']}/?directConnection=true"
    return subprocess.run([BILLING, *args, "--data-dir", str(stack.data_dir)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def wait_for_balance(stack: DevStack, org: str, headers: dict[str, str], expected: int) -> None:
    for _ in range(100):
        found = httpx.get(f"{stack.api}/v1/orgs/{org}/balance", headers=headers, timeout=5)
        if found.json()["balance"] == expected:
            return
        time.sleep(0.2)
    assert found.json()["balance"] == expected


def test_dev_stack_names_a_taken_port(tmp_path: Path, ports: dict[str, int]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["temporal"]))
        taken.listen()
        stack = DevStack(tmp_path / "dev", ports)
        code = stack.process.wait(timeout=30)

    output = stack.output()
    assert code == 1
    assert f"port {ports['temporal']}" in output
    assert "--temporal-port" in output
    assert "Traceback" not in output
    assert processes_using(tmp_path / "dev") == {}
