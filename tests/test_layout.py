"""The layout rules of SPEC §3: workflows import no I/O library; the domain core no Temporal."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_LIBRARIES = ("pymongo", "motor", "stripe", "httpx", "aiohttp", "fastapi", "uvicorn")


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize("module", sorted(
    f"workflows.{path.stem}" for path in (ROOT / "workflows").glob("*.py")
    if path.stem != "__init__"
))
def test_workflow_modules_import_no_io_library(module: str) -> None:
    assert not _loaded_after_import(module) & set(IO_LIBRARIES)


@pytest.mark.parametrize("module", sorted(
    "billing." + ".".join(path.relative_to(ROOT / "billing").with_suffix("").parts)
    for path in (ROOT / "billing").rglob("*.py") if path.stem != "__init__"
))
def test_the_domain_core_imports_no_temporal(module: str) -> None:
    assert "temporalio" not in _loaded_after_import(module)


def test_import_contracts_hold() -> None:
    """The layers and the no-cycle rule of `[tool.importlinter]` in pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_worker_composition_imports_no_starter_module() -> None:
    """`billing worker` and `billing dev` import `worker.py`; the reverse would be a cycle."""
    tree = ast.parse((ROOT / "worker.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] == "starter"}
