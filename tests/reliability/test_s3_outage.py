"""The S3 server (the real SeaweedFS) stopped in the middle of curation, teacher caching and a
checkpoint upload, then restarted on the same ports and data: the tasks retry with backoff and
finish; manifests are complete, counts balance, and no partial object passes for a finished one.

The stop is triggered from inside the running stage (a wrapper around a library call decides
*when*); the outage itself is real: the server process group is killed and started again."""
from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest

from tests.reliability.datasets import check_dataset, check_shards, curate, direct_objects

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DOWN_S = 1.0  # seconds the server stays down after it stopped (plus its start-up, ~2-3 s)


class Outage:
    """Stop the server now; restart it from a thread ``down_s`` later."""

    def __init__(self, server, down_s: float = DOWN_S) -> None:
        self.server, self.down_s = server, down_s
        self.thread: threading.Thread | None = None
        self.stopped_at = self.up_at = 0.0

    def begin(self) -> None:
        if self.thread is not None:
            return
        self.stopped_at = time.monotonic()
        self.server.stop()

        def restart() -> None:
            time.sleep(self.down_s)
            self.server.start()
            self.up_at = time.monotonic()

        self.thread = threading.Thread(target=restart, daemon=True)
        self.thread.start()

    def end(self) -> float:
        """Wait for the restart; returns how long the server was unreachable."""
        assert self.thread is not None, "the outage never happened"
        self.thread.join(120)
        if not self.server.is_running:
            self.server.start()
        return self.up_at - self.stopped_at


@pytest.fixture
def s3_env(seaweed_s3, tmp_path, monkeypatch):
    if not seaweed_s3.is_running:
        seaweed_s3.start()
    bucket = seaweed_s3.new_bucket()
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"s3://{bucket}/root")
    monkeypatch.setenv("SNAPGEN_S3_ENDPOINT_URL", seaweed_s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    yield bucket
    if not seaweed_s3.is_running:
        seaweed_s3.start()


def test_s3_down_during_curation(s3_env, seaweed_s3, prefect_harness, monkeypatch, record):
    import tasks.curate as tc

    outage, real = Outage(seaweed_s3), tc.write_shard

    def write_shard(samples, path):
        if "shard-000002" in str(path):
            outage.begin()  # shards 0-1 may be done, 2.. are in flight: their uploads hit the outage
        return real(samples, path)

    monkeypatch.setattr(tc, "write_shard", write_shard)
    started = time.monotonic()
    try:
        manifest = curate(f"s3://{s3_env}/ds", count=30, per_shard=5)
    finally:
        down = outage.end()
    elapsed = time.monotonic() - started
    after_restart = max(0.0, started + elapsed - outage.up_at)
    assert manifest["counts"] == {"input": 30, "kept": 30, "quarantined": 0}
    assert len(manifest["shards"]) == 6
    check_dataset(seaweed_s3, s3_env, "ds/", manifest)
    record(stage="curation", outage_s=down, flow_s=elapsed, finished_s_after_restart=after_restart,
           shards=len(manifest["shards"]),
           data_lost="none (counts balance, every shard's sha256 and sample count match the manifest)")


def test_s3_down_during_caching(s3_env, seaweed_s3, tiny_bundle, prefect_harness, monkeypatch, record):
    import tasks.cache as tc
    from flows.cache import CacheParams, cache_teacher_flow

    ds = f"s3://{s3_env}/ds"
    dataset = curate(ds, count=12, per_shard=4)
    outage, real, calls = Outage(seaweed_s3), tc.cache_batch, []

    def cache_batch(keys, *args, **kwargs):
        calls.append(keys[0])
        if len(calls) == 2:
            outage.begin()  # one shard encoded, the others about to read or write
        return real(keys, *args, **kwargs)

    monkeypatch.setattr(tc, "cache_batch", cache_batch)
    started = time.monotonic()
    try:
        manifest = cache_teacher_flow(CacheParams(dataset_uri=ds, bundle_uri=f"file://{tiny_bundle}",
                                                  overrides=["targets_per_sample=1"], track=False))
    finally:
        down = outage.end()
    elapsed = time.monotonic() - started
    after_restart = max(0.0, started + elapsed - outage.up_at)
    assert manifest["samples"] == dataset["counts"]["kept"] == 12 and len(manifest["shards"]) == 3
    prefix = manifest["uri"][len(f"s3://{s3_env}/"):] + "/"
    objects = direct_objects(seaweed_s3, s3_env, prefix)
    assert json.loads(objects[prefix + "manifest.json"])["samples"] == 12
    check_shards(objects, prefix, manifest["shards"])
    record(stage="teacher caching", outage_s=down, flow_s=elapsed, finished_s_after_restart=after_restart,
           shards=len(manifest["shards"]),
           data_lost="none (12/12 samples cached, shard sha256 and sample counts match)")


def test_s3_down_during_checkpoint_upload(s3_env, seaweed_s3, tmp_path, record):
    """Training uploads each checkpoint through the pretraining task's uploader; the server is
    stopped half way through the step-4 checkpoint's upload (weights sent, optimiser state not).
    botocore retries once (max_attempts=1), so the uploader's own backoff has to ride out the
    outage; training then finishes. The half-uploaded checkpoint has no state.json (uploaded last),
    so it never passes for a finished one."""
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset
    from snapgen_model.training.data import load_cache_folder
    from snapgen_model.training.pretrain import PretrainConfig, fit
    from tasks.pretrain import _uploader
    from tasks.settings import get_settings
    from tasks.storage import Storage
    from tests.reliability.train_child import write_cache

    store = Storage.from_settings(get_settings(), max_attempts=1)
    base = store.uri("runs", "pretrain-outage", "checkpoints")
    outage = Outage(seaweed_s3)
    prefix = base[len(f"s3://{s3_env}/"):] + "/"
    real_upload, partial = store.upload_file, {}

    def upload_file(local, uri):
        if uri.endswith("step-00000004/optimizer.safetensors") and outage.thread is None:
            partial.update(direct_objects(seaweed_s3, s3_env, prefix + "step-00000004/"))
            outage.begin()
        return real_upload(local, uri)

    store.upload_file = upload_file  # the uploader calls store.upload_file: stop the server in the middle

    cfg = PretrainConfig.from_dict({"steps": 8, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 2,
                                    "keep_checkpoints": 10, "log_every": 1, "accelerator": "cpu",
                                    "kd": {"feature_kd": False}})
    data = load_cache_folder(write_cache(tmp_path / "cache"), ["clip"])
    started = time.monotonic()
    try:
        result = fit(get_preset("toy-smoke"), cfg, data, CacheConfig(targets_per_sample=2), tmp_path / "state",
                     upload=_uploader(store, base, cfg.keep_checkpoints))
    finally:
        down = outage.end()
    elapsed = time.monotonic() - started
    after_restart = max(0.0, started + elapsed - outage.up_at)
    assert result["step"] == 8
    assert [k.rsplit("/", 1)[1] for k in partial] == ["modules.safetensors"]  # mid-upload: no state.json yet
    objects = direct_objects(seaweed_s3, s3_env, prefix)
    local = sorted((tmp_path / "state").glob("step-*"))
    assert [p.name for p in local] == ["step-00000002", "step-00000004", "step-00000006", "step-00000008"]
    for folder in local:
        for f in folder.iterdir():
            remote = objects[f"{prefix}{folder.name}/{f.name}"]
            assert hashlib.sha256(remote).digest() == hashlib.sha256(f.read_bytes()).digest(), f"{folder.name}/{f.name}"
    assert len(objects) == sum(len(list(p.iterdir())) for p in local)
    record(stage="checkpoint upload", outage_s=down, train_s=elapsed, finished_s_after_restart=after_restart,
           checkpoints_uploaded=len(local),
           data_lost="none (every checkpoint file in S3 byte-identical to the local one)")
