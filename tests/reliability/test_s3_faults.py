"""Slow and failing S3 responses from a fault-injecting proxy (tests/reliability/fault_proxy.py) in
front of the real SeaweedFS: transient faults are absorbed by retries (botocore's, the storage
layer's ranged resume, Prefect's task retries); a persistent fault fails the task with a clear
message and leaves a state the next run resumes from.

The proxy is the only fake here, and it only injects what a real server cannot be made to do on
cue (5xx replies, resets, bodies cut short, stalls); every other byte goes to SeaweedFS."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from tests.reliability.datasets import check_dataset, curate, direct_objects
from tests.reliability.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration
READ_TIMEOUT_S = 1.0


@pytest.fixture
def proxy(seaweed_s3):
    if not seaweed_s3.is_running:
        seaweed_s3.start()
    with FaultProxy(seaweed_s3.endpoint_url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def s3_env(seaweed_s3, proxy, tmp_path, monkeypatch):
    """Flows see the proxy as their S3 endpoint; returns the bucket."""
    bucket = seaweed_s3.new_bucket()
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"s3://{bucket}/root")
    monkeypatch.setenv("SNAPGEN_S3_ENDPOINT_URL", proxy.endpoint_url)
    monkeypatch.setenv("SNAPGEN_S3_READ_TIMEOUT", str(READ_TIMEOUT_S))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    return bucket


# ------------------------------------------------------------------------------------------ storage
FAULTS = [  # (kind, options, faults in a row per call)
    ("status", {"status": 503}, 2), ("status", {"status": 500}, 2), ("reset", {}, 2),
    ("delay", {"delay_s": READ_TIMEOUT_S + 0.5}, 1),  # longer than the read timeout: the client gives up, retries
    ("delay", {"delay_s": 0.3}, 1),  # slow but within the timeout: one slow request
]


@pytest.mark.parametrize("kind,options,count", FAULTS, ids=["503", "500", "reset", "stall", "slow"])
def test_transient_faults_are_absorbed_by_retries(kind, options, count, seaweed_s3, proxy, tmp_path, record):
    from tasks.storage import Storage

    bucket = seaweed_s3.new_bucket()
    store = Storage(root=f"s3://{bucket}/r", endpoint_url=proxy.endpoint_url, region=seaweed_s3.region,
                    access_key_id=seaweed_s3.access_key, secret_access_key=seaweed_s3.secret_key,
                    read_timeout=READ_TIMEOUT_S)
    payload = hashlib.sha256(b"x").digest() * 40_000  # 1.28 MB
    local = tmp_path / "up.bin"
    local.write_bytes(payload)
    ops = {
        "write_bytes": lambda: store.write_bytes(store.uri("a.bin"), payload),
        "upload_file": lambda: store.upload_file(local, store.uri("b.bin")),
        "exists": lambda: store.exists(store.uri("a.bin")),
        "list": lambda: store.list(store.uri("")),
        "read_bytes": lambda: store.read_bytes(store.uri("b.bin")),
        "download_file": lambda: store.download_file(store.uri("a.bin"), tmp_path / "down.bin").read_bytes(),
    }
    timings = {}
    for name, op in ops.items():
        before = proxy.stats.faults[kind]
        proxy.add(kind, count=count, **options)
        started = time.monotonic()
        result = op()
        timings[name] = time.monotonic() - started
        assert proxy.stats.faults[kind] - before == count, f"{name}: faults not injected"
        if name in ("read_bytes", "download_file"):
            assert result == payload, name
    assert direct_objects(seaweed_s3, bucket, "r/") == {"r/a.bin": payload, "r/b.bin": payload}
    record(fault=f"{kind} {options}", faults_injected=sum(proxy.stats.faults.values()),
           slowest_op=max(timings, key=timings.get), slowest_op_s=max(timings.values()),
           total_s=sum(timings.values()))


def test_body_cut_short_is_resumed_never_taken_as_whole(seaweed_s3, proxy, record):
    """A GET whose connection dies half way through the body: the reader resumes with a ranged GET;
    a persistent cut raises (naming the URI) instead of returning a short object."""
    from tasks.storage import Storage, StorageUnavailableError

    bucket = seaweed_s3.new_bucket()
    store = Storage(root=f"s3://{bucket}/r", endpoint_url=proxy.endpoint_url, region=seaweed_s3.region,
                    access_key_id=seaweed_s3.access_key, secret_access_key=seaweed_s3.secret_key, max_attempts=2)
    payload = bytes(range(256)) * 4000
    store.write_bytes(store.uri("obj.bin"), payload)
    proxy.add("truncate", count=2, method="GET")
    started = time.monotonic()
    assert store.read_bytes(store.uri("obj.bin")) == payload
    with store.open_read(store.uri("obj.bin")) as stream:  # the streaming path readers use
        proxy.add("truncate", count=1, method="GET")
        assert stream.read() == payload
    resumed_s = time.monotonic() - started
    assert proxy.stats.faults["truncate"] == 2  # 1 + 1 hits: the second read's first GET was issued before add()
    proxy.add("truncate", count=None, method="GET")
    with pytest.raises(StorageUnavailableError, match=r"read s3://.*/r/obj\.bin failed at byte"):
        store.read_bytes(store.uri("obj.bin"))
    record(fault="response body cut in half (connection reset)", resumed_s=resumed_s,
           persistent="StorageUnavailableError naming the URI, no short data returned")


# ------------------------------------------------------------------------------------------ flows
def test_curation_through_flaky_s3(s3_env, seaweed_s3, proxy, prefect_harness, record):
    bucket = s3_env
    proxy.add("status", count=2, status=503, method="PUT", path_contains="/shards/")
    proxy.add("status", count=1, status=500, method="PUT", path_contains="/_staging/")
    proxy.add("reset", count=2, method="HEAD")
    proxy.add("delay", count=1, delay_s=READ_TIMEOUT_S + 0.5, method="PUT", path_contains=".json")
    proxy.add("delay", count=3, delay_s=0.3)
    out = f"s3://{bucket}/ds/"
    started = time.monotonic()
    manifest = curate(out.rstrip("/"))
    elapsed = time.monotonic() - started
    injected = dict(proxy.stats.faults)
    assert injected["status"] == 3 and injected["reset"] == 2 and injected["delay"] == 4, injected
    assert manifest["counts"]["input"] == 30 and len(manifest["shards"]) == 6
    check_dataset(seaweed_s3, bucket, "ds/", manifest)
    proxy.add("truncate", count=1, method="GET", path_contains="manifest.json")
    again = curate(out.rstrip("/"))  # the cache-hit path reads the manifest back through a cut GET
    assert again["cache_hit"] and proxy.stats.faults["truncate"] == 1
    check_dataset(seaweed_s3, bucket, "ds/", again)
    record(faults=injected | {"truncate": 1}, requests=proxy.stats.requests, curate_s=elapsed,
           data_lost="none (manifest, counts and shard sha256 checked)")


def test_persistent_fault_fails_clearly_and_resumes(s3_env, seaweed_s3, proxy, prefect_harness, monkeypatch, record):
    """Every PUT of one shard fails with 503: the task gives up after its retries with a message
    naming the object and the status; no manifest is written; the next run (fault gone) writes only
    what is missing. Prefect's retry delays are shortened here (production: 2, 4, 8 s + jitter)."""
    import flows.curate as fc

    monkeypatch.setattr(fc, "write_shard_task", fc.write_shard_task.with_options(retry_delay_seconds=[0.2, 0.2, 0.2]))
    bucket = s3_env
    proxy.add("status", count=None, status=503, method="PUT", path_contains="shard-000002.tar")
    out = f"s3://{bucket}/ds"
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        curate(out)
    failed_s = time.monotonic() - started
    message = str(info.value)
    assert "shard-000002.tar" in message and "503" in message and "ServiceUnavailable" in message, message
    attempts = proxy.stats.faults["status"]
    assert attempts >= 4 * 5, f"{attempts} PUTs: expected 4 task attempts x 5 botocore attempts"
    left = direct_objects(seaweed_s3, bucket, "ds/")
    assert "ds/manifest.json" not in left and "ds/shards/shard-000002.tar" not in left
    done_before = sorted(k for k in left if k.endswith(".json") and "/shards/" in k)
    assert done_before and "ds/shards/shard-000002.json" not in done_before

    proxy.clear()
    proxy.stats.log.clear()
    started = time.monotonic()
    manifest = curate(out)
    resume_s = time.monotonic() - started
    assert not manifest["cache_hit"]
    check_dataset(seaweed_s3, bucket, "ds/", manifest)
    rewritten = sorted({path.split("?")[0].rsplit("/", 1)[1] for method, path, _ in proxy.stats.log if method == "PUT"})
    assert [r for r in rewritten if r.endswith(".tar")] == ["shard-000002.tar"], rewritten
    assert not {Path(k).name for k in done_before} & set(rewritten), rewritten  # finished shards left alone
    record(fault="persistent 503 on one shard's PUT", error=message[:200], put_attempts=attempts, failed_after_s=failed_s,
           resume_s=resume_s, shards_rewritten=[r for r in rewritten if r.endswith(".tar")])

