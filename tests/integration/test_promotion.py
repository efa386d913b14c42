"""Gated promotion against a real MLflow server: pass, fail a threshold, worse than the champion, failed
export parity, a tampered artifact, rollback, and concurrent promotions that cannot both win."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

GATES = [{"metric": "geneval/overall", "higher_is_better": True, "threshold": 0.3},
         {"metric": "fid", "higher_is_better": False, "threshold": 300.0}]


@pytest.fixture
def registry_env(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    return tmp_path


_COUNTER = iter(range(10_000))


def _candidate(root: Path, name: str, geneval: float, fid: float = 100.0, parity: bool | None = True) -> dict:
    from tasks import registry
    from tasks.settings import get_settings
    from tasks.tracking import start_run

    folder = root / f"model-{next(_COUNTER)}"
    folder.mkdir(parents=True)
    (folder / "unet_ema.safetensors").write_bytes(b"weights-" + str(geneval).encode())
    (folder / "student.json").write_text(json.dumps({"geneval": geneval}))
    files = {p.name: f"file://{p}" for p in folder.iterdir()}
    with start_run(get_settings(), "candidate") as run:
        run.log_dict({"geneval": geneval}, "model/eval.json")
    return registry.register_candidate(name, f"runs:/{run.run_id}/model", run_id=run.run_id,
                                       folder_uri=f"file://{folder}", files=files,
                                       metrics={"geneval/overall": geneval, "fid": fid}, export_uri=None,
                                       parity_passed=parity, lineage={"snapgen.config_hash": "test"}) | {"folder": folder}


def _promote(name: str, version: str, tolerance: float = 0.0):
    from tasks import registry

    return registry.promote(f"models:/{name}/{version}", GATES, tolerance)


def test_gates_pass_then_block_regressions_and_bad_artifacts(registry_env):
    from tasks import registry

    name = "gate-test"
    first = _candidate(registry_env, name, 0.5)
    assert registry.aliases(name) == {"candidate": first["version"]}
    d1 = _promote(name, first["version"])
    assert d1["passed"] and d1["promoted"] and registry.champion_version(name) == first["version"]

    low = _candidate(registry_env, name, 0.2)  # under the 0.3 threshold and worse than the champion
    d2 = _promote(name, low["version"])
    assert not d2["promoted"] and registry.champion_version(name) == first["version"]
    assert any("geneval/overall >= 0.3" in r for r in d2["reasons"])
    assert any("not worse than champion" in r for r in d2["reasons"])

    slightly_worse = _candidate(registry_env, name, 0.48)
    assert not _promote(name, slightly_worse["version"], tolerance=0.0)["promoted"]
    assert _promote(name, slightly_worse["version"], tolerance=0.05)["promoted"]  # within tolerance
    assert registry.champion_version(name) == slightly_worse["version"]

    no_parity = _candidate(registry_env, name, 0.9, parity=False)
    d3 = _promote(name, no_parity["version"])
    assert not d3["promoted"] and any("export parity" in r for r in d3["reasons"])

    tampered = _candidate(registry_env, name, 0.9)
    (tampered["folder"] / "unet_ema.safetensors").write_bytes(b"something else")
    d4 = _promote(name, tampered["version"])
    assert not d4["promoted"] and any("was modified" in r for r in d4["reasons"])
    assert registry.champion_version(name) == slightly_worse["version"]

    recorded = json.loads(registry.version_tags(f"models:/{name}/{tampered['version']}")["snapgen.promotion.decision"])
    assert recorded["passed"] is False and any("unet_ema" in r for r in recorded["reasons"])


def test_rollback_restores_the_previous_champion(registry_env):
    from tasks import registry

    name = "rollback-test"
    a, b = _candidate(registry_env, name, 0.5), _candidate(registry_env, name, 0.6)
    assert _promote(name, a["version"])["promoted"] and _promote(name, b["version"])["promoted"]
    out = registry.rollback(name)
    assert out == out | {"champion": a["version"], "rolled_back": b["version"]}
    assert registry.champion_version(name) == a["version"]
    with pytest.raises(registry.PromotionError, match="no previous champion"):
        registry.rollback(name)


def test_concurrent_promotions_are_serialised(registry_env):
    """Two promotions started together against champion 0.5: A (0.7) and B (0.6). Applied one after the
    other, B can never end as champion (it is worse than A); without the lock both would read the old
    champion, both pass, and the last writer (possibly B) would win."""
    from tasks import registry

    name = "race-test"
    base = _candidate(registry_env, name, 0.5)
    assert _promote(name, base["version"])["promoted"]
    for _ in range(3):
        a, b = _candidate(registry_env, name, 0.7), _candidate(registry_env, name, 0.6)
        barrier, results, errors = threading.Barrier(2), {}, []

        def go(label, version):
            try:
                barrier.wait()
                results[label] = _promote(name, version)
            except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=("a", a["version"])),
                   threading.Thread(target=go, args=("b", b["version"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert registry.champion_version(name) == a["version"]
        # each decision was taken against the champion the other left, never against stale state
        if results["b"]["champion_before"] == a["version"]:
            assert not results["b"]["promoted"]
        else:
            assert results["a"]["champion_before"] == b["version"] and results["a"]["promoted"]
        # reset the champion to the base for the next round
        assert registry.promote(f"models:/{name}/{base['version']}", [], 1.0, require_parity=False)["promoted"]
