"""Reliability tests: a recorder of measured figures shared by every test in this folder.

Each test records what happened and how long recovery took with ``record(name, **figures)``; the
figures are printed and written to ``reliability-timings.json`` (path in
``SNAPGEN_RELIABILITY_REPORT``, else the session's pytest tmp dir), from which docs/reliability.md
is filled in.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def reliability_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = Path(os.environ.get("SNAPGEN_RELIABILITY_REPORT") or tmp_path_factory.getbasetemp() / "reliability-timings.json")
    yield path
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(previous | _FIGURES, indent=2, sort_keys=True, default=str))
    print(f"\nreliability figures written to {path}")


@pytest.fixture
def record(reliability_report: Path, request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(**figures)``: store measured figures under this test's name (printed too)."""
    name = request.node.name
    started = time.monotonic()

    def _record(**figures: Any) -> None:
        entry = _FIGURES.setdefault(name, {})
        entry.update({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()})
        entry["test_wall_s"] = round(time.monotonic() - started, 2)
        print(f"\n[reliability] {name}: {json.dumps(entry, default=str)}")

    return _record
