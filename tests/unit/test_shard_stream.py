"""ShardStream: seeded shard order, explicit rank split, equal per-rank lengths, corrupt data skipped."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from snapgen_model.data.wds_io import ShardStream, write_shard


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i % 255, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(root: Path, sizes: list[int]) -> list[str]:
    paths, n = [], 0
    for s, size in enumerate(sizes):
        path = root / f"shard-{s:03d}.tar"
        write_shard(({"__key__": f"k{n + i:05d}", "png": _png(n + i), "txt": f"caption {n + i}"} for i in range(size)),
                    path)
        n += size
        paths.append(str(path))
    return paths


def open_local(uri: str):
    return open(uri, "rb")


def test_shard_order_is_shared_by_ranks_and_disjoint(tmp_path):
    shards = make_shards(tmp_path, [2] * 6)
    a = ShardStream(shards, open_local, seed=3, resampled=False, rank=0, world_size=2)
    b = ShardStream(shards, open_local, seed=3, resampled=False, rank=1, world_size=2)
    oa, ob = a.shard_order(0, 2), b.shard_order(1, 2)
    assert set(oa).isdisjoint(ob) and set(oa) | set(ob) == set(shards)
    a.set_epoch(1)
    assert a.shard_order(0, 2) != oa or a.shard_order(1, 2) != ob  # reshuffled per epoch


def test_resampled_epoch_length_is_exact(tmp_path):
    shards = make_shards(tmp_path, [5, 1, 3])
    for rank in range(2):
        ds = ShardStream(shards, open_local, seed=0, epoch_length=11, rank=rank, world_size=2)
        samples = list(ds)
        assert len(samples) == 11
        assert samples[0]["image"].shape == (8, 8, 3) and samples[0]["caption"].startswith("caption")


def test_corrupt_shard_is_skipped_and_counted(tmp_path):
    shards = make_shards(tmp_path, [4, 4])
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2 + 100])  # truncated tar
    ds = ShardStream(shards, open_local, seed=0, resampled=False, rank=0, world_size=1, require=("txt",),
                     expected_counts={shards[0]: 4, shards[1]: 4})
    got = list(ds)
    assert 4 <= len(got) < 8
    assert ds.stats["bad_samples"] == 1  # the half-written sample at the cut
    assert ds.stats["bad_samples"] + ds.stats["missing_samples"] == 8 - len(got)


def test_flipped_bytes_in_an_image_are_skipped(tmp_path):
    shards = make_shards(tmp_path, [4])
    data = bytearray(Path(shards[0]).read_bytes())
    start = data.find(b"IDAT")  # corrupt the first PNG's compressed data
    data[start + 4:start + 20] = bytes(16)
    Path(shards[0]).write_bytes(bytes(data))
    ds = ShardStream(shards, open_local, seed=0, resampled=False, rank=0, world_size=1)
    got = list(ds)
    assert len(got) == 3 and ds.stats["bad_samples"] == 1


def _rank_main(rank: int, world: int, shards: list[str], port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ds = ShardStream(shards, open_local, seed=1, epoch_length=9)  # rank/world from torch.distributed
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=lambda b: len(b), num_workers=0)
    batches = 0
    for _ in loader:
        t = torch.ones(1)
        dist.all_reduce(t)  # would hang if one rank had fewer batches
        batches += 1
    Path(out, f"rank{rank}").write_text(str(batches))
    dist.destroy_process_group()


def test_two_process_ddp_reading_gives_equal_batches(tmp_path):
    from tests.fixtures.mlflow_server import free_port

    shards = make_shards(tmp_path, [7, 2, 3])  # uneven shards: 2 ranks must still see equal batch counts
    mp.start_processes(_rank_main, args=(2, shards, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    counts = [int((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert counts == [3, 3]
