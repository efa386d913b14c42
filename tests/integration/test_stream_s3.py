"""Streamed training data read from S3 (SeaweedFS) through the task layer's opener
(`tasks.pretrain.stream_source` -> `Storage.open_read`): nothing downloaded, the same samples, the
same corrupt-data counts and bitwise the same weights as streaming the local folder."""
from __future__ import annotations

import pytest
import torch

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.pretrain import PretrainConfig, fit
from snapgen_model.training.stream import StreamData
from tests.unit.test_stream_data import corrupt_cache

pytestmark = pytest.mark.integration


def test_stream_from_s3_equals_stream_from_folder(tmp_path, s3_settings):
    from tasks.pretrain import stream_source
    from tasks.storage import Storage

    torch.set_num_threads(1)
    folder = corrupt_cache(tmp_path / "cache")
    store = Storage.from_settings(s3_settings)
    uri = store.join(s3_settings.storage_root, "cache")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.upload_file(path, store.join(uri, path.relative_to(folder).as_posix()))
    source = stream_source(uri, store)
    assert source.names == ["shards/shard-000000.tar", "shards/shard-000001.tar", "shards/shard-000002.tar",
                            "shards/shard-000003.tar"] and source.expected["shard-000003.tar"] == 5
    cfg = PretrainConfig.from_dict({"steps": 3, "batch_size": 4, "checkpoint_every": 0, "accelerator": "cpu",
                                    "data": "stream", "shuffle_buffer": 3, "kd": {"feature_kd": False}})
    preset, cache_cfg = get_preset("toy-smoke"), CacheConfig(targets_per_sample=2)
    s3 = fit(preset, cfg, StreamData(source, ["clip"]), cache_cfg, tmp_path / "s3")
    local = fit(preset, cfg, StreamData.from_folder(folder, ["clip"]), cache_cfg, tmp_path / "local")
    assert s3["data_skipped"] == local["data_skipped"] == {"bad_samples": 6, "bad_shards": 1}
    a, b = s3["module"].student.state_dict(), local["module"].student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "home" / "cache").exists()  # streamed, not downloaded
