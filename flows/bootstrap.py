"""bootstrap_teacher_flow: train the toy world's teacher bundle (AE, then SD3 teacher + text encoder).

Orchestration only (DESIGN.md "Layout"): resolve the preset, look for a finished bundle of the same
config hash in storage (a cache hit returns it without training), else train the autoencoder and the
teacher as tasks, evaluate the bundle loaded through the production adapters, publish it to
`<storage root>/teachers/<config hash>/` (bundle.json last), log the MLflow run and register a
version of `snapgen-toy-teacher`.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.bootstrap import (
    MODEL_NAME,
    bundle_summary,
    evaluate_teacher_task,
    find_cached_bundle,
    find_registered,
    log_bootstrap_run,
    log_release_run,
    publish_bundle,
    resolve_config,
    result_summary,
    train_autoencoder_task,
    train_teacher_task,
    verify_release_task,
    workdir,
)


def summary_markdown(result: dict[str, Any]) -> str:
    """A short table of the bootstrap's figures (Prefect artifact, CLI)."""
    lines = [f"### Toy teacher `{result['config_hash']}` ({result['preset']})", "",
             f"bundle: `{result['bundle_uri']}`; model {MODEL_NAME} v{result.get('model_version')}; "
             f"cache hit: {result['cache_hit']}", "", "| figure | value |", "|---|---|"]
    for key, value in result["metrics"].items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


def _cache_hit(cached: dict[str, Any], config_hash: str, preset: str) -> dict[str, Any]:
    registered = find_registered(config_hash) or {}
    return {"bundle_uri": cached["bundle_uri"], "config_hash": config_hash, "preset": preset,
            "metrics": result_summary(cached["record"]), "mlflow_run_id": registered.get("run_id"),
            "model_version": registered.get("version"), "cache_hit": True, "phase_seconds": {}}


@flow(name="bootstrap-teacher", log_prints=True)
def bootstrap_teacher_flow(preset: str = "toy", overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Returns {bundle_uri, config_hash, preset, metrics, mlflow_run_id, model_version, cache_hit, phase_seconds}."""
    logger = get_run_logger()
    resolved = resolve_config(preset, list(overrides or []))
    config_hash = resolved["config_hash"]
    cached = None if force else find_cached_bundle(config_hash)
    if cached is not None:
        logger.info("cache hit: teacher bundle %s already in storage at %s", config_hash, cached["bundle_uri"])
        return _cache_hit(cached, config_hash, preset)
    folder = str(workdir(config_hash))
    phases: dict[str, float] = {}
    started = time.monotonic()
    logger.info("bootstrap %s (%s): training the autoencoder", preset, config_hash)
    ae = train_autoencoder_task(resolved["config"], folder)
    phases["autoencoder"] = time.monotonic() - started
    logger.info("autoencoder done in %.0f s: %s; training the teacher", phases["autoencoder"], ae["metrics"])
    teacher = train_teacher_task(resolved["config"], folder, ae)
    phases["teacher"] = time.monotonic() - started - phases["autoencoder"]
    logger.info("teacher done in %.0f s: %s; evaluating", phases["teacher"], teacher["metrics"])
    grid = evaluate_teacher_task(folder)
    phases["evaluation"] = grid["evaluation"]["seconds"]
    uri = publish_bundle(folder, config_hash)
    tracking = log_bootstrap_run(folder, uri, preset, grid)
    phases["total"] = time.monotonic() - started
    result = {"bundle_uri": uri, "config_hash": config_hash, "preset": preset,
              "metrics": bundle_summary(folder), **tracking, "cache_hit": False,
              "phase_seconds": {k: round(v, 1) for k, v in phases.items()}}
    create_markdown_artifact(summary_markdown(result), key=f"bootstrap-teacher-{preset}",
                             description=f"toy teacher bundle {config_hash}")
    logger.info("teacher bundle %s published to %s (%s v%s)", config_hash, uri, MODEL_NAME, result["model_version"])
    return result


def _weights_and_configs(record: dict[str, Any]) -> dict[str, str]:
    """A bundle record's file checksums without its model card: a card corrected after release
    (`snapgen release-card`) does not make the stored bundle a different teacher."""
    return {k: v for k, v in (record.get("files") or {}).items() if k != "MODEL_CARD.md"}


@flow(name="register-teacher-release", log_prints=True)
def register_teacher_release_flow(name: str = "toy-teacher/v2") -> dict[str, Any]:
    """Use a shipped teacher release instead of training one: verify its checksums, publish it to
    `<storage root>/teachers/<config hash>/` unless storage already holds that exact bundle, and register
    it as a version of `snapgen-toy-teacher` unless one of that config exists. Returns the same fields
    as `bootstrap_teacher_flow` (cache_hit: True when nothing had to be published or registered)."""
    logger = get_run_logger()
    shipped = verify_release_task(name)
    config_hash, folder = shipped["config_hash"], shipped["folder"]
    cached = find_cached_bundle(config_hash)
    same = cached is not None and _weights_and_configs(cached["record"]) == _weights_and_configs(shipped["record"])
    uri = cached["bundle_uri"] if same else publish_bundle(folder, config_hash)
    registered = find_registered(config_hash) if same else None
    tracking = ({"mlflow_run_id": registered["run_id"], "model_version": registered["version"]} if registered
                else log_release_run(folder, uri, name))
    logger.info("teacher: shipped release %s (config %s, checksums verified) at %s, %s v%s", name, config_hash,
                uri, MODEL_NAME, tracking["model_version"])
    return {"bundle_uri": uri, "config_hash": config_hash, "preset": shipped["record"].get("preset"),
            "metrics": result_summary(shipped["record"]), **tracking, "cache_hit": bool(same and registered),
            "phase_seconds": {}, "release": name}
