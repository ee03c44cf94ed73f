"""The chaos soak, short (`bench/soak.py`): every part of the engine in its own process, a
minute or so of faults of every kind (SIGKILL and restart of an API, a worker, both workers, the
database and Temporal; SIGSTOP of an API and a worker; Stripe answering 500 and 429), then every
organization checked against the soak's model.

The soak starts its own servers (it kills them): `MONGODB_URI` and `TEMPORAL_ADDRESS` do not
apply. A longer run of several seeds is recorded in RELIABILITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
SEED = 7


def test_short_soak_finds_no_violation(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--seed", str(SEED), "--seconds", "45", "--orgs", "8",
         "--lanes", "5", "--data-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=900)
    assert done.stdout.strip(), done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["violations"] == [], done.stdout[-5000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(figures["faults_by_kind"]) == set(figures["fault_kinds"])
    assert figures["usage records"] > 100 and figures["stripe events"] > 30
    assert figures["scenario plays"] >= 5 and figures["admin credits"] > 0
