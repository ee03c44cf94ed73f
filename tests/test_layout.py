"""The layout rules of SPEC §3: workflows import no I/O library; the domain core no Temporal."""

from __future__ import annotations

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
