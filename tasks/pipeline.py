"""Tasks of the end-to-end pipeline: stage records (what makes a rerun resume at the failed stage and
an unchanged rerun a no-op), teacher-bundle facts the stages need, files to checksum, and the data of
the run report.

A stage record `<storage root>/pipelines/stages/<stage>-<key>.json` is written after a stage
finished, last, with the stage's result and the URIs of its outputs. The key is the sha256 of the
stage's name, its configuration, the keys of the stages it consumes and the code version (a hash of
the source of snapgen_model/, tasks/ and flows/). A record counts only while every output it names
still exists, so deleting a stage's output reruns that stage and nothing upstream.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from tasks.cache import local_folder
from tasks.defaults import io_task_options
from tasks.keys import code_hash, content_key
from tasks.settings import get_settings
from tasks.storage import storage

_ROOT = Path(__file__).resolve().parents[1]


def stage_key(stage: str, config: Any, upstream: list[str]) -> str:
    """The stage's content key: its config, its upstream keys and the behaviour of the product's code
    (`tasks.keys.code_hash`: a comment or docstring edit reruns nothing)."""
    return content_key([stage, config, upstream, code_hash()], 24)


def record_uri(stage: str, key: str) -> str:
    store = storage()
    return store.join(get_settings().storage_root, "pipelines", "stages", f"{stage}-{key}.json")


@task(name="lookup-stage", **io_task_options())
def lookup_stage(stage: str, key: str) -> dict[str, Any] | None:
    """The finished record of this stage and key, if it and every output it names still exist."""
    store, uri = storage(), record_uri(stage, key)
    if not store.exists(uri):
        return None
    record = store.read_json(uri)
    missing = [o for o in record.get("outputs", []) if not store.exists(o)]
    return None if missing else record


@task(name="record-stage", **io_task_options())
def record_stage(stage: str, key: str, result: dict[str, Any], outputs: list[str], seconds: float,
                 flow_run_id: str = "") -> str:
    """Write the stage's finished record; `flow_run_id`: the pipeline flow run that ran it (a later run
    that reuses the stage links its report to that run's Prefect page)."""
    uri = record_uri(stage, key)
    storage().write_json(uri, {"stage": stage, "key": key, "result": result, "outputs": outputs,
                               "seconds": round(seconds, 2), "code": code_hash(), "flow_run_id": flow_run_id})
    return uri


# ----------------------------------------------------------------------------- teacher bundle facts

@task(name="teacher-facts", **io_task_options())
def teacher_facts(bundle_uri: str) -> dict[str, Any]:
    """{local, world, resolution, text_encoder, bundle_id, toy} of a teacher bundle (downloaded once)."""
    from snapgen_model.artifacts.teacher_bundle import BUNDLE_FILE, bundle_world, is_toy_teacher_bundle

    local = local_folder(bundle_uri)
    if not (local / BUNDLE_FILE).is_file():
        raise FileNotFoundError(f"teacher bundle {bundle_uri}: no {BUNDLE_FILE} (not a finished bundle)")
    record = json.loads((local / BUNDLE_FILE).read_text())
    world = bundle_world(local)
    return {"local": str(local), "world": world, "resolution": int(world.get("resolution") or 0) or None,
            "text_encoder": str(local / "text_encoder") if (local / "text_encoder").is_dir() else None,
            "bundle_id": record.get("config_hash") or content_key(bundle_uri, 16), "toy": is_toy_teacher_bundle(local)}


@task(name="list-files", **io_task_options())
def list_files(folder_uri: str, names: list[str] | None = None) -> dict[str, str]:
    """label -> URI of the files under `folder_uri` (all of them, or just `names`)."""
    store = storage()
    if names is not None:
        return {n: store.join(folder_uri, n) for n in names}
    prefix = folder_uri.rstrip("/") + "/"
    return {uri[len(prefix):]: uri for uri in store.list(prefix)}


@task(name="write-pipeline-summary", **io_task_options())
def write_summary(summary: dict[str, Any], uri: str) -> str:
    storage().write_json(uri, summary)
    return uri
