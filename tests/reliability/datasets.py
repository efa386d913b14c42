"""Helpers shared by the S3 reliability tests: read objects straight from SeaweedFS (bypassing
the code under test and any proxy) and check a curated dataset against its manifest."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any


def direct_objects(seaweed_s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``, read straight from SeaweedFS."""
    client = seaweed_s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def tar_keys(data: bytes) -> list[str]:
    """WebDataset sample keys in a shard (raises on a corrupt or truncated tar)."""
    keys: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def check_shards(objects: dict[str, bytes], prefix: str, shards: list[dict[str, Any]]) -> None:
    """Each listed shard exists, has the recorded size, sha256 and sample count, and no unlisted
    shard exists: no partial object passes for a finished one."""
    for shard in shards:
        data = objects[prefix + shard["name"]]
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]
        assert len(tar_keys(data)) == shard["samples"], shard["name"]
    assert sum(k.endswith(".tar") and k.startswith(prefix + "shards/") for k in objects) == len(shards)


def check_dataset(seaweed_s3: Any, bucket: str, prefix: str, manifest: dict[str, Any]) -> None:
    """A curated dataset: manifest as returned, counts balanced, quarantine complete, shards intact."""
    objects = direct_objects(seaweed_s3, bucket, prefix)
    stored = json.loads(objects[f"{prefix}manifest.json"])
    assert stored == {k: v for k, v in manifest.items() if k not in ("cache_hit", "mlflow_run_id")}
    counts = manifest["counts"]
    assert counts["input"] == counts["kept"] + counts["quarantined"]
    assert sum(s["samples"] for s in manifest["shards"]) == counts["kept"]
    assert len(objects[f"{prefix}quarantine.jsonl"].decode().splitlines()) == counts["quarantined"]
    check_shards(objects, prefix, manifest["shards"])


def curate(out: str, count: int = 30, per_shard: int = 5, **kw: Any) -> dict[str, Any]:
    """The curation flow over the shapes world (32 px)."""
    from flows.curate import CurateParams, curate_flow

    return curate_flow(CurateParams(sources=[{"kind": "shapes", "count": count, "resolution": 32, "name": "shapes"}],
                                    out=out, overrides=[f"samples_per_shard={per_shard}", "chunk_size=10"],
                                    track=kw.pop("track", False), **kw))
