"""Tasks of the teacher-caching stage: per curated shard, encode and write a cached shard.

Layout under the cache URI:
    shards/<name>.tar     cached WebDataset shard (latent, per-encoder states, K teacher targets)
    shards/<name>.json    per-shard record, written after its tar (unit of retry and of reuse)
    manifest.json         written last, keyed by (dataset hash, model ids, config hash, code version)
"""
from __future__ import annotations

import functools
import threading
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from snapgen_model.distill.cache import CacheConfig, cache_batch, cache_samples, storage_report
from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig
from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec
from snapgen_model.distill.vae import VAEAdapter, VAEConfig
from snapgen_model.data.wds_io import decode_sample, write_shard
from tasks.defaults import io_task_options
from tasks.settings import get_settings
from tasks.keys import content_key
from tasks.storage import Storage, storage

CODE_VERSION = "cache-1"


def local_folder(uri: str) -> Path:
    """A local copy of a model folder: file:// as is, release://<name> the shipped release's folder (every
    sha256 verified), s3:// downloaded once under <home>/cache."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("release://"):
        from snapgen_model.training.release import release_folder

        return release_folder(uri)
    if "://" not in uri:
        return Path(uri)
    store = storage()
    target = Path(get_settings().home) / "cache" / "models" / content_key(uri)[:16]
    marker = target / ".complete"
    if not marker.exists():
        prefix = uri.rstrip("/") + "/"
        for obj in store.list(prefix):
            store.download_file(obj, target / obj[len(prefix):])
        marker.write_text(uri)
    return target


_LOAD_LOCK = threading.Lock()  # cache tasks run in threads: diffusers' lazy imports and lru_cache are not thread-safe


def load_models(bundle: str, encoders_json: str, feature_layers: tuple[int, ...], with_teacher: bool):
    """(vae, {name: encoder}, teacher | None), loaded once per process (thread-safe)."""
    with _LOAD_LOCK:
        return _load_models(bundle, encoders_json, feature_layers, with_teacher)


@functools.lru_cache(maxsize=2)
def _load_models(bundle: str, encoders_json: str, feature_layers: tuple[int, ...], with_teacher: bool):
    """(vae, {name: encoder}, teacher | None), loaded once per process through the production adapters."""
    folder = str(local_folder(bundle))
    vae = VAEAdapter.from_pretrained(VAEConfig(path=folder, subfolder="vae"))
    encoders = {}
    for spec in json.loads(encoders_json):
        spec = TextEncoderSpec.from_dict(spec | {"path": folder})
        encoders[spec.name] = TextEncoderAdapter.from_pretrained(spec)
    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=folder, feature_layers=feature_layers)) if with_teacher else None
    return vae, encoders, teacher


def cache_key(dataset_manifest: dict[str, Any], bundle: str, encoders: list[dict], feature_layers: tuple[int, ...],
              cfg: CacheConfig, bundle_id: str) -> str:
    return content_key([dataset_manifest["dataset_hash"], bundle_id, encoders, list(feature_layers), cfg.to_dict(),
                  CODE_VERSION])


@task(name="read-json", **io_task_options())
def read_json(uri: str) -> dict[str, Any] | None:
    store = storage()
    return store.read_json(uri) if store.exists(uri) else None


@task(name="cache-shard", **io_task_options())
def cache_shard(dataset_uri: str, shard: dict[str, Any], out_uri: str, bundle: str, encoders: list[dict],
                feature_layers: tuple[int, ...], cfg: CacheConfig, key: str) -> dict[str, Any]:
    """Cache one curated shard; a finished shard with the same key is reused as is."""
    store = storage()
    name = Path(shard["name"]).stem
    tar_uri, rec_uri = store.join(out_uri, "shards", f"{name}.tar"), store.join(out_uri, "shards", f"{name}.json")
    if store.exists(rec_uri):
        done = store.read_json(rec_uri)
        if done.get("key") == key and store.exists(tar_uri) and store.size(tar_uri) == done.get("bytes"):
            return done | {"reused": True}
    vae, encs, teacher = load_models(bundle, json.dumps(encoders, sort_keys=True), tuple(feature_layers),
                                     cfg.targets_per_sample > 0)
    samples, skipped = read_curated_shard(store, store.join(dataset_uri, shard["name"]), shard.get("samples"))
    # images of several sizes (aspect buckets) are encoded size by size; members keep the shard's order
    labelled = any("label" in s for s in samples)  # class labels (ImageNet-style `cls` members) are cached too
    members = cache_samples([s["__key__"] for s in samples], [s["image"] for s in samples],
                            [s.get("caption", "") for s in samples], vae=vae, encoders=encs, teacher=teacher, cfg=cfg,
                            encode=lambda *a, **k: cache_batch(*a, **k),  # (looked up per call: tests patch it)
                            labels=[s.get("label") for s in samples] if labelled else None)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{name}.tar")
        info = write_shard(iter(members), local)
        store.upload_file(local, tar_uri)
    done = {"name": f"shards/{name}.tar", "source": shard["name"], "samples": info.samples, "bytes": info.bytes,
            "sha256": info.sha256, "key": key, "storage": storage_report(members[0]) if members else {}} | skipped
    store.write_json(rec_uri, done)
    return done | {"reused": False}


def read_curated_shard(store: Storage, uri: str, expected: int | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Decoded samples of one curated shard, read by the streaming reader: corrupt samples (bad
    image bytes, broken members) and a truncated or garbled tar are skipped and counted, never
    fatal; storage errors (outages, a missing shard) are raised so the task retries."""
    from snapgen_model.data.wds_io import ShardStream
    from tasks.storage import StorageError

    stream = ShardStream([uri], store.open_read, resampled=False, rank=0, world_size=1, decode=decode_sample,
                         expected_counts={uri: expected} if expected else None,
                         fatal=(StorageError, FileNotFoundError))
    samples = list(stream)
    stats = stream.stats
    skipped = {"bad_samples": stats["bad_samples"] + stats["missing_samples"], "bad_shards": stats["bad_shards"]}
    if skipped["bad_samples"] or skipped["bad_shards"]:
        logging.getLogger(__name__).warning("%s: skipped %d corrupt or unreadable samples (%s)", uri,
                                            skipped["bad_samples"], "truncated or garbled tar" if
                                            skipped["bad_shards"] else "bad members")
    return samples, skipped


@task(name="write-cache-manifest", **io_task_options())
def write_cache_manifest(out_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """manifest.json last; the totals of samples skipped as corrupt come from the shard records."""
    store = storage()
    totals = {"bad_samples": 0, "bad_shards": 0}
    for shard in manifest.get("shards", []):
        record = store.read_json(store.join(out_uri, "shards", f"{Path(shard['name']).stem}.json"))
        for field in totals:
            totals[field] += int(record.get(field, 0))
    manifest = manifest | totals
    store.write_json(store.join(out_uri, "manifest.json"), manifest)
    return manifest


@task(name="log-cache", **io_task_options())
def log_cache(manifest: dict[str, Any], out_uri: str) -> str:
    from tasks.lineage import lineage_tags
    from tasks.tracking import start_run

    tags = lineage_tags(dataset_hash=manifest["dataset_hash"], teacher_id=manifest["bundle_id"],
                        config_hash=manifest["key"][:16]) | {"snapgen.stage": "cache_teacher", "snapgen.cache_uri": out_uri}
    with start_run(get_settings(), f"cache teacher features ({manifest.get('samples', 0)} samples)", tags=tags) as run:
        run.log_params({"cache": manifest["config"], "encoders": [e["name"] for e in manifest["encoders"]]})
        metrics = {"samples": manifest["samples"], "shards": len(manifest["shards"]),
                   "reused_shards": manifest["reused_shards"], "bad_samples": manifest.get("bad_samples", 0),
                   "bad_shards": manifest.get("bad_shards", 0)}
        metrics |= {f"bytes_per_sample.{f}": v["bytes_per_sample"] for f, v in manifest["storage"].items()}
        run.log_metrics(metrics)
        run.log_dict(manifest, "cache_manifest.json")
        return run.run_id
