"""Tasks of the curation stage: thin wrappers over `snapgen_model.data.curation`, doing the I/O.

Layout under the output URI:
    _staging/chunk-NNNNN.json   pass-1 results per candidate chunk (reused on rerun if the chunk is unchanged)
    shards/shard-NNNNNN.tar     WebDataset shards
    shards/shard-NNNNNN.json    per-shard record, written after its tar (a shard is the unit of retry)
    quarantine.jsonl            one line per refused input (key, source, reason, detail)
    manifest.json               written last: a manifest means the dataset is complete
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any

from prefect import task

from snapgen_model.data.curation import CurationConfig, check_candidates, plan_dataset, shard_samples
from snapgen_model.data.shapes import ShapesWorld, ShapesWorldConfig
from snapgen_model.data.sources import SourceSpec, enumerate_source
from snapgen_model.data.wds_io import write_shard
from tasks.defaults import compute_task_options, io_task_options
from tasks.settings import get_settings
from tasks.keys import content_key
from tasks.storage import Storage, storage

MANIFEST = "manifest.json"
CODE_VERSION = "curate-1"


@functools.lru_cache(maxsize=8)
def world_for(resolution: int, world: str = "") -> ShapesWorld:
    """The shapes world at `resolution`: the default one, object sizes scaled from the 64 px calibration
    (14-22 px), with the fields of the JSON object `world` (a source's `world`) on top."""
    lo, hi = (max(8, round(v * resolution / 64)) for v in (14, 22))
    fields = {"resolution": resolution, "object_size_px": (lo, hi)} | (json.loads(world) if world else {})
    return ShapesWorld(ShapesWorldConfig(**fields))


def check_sources_exist(specs: list[SourceSpec], store: Storage) -> None:
    """Fail before any work with an error naming every source that does not exist."""
    missing = []
    for spec in specs:
        if spec.kind == "shapes":
            continue
        if spec.kind in ("folder", "imagefolder") or (spec.kind == "webdataset" and not spec.uri.endswith(".tar")):
            ok = bool(store.list(spec.uri.rstrip("/") + "/"))
        else:
            ok = store.exists(spec.uri)
        if not ok:
            missing.append(f"{spec.kind} source {spec.uri!r}")
    if missing:
        raise FileNotFoundError("curation source does not exist or is empty: " + "; ".join(missing))


@task(name="enumerate-sources", **io_task_options())
def enumerate_sources(specs: list[SourceSpec]) -> list[dict[str, Any]]:
    """All candidates of all sources, in source order (names default to kind + position)."""
    store = storage()
    check_sources_exist(specs, store)
    cands: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        named = spec if spec.name else SourceSpec.from_dict(spec.to_dict() | {"name": f"{spec.kind}{i}"})
        cands.extend(enumerate_source(named, store))
    return cands


@task(name="check-chunk", **io_task_options())
def check_chunk(out_uri: str, index: int, cands: list[dict[str, Any]], cfg: CurationConfig) -> list[dict[str, Any]]:
    """Pass 1 for one chunk; its result is staged so a rerun skips unchanged chunks."""
    store = storage()
    uri = store.join(out_uri, "_staging", f"chunk-{index:05d}.json")
    key = content_key([cands, cfg.to_dict(), CODE_VERSION])
    if store.exists(uri):
        staged = store.read_json(uri)
        if staged.get("chunk_hash") == key:
            return staged["records"]
    records = check_candidates(cands, store, cfg, world_for)
    store.write_json(uri, {"chunk_hash": key, "records": records})
    return records


@task(name="plan-dataset", **compute_task_options())
def plan(records: list[dict[str, Any]], cfg: CurationConfig):
    return plan_dataset(records, cfg)


@task(name="write-shard", **io_task_options())
def write_shard_task(out_uri: str, index: int, records: list[dict[str, Any]], cfg: CurationConfig) -> dict[str, Any]:
    """Pass 3 for one shard: build the tar locally, upload it, then its record. Skips a finished shard."""
    store = storage()
    name = f"shard-{index:06d}"
    tar_uri, rec_uri = store.join(out_uri, "shards", f"{name}.tar"), store.join(out_uri, "shards", f"{name}.json")
    plan_hash = content_key([[r["key"], r["sha256"]] for r in records] + [cfg.to_dict(), CODE_VERSION])
    if store.exists(rec_uri) and store.exists(tar_uri):
        done = store.read_json(rec_uri)
        if done.get("plan_hash") == plan_hash and store.size(tar_uri) == done.get("bytes"):
            return done
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{name}.tar")
        info = write_shard(shard_samples(records, store, cfg, world_for), local)
        store.upload_file(local, tar_uri)
    done = {"name": f"shards/{name}.tar", "uri": tar_uri, "samples": info.samples, "bytes": info.bytes,
            "sha256": info.sha256, "plan_hash": plan_hash}
    store.write_json(rec_uri, done)
    return done


@task(name="write-manifest", **io_task_options())
def write_manifest(out_uri: str, specs: list[SourceSpec], cfg: CurationConfig, plan_result,
                   shards: list[dict[str, Any]], input_hash: str) -> dict[str, Any]:
    """quarantine.jsonl, then manifest.json last."""
    store = storage()
    quarantine_uri = store.join(out_uri, "quarantine.jsonl")
    store.write_text(quarantine_uri, "".join(json.dumps(q) + "\n" for q in plan_result.quarantined))
    buckets: dict[str, int] = {}
    for rec in plan_result.kept:
        buckets[rec["bucket"]] = buckets.get(rec["bucket"], 0) + 1
    manifest = {
        "format": "snapgen-webdataset-v1", "dataset_hash": plan_result.dataset_hash, "input_hash": input_hash,
        "config": cfg.to_dict(), "sources": [s.to_dict() for s in specs], "counts": plan_result.counts,
        "buckets": buckets, "shards": [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in shards],
        "quarantine": "quarantine.jsonl", "code_version": CODE_VERSION,
    }
    store.write_json(store.join(out_uri, MANIFEST), manifest)
    return manifest


@task(name="read-manifest", **io_task_options())
def read_manifest(out_uri: str) -> dict[str, Any] | None:
    store = storage()
    uri = store.join(out_uri, MANIFEST)
    return store.read_json(uri) if store.exists(uri) else None


def input_hash(cands: list[dict[str, Any]], specs: list[SourceSpec], cfg: CurationConfig) -> str:
    """Cache key of a curation run: the candidate listing, the sources and the config."""
    return content_key([[c["raw_key"] for c in cands], [s.to_dict() for s in specs], cfg.to_dict(), CODE_VERSION])


@task(name="sample-grid", **compute_task_options())
def sample_grid_png(out_uri: str, shards: list[dict[str, Any]], count: int = 16) -> bytes | None:
    """A PNG grid of the first `count` curated images (for MLflow and the Prefect artifact)."""
    import io

    import numpy as np
    from PIL import Image

    from snapgen_model.data.sources import iter_tar_groups
    from snapgen_model.data.wds_io import decode_sample
    from snapgen_model.imaging import make_grid

    if not shards:
        return None
    store, images, captions = storage(), [], []
    for key, members in iter_tar_groups(store.open_read(shards[0]["uri"])):
        sample = decode_sample(key, members)
        images.append(np.asarray(Image.fromarray(sample["image"]).resize((64, 64))))
        captions.append(sample.get("caption", str(sample.get("label", ""))))
        if len(images) >= count:
            break
    buf = io.BytesIO()
    make_grid(np.stack(images), cols=8, captions=captions).save(buf, format="PNG")
    return buf.getvalue()


@task(name="log-curation", **io_task_options())
def log_curation(manifest: dict[str, Any], grid_png: bytes | None, out_uri: str) -> str:
    """One MLflow run: filter counts as metrics, sources/config as params, manifest and grid as artifacts."""
    import io

    from PIL import Image

    from tasks.lineage import lineage_tags
    from tasks.tracking import start_run

    settings = get_settings()
    tags = lineage_tags(dataset_hash=manifest["dataset_hash"]) | {"snapgen.stage": "curate",
                                                                  "snapgen.dataset_uri": out_uri}
    with start_run(settings, f"curate {manifest['counts'].get('kept', 0)} samples", tags=tags) as run:
        run.log_params({"curation": manifest["config"], "sources": len(manifest["sources"])})
        run.log_metrics({f"count_{k}": v for k, v in manifest["counts"].items()}
                        | {"shards": len(manifest["shards"])})
        run.log_dict(manifest, "manifest.json")
        if grid_png:
            run.log_image(Image.open(io.BytesIO(grid_png)), "sample_grid.png")
        return run.run_id
