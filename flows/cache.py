"""cache_teacher_flow: curated shards -> cached latents, text states and teacher targets (stage 2).

Fans out over shards as retriable tasks on the task runner the settings choose: a local thread
pool by default, or a Dask cluster (`task_runner="dask"`, a local cluster unless an address is
given). Reruns reuse finished shards; any change of dataset, models or config changes the key and
so invalidates exactly what depends on it.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.progress import progress
from snapgen_model.distill.cache import CacheConfig
from tasks.cache import cache_key, cache_shard, log_cache, read_json, write_cache_manifest

TOY_ENCODERS = [{"name": "clip", "kind": "clip", "path": "-", "subfolder": "text_encoder", "max_length": 16}]


class CacheParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    dataset_uri: str = Field(description="curated dataset folder (with manifest.json)")
    bundle_uri: str = Field(description="teacher bundle folder: vae/, transformer/, text encoder folders")
    out_uri: str | None = Field(None, description="cache folder (default: <dataset>/cache/<key>)")
    encoders: list[dict[str, Any]] = Field(default_factory=lambda: list(TOY_ENCODERS),
                                           description="TextEncoderSpec dicts (paths are inside the bundle)")
    feature_layers: list[int] = Field(default_factory=lambda: [-1], description="teacher blocks to capture")
    overrides: list[str] = Field(default_factory=list, description="cache config overrides key=value")
    track: bool = True


def _summary(manifest: dict[str, Any]) -> str:
    lines = [f"### Teacher cache `{manifest['key'][:16]}`", "", f"{manifest['samples']} samples in "
             f"{len(manifest['shards'])} shards ({manifest['reused_shards']} reused)", "",
             "| field | bytes/sample | GB per 1M samples |", "|---|---|---|"]
    lines += [f"| {f} | {v['bytes_per_sample']:,} | {v['gb_per_1m_samples']:.2f} |" for f, v in manifest["storage"].items()]
    return "\n".join(lines)


@flow(name="cache-teacher", log_prints=True)
def cache_teacher_flow(params: CacheParams) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = CacheConfig().with_overrides(params.overrides)
    dataset = read_json(params.dataset_uri.rstrip("/") + "/manifest.json")
    if dataset is None:
        raise FileNotFoundError(f"no curated dataset at {params.dataset_uri} (manifest.json missing): run curate first")
    bundle_meta = read_json(params.bundle_uri.rstrip("/") + "/bundle.json") or {}
    bundle_id = bundle_meta.get("config_hash", params.bundle_uri)
    layers = tuple(params.feature_layers)
    key = cache_key(dataset, params.bundle_uri, params.encoders, layers, cfg, bundle_id)
    out = params.out_uri or f"{params.dataset_uri.rstrip('/')}/cache/{key[:16]}"
    existing = read_json(out + "/manifest.json")
    if existing and existing.get("key") == key:
        logger.info("cache hit: %s", out)
        return existing | {"cache_hit": True, "uri": out}
    futures = [cache_shard.submit(params.dataset_uri, s, out, params.bundle_uri, params.encoders, layers, cfg, key)
               for s in dataset["shards"]]
    shards = [f.result() for f in progress(futures, "caching shards", len(futures))]
    manifest = {"key": key, "dataset_hash": dataset["dataset_hash"], "dataset_uri": params.dataset_uri,
                "bundle_uri": params.bundle_uri, "bundle_id": bundle_id, "encoders": params.encoders,
                "feature_layers": list(layers), "config": cfg.to_dict(), "samples": sum(s["samples"] for s in shards),
                "shards": [{k: s[k] for k in ("name", "source", "samples", "bytes", "sha256")} for s in shards],
                "reused_shards": sum(bool(s["reused"]) for s in shards),
                "storage": shards[0]["storage"] if shards else {}, "code_version": "cache-1"}
    manifest = write_cache_manifest(out, manifest)
    create_markdown_artifact(_summary(manifest), key="teacher-cache", description=f"teacher cache {out}")
    if params.track:
        manifest["mlflow_run_id"] = log_cache(manifest, out)
    return manifest | {"cache_hit": False, "uri": out}


def run_cache(params: CacheParams, task_runner: str = "local", address: str | None = None,
              workers: int = 2) -> dict[str, Any]:
    """Run the flow on the chosen task runner: "local" (threads) or "dask" (a LocalCluster of
    `workers` processes, or the scheduler at `address`)."""
    if task_runner == "local":
        return cache_teacher_flow(params)
    if task_runner != "dask":
        raise ValueError(f"task_runner: {task_runner!r} is not supported; choose 'local' or 'dask'")
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=address) if address else
              DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                             "dashboard_address": None}))
    return cache_teacher_flow.with_options(task_runner=runner)(params)
