"""The model registry (MLflow): registration with lineage and checksums, gated promotion, rollback.

Beside tasks/tracking.py (runs), this is the only other module that talks to MLflow: it owns the
registered-model side (versions, aliases, their tags). Conventions on a version:

    snapgen.checkpoint_uri         storage URI of the model folder (large files stay in object storage)
    snapgen.sha256.<file>          sha256 of each registered file, checked again before promotion
    snapgen.metric.<name>          evaluation metrics the gates compare (geneval/overall, dpg/overall, fid ...)
    snapgen.export_parity          "passed" / "failed" / "absent"
    snapgen.export_uri             where the export lives
    snapgen.promotion.decision     JSON of the last promotion decision (passed, reasons, champion compared)
and on the registered model `snapgen.champion_history`: the champion versions, oldest first (rollback).

Promotion is atomic: decide-and-move happens under an exclusive lock (a file lock under `<home>/locks`
for every process on this machine; the promotion deployment in prefect.yaml also has a concurrency
limit of 1 for workers on several machines), and the champion is re-read inside the lock, so two
concurrent promotions are applied one after the other, each judged against the champion the other
left. No decision is taken on stale state.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.settings import get_settings
from tasks.storage import storage
from tasks.secrets import mask_uri
from tasks.tracking import (
    RetryPolicy,
    TrackingSettings,
    call_with_retry,
    configure_mlflow,
    prepare_params,
)

CANDIDATE, CHAMPION = "candidate", "champion"
SHA_PREFIX = "snapgen.sha256."
METRIC_PREFIX = "snapgen.metric."
PARITY_TAG = "snapgen.export_parity"
EXPORT_TAG = "snapgen.export_uri"
DECISION_TAG = "snapgen.promotion.decision"
HISTORY_TAG = "snapgen.champion_history"


# ----------------------------------------------------------------- registered versions and refs
_MODEL_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")
CHECKPOINT_TAG = "snapgen.checkpoint_uri"  # versions whose large files stay in object storage point there


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` or `models:/name/N` -> (name, alias, version); a clear error otherwise."""
    match = _MODEL_REF.match(ref.strip())
    if not match:
        raise ValueError(f"model ref {ref!r} is malformed: expected models:/NAME@ALIAS or models:/NAME/VERSION "
                         "(e.g. models:/snapgen@champion, models:/snapgen/3)")
    return match["name"], match["alias"], match["version"]


def resolve_model_version(settings: TrackingSettings, ref: str) -> dict[str, str]:
    """Registry ref -> {"name", "version", "run_id", "source"}: `source` is the storage URI in the
    version's `snapgen.checkpoint_uri` tag when set, else the version's artifacts downloaded under
    `<home>/cache/registry/<name>/<version>` (a local folder or file)."""
    name, alias, number = parse_model_ref(ref)
    uri = configure_mlflow(settings)
    client = MlflowClient(tracking_uri=uri)
    try:
        mv = call_with_retry(lambda: client.get_model_version_by_alias(name, alias) if alias
                             else client.get_model_version(name, number), RetryPolicy(), "get_model_version")
    except MlflowException as exc:
        raise LookupError(f"model ref {ref!r}: not found in the registry at {mask_uri(uri)} ({exc.error_code})") from exc
    out = {"name": name, "version": str(mv.version), "run_id": mv.run_id or ""}
    if (mv.tags or {}).get(CHECKPOINT_TAG):
        return out | {"source": mv.tags[CHECKPOINT_TAG]}
    target = Path(settings.home) / "cache" / "registry" / name / str(mv.version)
    if not target.exists():
        target.mkdir(parents=True)
        source = client.get_model_version_download_uri(name, mv.version)
        local = call_with_retry(lambda: mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target)),
                                RetryPolicy(), "download model version")
        (target / ".source").write_text(str(local))
    return out | {"source": (target / ".source").read_text()}


def register_model_version(
    settings: TrackingSettings,
    name: str,
    source: str,
    *,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Create registered model ``name`` if it does not exist, add a version from ``source``
    (e.g. ``runs:/<run_id>/bundle``) with masked, stringified ``tags``; return its version number."""
    uri = configure_mlflow(settings)
    client = MlflowClient(tracking_uri=uri)
    policy = retry or RetryPolicy()

    def ensure_model() -> None:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    call_with_retry(ensure_model, policy, "create_registered_model")
    version = call_with_retry(
        lambda: client.create_model_version(
            name, source, run_id=run_id, tags=prepare_params(tags or {}), description=description
        ),
        policy,
        "create_model_version",
    )
    return str(version.version)


def find_model_versions(settings: TrackingSettings, name: str, tag: str, value: str) -> list[dict[str, str]]:
    """Versions of registered model ``name`` whose tag ``tag`` equals ``value``, newest first:
    ``[{"version", "run_id", "source"}]`` (empty when the model does not exist)."""
    uri = configure_mlflow(settings)
    client = MlflowClient(tracking_uri=uri)
    found = call_with_retry(
        lambda: client.search_model_versions(f"name = '{name}'"), RetryPolicy(), "search_model_versions"
    )
    hits = [v for v in found if (v.tags or {}).get(tag) == value]
    hits.sort(key=lambda v: int(v.version), reverse=True)
    return [{"version": str(v.version), "run_id": v.run_id or "", "source": v.source} for v in hits]



class PromotionError(RuntimeError):
    """A promotion or rollback that cannot be carried out (named model/version, reason)."""


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=configure_mlflow(get_settings()))


def _call(fn, what: str):
    return call_with_retry(fn, RetryPolicy(), what)


@contextlib.contextmanager
def registry_lock(name: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Exclusive lock of registered model `name` for every process sharing `<home>`."""
    folder = Path(get_settings().home) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(folder / f"registry-{name}.lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionError(f"registered model {name!r}: another promotion held the lock for more than "
                                         f"{timeout_s:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- registration

def file_checksums(files: Mapping[str, str]) -> dict[str, str]:
    """label -> sha256 of each storage URI (file:// or s3://), read through Storage."""
    store = storage()
    return {label: store.sha256(uri) for label, uri in files.items()}


def _tag_key(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-/" else "_" for c in label)


def register_candidate(name: str, source: str, *, run_id: str | None, folder_uri: str, files: Mapping[str, str],
                       metrics: Mapping[str, float], export_uri: str | None, parity_passed: bool | None,
                       lineage: Mapping[str, str], description: str | None = None) -> dict[str, Any]:
    """Register a version (source in the run's artifacts; weights referenced by `folder_uri`), tag it
    with checksums, metrics, export parity and lineage, and point the `candidate` alias at it."""
    sums = file_checksums(files)
    tags: dict[str, Any] = dict(lineage) | {CHECKPOINT_TAG: folder_uri,
                                            PARITY_TAG: {True: "passed", False: "failed", None: "absent"}[parity_passed]}
    tags |= {SHA_PREFIX + _tag_key(label): digest for label, digest in sums.items()}
    tags |= {"snapgen.file." + _tag_key(label): uri for label, uri in files.items()}
    tags |= {METRIC_PREFIX + key: repr(float(value)) for key, value in metrics.items()
             if value is not None and math.isfinite(float(value))}
    if export_uri:
        tags[EXPORT_TAG] = export_uri
    version = register_model_version(get_settings(), name, source, run_id=run_id, tags=tags, description=description)
    client = _client()
    _call(lambda: client.set_registered_model_alias(name, CANDIDATE, version), "set alias candidate")
    return {"name": name, "version": version, "checksums": sums, "alias": CANDIDATE}


# ----------------------------------------------------------------------------- gates (pure)

def version_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    return {k[len(METRIC_PREFIX):]: float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)}


def evaluate_gates(candidate: Mapping[str, float], champion: Mapping[str, float] | None, gates: Sequence[Mapping[str, Any]],
                   tolerance: float, *, parity: str, require_parity: bool, checksum_problems: Sequence[str],
                   demo_thresholds: bool = False) -> dict[str, Any]:
    """{passed, reasons, checks}: every gate's threshold, no regression beyond `tolerance` against the
    champion (when there is one), export parity, artifact checksums. `reasons` lists every failure."""
    checks: list[dict[str, Any]] = []
    for gate in gates:
        metric, higher = gate["metric"], bool(gate.get("higher_is_better", True))
        value = candidate.get(metric)
        if value is None:
            checks.append({"check": f"{metric} present", "passed": False, "detail": "metric missing from the evaluation"})
            continue
        threshold = gate.get("threshold")
        if threshold is not None:
            ok = value >= threshold if higher else value <= threshold
            checks.append({"check": f"{metric} {'>=' if higher else '<='} {threshold:g}"
                                    + (" (demo threshold)" if demo_thresholds else ""),
                           "passed": ok, "detail": f"{value:.4g}"})
        if champion is not None and champion.get(metric) is not None:
            ref = champion[metric]
            ok = value >= ref - tolerance if higher else value <= ref + tolerance
            checks.append({"check": f"{metric} not worse than champion beyond {tolerance:g}", "passed": ok,
                           "detail": f"{value:.4g} vs champion {ref:.4g}"})
    if require_parity:
        checks.append({"check": "export parity passed", "passed": parity == "passed", "detail": parity})
    checks.append({"check": "artifact checksums verified", "passed": not checksum_problems,
                   "detail": "; ".join(checksum_problems) or "all match"})
    reasons = [f"{c['check']}: {c['detail']}" for c in checks if not c["passed"]]
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


# ----------------------------------------------------------------------------- promotion

def verify_checksums(tags: Mapping[str, str]) -> list[str]:
    """Problems with the registered files: missing, unreadable or changed since registration."""
    store = storage()
    problems = []
    for key, expected in tags.items():
        if not key.startswith(SHA_PREFIX):
            continue
        label = key[len(SHA_PREFIX):]
        uri = tags.get("snapgen.file." + label)
        if not uri:
            problems.append(f"{label}: no file URI recorded")
            continue
        try:
            actual = store.sha256(uri)
        except FileNotFoundError:
            problems.append(f"{label}: {uri} is missing")
            continue
        except OSError as exc:
            problems.append(f"{label}: {uri} unreadable ({type(exc).__name__})")
            continue
        if actual != expected:
            problems.append(f"{label}: sha256 {actual[:12]} != registered {expected[:12]} ({uri} was modified)")
    if not any(k.startswith(SHA_PREFIX) for k in tags):
        problems.append("no checksums were registered with this version")
    return problems


def _resolve(client: MlflowClient, ref: str):
    name, alias, number = parse_model_ref(ref)
    try:
        mv = _call(lambda: client.get_model_version_by_alias(name, alias) if alias
                   else client.get_model_version(name, number), "get model version")
    except MlflowException as exc:
        raise PromotionError(f"model ref {ref!r}: not found in the registry ({exc.error_code})") from exc
    return name, mv


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str) -> list[str]:
    model = _call(lambda: client.get_registered_model(name), "get registered model")
    raw = (model.tags or {}).get(HISTORY_TAG, "")
    return [v for v in raw.split(",") if v]


def check_promotion(ref: str, gates: Sequence[Mapping[str, Any]], tolerance: float, require_parity: bool = True,
                    demo_thresholds: bool = False) -> dict[str, Any]:
    """The decision for `ref` against the current champion, without moving anything."""
    client = _client()
    name, mv = _resolve(client, ref)
    champion = _champion(client, name)
    tags = dict(mv.tags or {})
    comparable = champion is not None and str(champion.version) != str(mv.version)
    decision = evaluate_gates(version_metrics(tags), version_metrics(dict(champion.tags or {})) if comparable else None,
                              gates, tolerance, parity=tags.get(PARITY_TAG, "absent"), require_parity=require_parity,
                              checksum_problems=verify_checksums(tags), demo_thresholds=demo_thresholds)
    return decision | {"name": name, "version": str(mv.version),
                       "champion_before": str(champion.version) if champion is not None else None}


def promote(ref: str, gates: Sequence[Mapping[str, Any]], tolerance: float, require_parity: bool = True,
            demo_thresholds: bool = False, lock_timeout_s: float = 300.0) -> dict[str, Any]:
    """Move `champion` to `ref` if every gate passes; record the decision on the version either way."""
    name, _, _ = parse_model_ref(ref)
    client = _client()
    with registry_lock(name, lock_timeout_s):
        decision = check_promotion(ref, gates, tolerance, require_parity, demo_thresholds)
        version = decision["version"]
        if decision["champion_before"] == version:
            decision |= {"promoted": False, "passed": True, "reasons": [], "note": f"version {version} is already champion"}
        elif decision["passed"]:
            _call(lambda: client.set_registered_model_alias(name, CHAMPION, version), "set alias champion")
            history = _history(client, name)
            _call(lambda: client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history + [version])),
                  "record champion history")
            decision["promoted"] = True
        else:
            decision["promoted"] = False
        decision["decided_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = json.dumps({k: decision[k] for k in ("passed", "promoted", "reasons", "champion_before", "decided_at")})
        _call(lambda: client.set_model_version_tag(name, version, DECISION_TAG, record[:5000]), "record decision")
        _call(lambda: client.set_model_version_tag(name, version, "snapgen.promotion.passed",
                                                   str(decision["passed"]).lower()), "record decision")
    return decision


def rollback(name: str, lock_timeout_s: float = 300.0) -> dict[str, Any]:
    """Point `champion` back at the previous champion; the rolled-back version is tagged as such."""
    client = _client()
    with registry_lock(name, lock_timeout_s):
        history = _history(client, name)
        current = _champion(client, name)
        if current is None:
            raise PromotionError(f"registered model {name!r} has no champion to roll back")
        while history and history[-1] != str(current.version):  # history out of step (alias set by hand)
            history.pop()
        if len(history) < 2:
            raise PromotionError(f"registered model {name!r}: champion v{current.version} has no previous champion "
                                 "to roll back to")
        previous = history[-2]
        _call(lambda: client.set_registered_model_alias(name, CHAMPION, previous), "set alias champion")
        _call(lambda: client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1])), "record history")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _call(lambda: client.set_model_version_tag(name, str(current.version), "snapgen.rolled_back_at", stamp),
              "record rollback")
    return {"name": name, "champion": previous, "rolled_back": str(current.version), "at": stamp}


def champion_version(name: str) -> str | None:
    mv = _champion(_client(), name)
    return str(mv.version) if mv is not None else None


def version_tags(ref: str) -> dict[str, str]:
    _, mv = _resolve(_client(), ref)
    return dict(mv.tags or {}) | {"version": str(mv.version)}


def aliases(name: str) -> dict[str, str]:
    model = _call(lambda: _client().get_registered_model(name), "get registered model")
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


__all__ = ["PromotionError", "register_candidate", "evaluate_gates", "check_promotion", "promote", "rollback",
           "verify_checksums", "registry_lock", "champion_version", "version_tags", "aliases", "prepare_params"]
