"""Shards corrupted after they were written (flipped bytes, a truncated tar): the readers skip and
count the bad samples, the next stage carries on with the rest, and the counts reach MLflow.

1. curated shards damaged -> teacher caching (streaming reader) skips them: cache manifest and the
   cache run's metrics carry ``bad_samples`` / ``bad_shards``;
2. cached shards damaged -> pretraining (``load_cache_folder``) skips them and trains on the rest:
   the pretrain run's metrics carry ``data/bad_samples`` / ``data/bad_shards``."""
from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def samples_of(path: Path) -> list[list[tarfile.TarInfo]]:
    """Members of a shard grouped by sample key, in order."""
    groups: list[list[tarfile.TarInfo]] = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key = info.name.split(".", 1)[0]
            if not groups or groups[-1][0].name.split(".", 1)[0] != key:
                groups.append([])
            groups[-1].append(info)
    return groups


def flip_member(path: Path, sample: int, suffix: str, count: int = 8) -> str:
    """Invert the first ``count`` bytes of the data of the member ending in ``suffix`` of sample #``sample``."""
    info = next(m for m in samples_of(path)[sample] if m.name.endswith(suffix))
    data = bytearray(path.read_bytes())
    for i in range(info.offset_data, info.offset_data + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.name


def truncate_inside(path: Path, sample: int) -> int:
    """Cut the tar a few bytes into the data of sample #``sample``'s first member; returns the new size."""
    cut = samples_of(path)[sample][0].offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    return cut


def test_corrupt_shards_are_skipped_counted_and_reported(tmp_path, monkeypatch, tiny_bundle, prefect_harness,
                                                         mlflow_server, record):
    from flows.cache import CacheParams, cache_teacher_flow
    from flows.pretrain import PretrainParams, pretrain_flow
    from tests.reliability.datasets import curate

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    ds = tmp_path / "ds"
    dataset = curate(f"file://{ds}", count=12, per_shard=4)
    assert [s["samples"] for s in dataset["shards"]] == [4, 4, 4]

    # 1. curated shards: bytes flipped in one image, one tar cut inside its third sample
    flipped = flip_member(ds / "shards" / "shard-000001.tar", 1, ".png")
    truncate_inside(ds / "shards" / "shard-000002.tar", 2)
    started = time.monotonic()
    cache = cache_teacher_flow(CacheParams(dataset_uri=f"file://{ds}", bundle_uri=f"file://{tiny_bundle}",
                                           overrides=["targets_per_sample=1"]))
    cache_s = time.monotonic() - started
    assert cache["samples"] == 9, f"{flipped} and the 2 samples after the cut should be the only losses"
    assert (cache["bad_samples"], cache["bad_shards"]) == (3, 1)
    assert cache["samples"] + cache["bad_samples"] == dataset["counts"]["kept"]  # counts balance
    metrics = client.get_run(cache["mlflow_run_id"]).data.metrics
    assert (metrics["bad_samples"], metrics["bad_shards"], metrics["samples"]) == (3, 1, 9)

    # 2. cached shards: an .npy header garbled in one sample, another shard cut inside its second sample
    folder = Path(cache["uri"][len("file://"):])
    flip_member(folder / "shards" / "shard-000000.tar", 1, "latent.npy")
    truncate_inside(folder / "shards" / "shard-000002.tar", 1)
    started = time.monotonic()
    result = pretrain_flow(PretrainParams(cache_uri=cache["uri"], preset="toy-smoke",
                                          overrides=["unet.context_dim=32", "unet.pooled_dim=32"],
                                          pretrain=["steps=2", "batch_size=4", "checkpoint_every=0", "log_every=1",
                                                    "accelerator=cpu", "kd.feature_kd=false"]))
    train_s = time.monotonic() - started
    assert result["step"] == 2
    assert result["data_skipped"] == {"bad_samples": 2, "bad_shards": 1}
    metrics = client.get_run(result["mlflow_run_id"]).data.metrics
    assert (metrics["data/bad_samples"], metrics["data/bad_shards"]) == (2, 1)
    record(curated="1 image with flipped bytes + 1 tar truncated inside sample 3 of 4",
           cache_bad_samples=3, cache_kept=9, cache_flow_s=cache_s,
           cached="1 .npy header garbled + 1 tar truncated inside sample 2 of 2",
           train_bad_samples=2, train_steps=result["step"], pretrain_flow_s=train_s)
