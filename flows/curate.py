"""curate_flow: sources -> checked chunks -> global plan -> WebDataset shards -> manifest (last).

Orchestration only: fan-out over chunks and shards as retriable tasks, progress, the summary
artifact and the MLflow run. A rerun with the same inputs is a cache hit (same input hash: the
manifest is returned as is); an interrupted run resumes without redoing staged chunks or
finished shards, and no manifest exists until every shard is written.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.progress import progress
from snapgen_model.data.curation import CurationConfig
from snapgen_model.data.sources import SourceSpec
from tasks.curate import (
    check_chunk,
    enumerate_sources,
    input_hash,
    log_curation,
    plan,
    read_manifest,
    sample_grid_png,
    write_manifest,
    write_shard_task,
)


class CurateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    sources: list[dict[str, Any]] = Field(description="source specs: {kind, uri | count, name?, ...}")
    out: str = Field(description="output dataset URI (file:// or s3://)")
    overrides: list[str] = Field(default_factory=list, description="curation config overrides key=value")
    force: bool = Field(False, description="ignore a matching manifest and rebuild")
    track: bool = Field(True, description="log the summary to MLflow")


def summary_markdown(manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    lines = [f"### Curated dataset `{manifest['dataset_hash'][:16]}`", "",
             "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", f"{len(manifest['shards'])} shards, "
              f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.2f} MB; buckets {manifest['buckets']}"]
    return "\n".join(lines)


@flow(name="curate", log_prints=True)
def curate_flow(params: CurateParams) -> dict[str, Any]:
    logger = get_run_logger()
    specs = [SourceSpec.from_dict(s, prefix=f"sources[{i}]") for i, s in enumerate(params.sources)]
    cfg = CurationConfig().with_overrides(params.overrides)
    cands = enumerate_sources(specs)
    key = input_hash(cands, specs, cfg)
    existing = read_manifest(params.out)
    if existing and existing.get("input_hash") == key and not params.force:
        logger.info("cache hit: %s already holds this dataset (%s)", params.out, existing["dataset_hash"][:16])
        return existing | {"cache_hit": True}
    chunks = [cands[i:i + cfg.chunk_size] for i in range(0, len(cands), cfg.chunk_size)]
    futures = [check_chunk.submit(params.out, i, chunk, cfg) for i, chunk in enumerate(chunks)]
    records = [r for f in progress(futures, "checking", len(chunks)) for r in f.result()]
    plan_result = plan(records, cfg)
    futures = [write_shard_task.submit(params.out, i, recs, cfg) for i, recs in enumerate(plan_result.shards)]
    shards = [f.result() for f in progress(futures, "writing shards", len(futures))]
    manifest = write_manifest(params.out, specs, cfg, plan_result, shards, key)
    table = summary_markdown(manifest)
    create_markdown_artifact(table, key="curation-summary", description=f"curation of {params.out}")
    if params.track:
        manifest["mlflow_run_id"] = log_curation(manifest, sample_grid_png(params.out, shards), params.out)
    logger.info("curated %s: %s", params.out, manifest["counts"])
    return manifest | {"cache_hit": False}
