"""The worker caches the bytecode of the modules its sandbox imports for every workflow run."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from worker import cache_bytecode


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A package imported under PYTHONDONTWRITEBYTECODE: no `.pyc` is written for it."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    root = tmp_path / "sandboxed_pkg"
    (root / "inner").mkdir(parents=True)
    (root / "__init__.py").write_text("VALUE = 1\n")
    (root / "inner" / "__init__.py").write_text("")
    (root / "inner" / "rules.py").write_text("def rule() -> int:\n    return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("sandboxed_pkg")
    yield module
    for name in [n for n in sys.modules if n.startswith("sandboxed_pkg")]:
        del sys.modules[name]


def cached(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def test_bytecode_of_every_module_is_written_despite_dont_write_bytecode(
        package: ModuleType) -> None:
    root = Path(package.__path__[0])
    sources = [root / "__init__.py", root / "inner" / "rules.py"]
    assert not any(cached(source).exists() for source in sources)

    cache_bytecode(package)

    assert all(cached(source).exists() for source in sources)


def test_a_module_given_alone_is_cached(package: ModuleType) -> None:
    rules = importlib.import_module("sandboxed_pkg.inner.rules")
    source = Path(str(rules.__file__))

    cache_bytecode(rules)

    assert cached(source).exists()
    assert not cached(source.parent.parent / "__init__.py").exists()


def test_an_unwritable_install_is_logged_and_tolerated(
        package: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    root = Path(package.__path__[0])
    (root / "__pycache__").write_text("a file where the cache directory would go")

    with caplog.at_level(logging.WARNING, logger="worker"):
        cache_bytecode(package)

    assert any("cannot cache bytecode" in r.getMessage() for r in caplog.records)
