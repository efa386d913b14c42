"""WebDataset shards: writing one shard locally, and a streaming reader for (multi-rank) training.

The reader streams tars through an injected `open_fn(uri) -> binary stream` (the storage layer's
persistent boto3 client for s3://, plain files for file://), not `pipe:` subprocesses. Each epoch
the shard list is shuffled with a seed shared by all ranks, then split explicitly over
(rank, worker) slots; with `resampled=True` and a fixed `epoch_length`, every rank yields exactly
the same number of samples, so DDP never waits on a rank that ran out of data. Corrupt members and
truncated tars are skipped and counted in `stats`, never fatal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from snapgen_model.data.sources import iter_tar_groups


@dataclasses.dataclass
class ShardInfo:
    samples: int
    bytes: int
    sha256: str


def write_shard(samples: Iterable[dict[str, Any]], path: str | os.PathLike) -> ShardInfo:
    """Write samples ({"__key__": k, ext: bytes|str|dict}) as one tar with webdataset's TarWriter."""
    import webdataset as wds

    n = 0
    with open(path, "wb") as f:
        writer = wds.TarWriter(f)
        for sample in samples:
            writer.write(sample)
            n += 1
        writer.close()
    data_hash, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            data_hash.update(block)
            size += len(block)
    return ShardInfo(samples=n, bytes=size, sha256=data_hash.hexdigest())


def decode_sample(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    """Default decoder: RGB uint8 image (H, W, 3), caption, label and JSON metadata when present."""
    image_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in members), None)
    if image_ext is None:
        raise ValueError(f"sample {key}: no image member in {sorted(members)}")
    with Image.open(io.BytesIO(members[image_ext])) as im:
        image = np.asarray(im.convert("RGB"))
    out: dict[str, Any] = {"__key__": key, "image": image}
    if "txt" in members:
        out["caption"] = members["txt"].decode("utf-8")
    if "cls" in members:
        out["label"] = int(members["cls"].decode())
    if "json" in members:
        out["json"] = json.loads(members["json"])
    return out


class ShardStream(IterableDataset):
    """Streaming, seeded, explicitly split WebDataset reader (see module docstring)."""

    def __init__(self, shards: list[str], open_fn: Callable[[str], BinaryIO], *, seed: int = 0,
                 resampled: bool = True, epoch_length: int | None = None, rank: int | None = None,
                 world_size: int | None = None, decode: Callable[[str, dict[str, bytes]], Any] = decode_sample,
                 require: tuple[str, ...] = (), expected_counts: dict[str, int] | None = None,
                 fatal: tuple[type[BaseException], ...] = ()) -> None:
        if not shards:
            raise ValueError("ShardStream: empty shard list")
        if resampled and not epoch_length:
            raise ValueError("ShardStream: resampled=True needs epoch_length (samples per rank per epoch)")
        self.shards, self.open_fn, self.seed = list(shards), open_fn, seed
        self.resampled, self.epoch_length = resampled, epoch_length
        self.rank, self.world_size = rank, world_size
        self.decode, self.require = decode, require
        self.expected = expected_counts or {}  # samples per shard from the manifest: detects lost tails
        self.fatal = tuple(fatal)  # errors that are not corrupt data (e.g. storage outages): raised, not counted
        self.epoch = 0
        self.stats = {"samples": 0, "bad_samples": 0, "bad_shards": 0, "missing_samples": 0}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slot(self) -> tuple[int, int, int]:
        """(slot, slots, workers): this (rank, worker) pair's index among all of them."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        return rank * workers + wid, world * workers, workers

    def shard_order(self, slot: int, slots: int, cycle: int = 0) -> list[str]:
        """This slot's shards for the epoch: a shared-seed permutation split by slot, or (resampled,
        fewer shards than slots) a per-slot seeded draw."""
        rng = np.random.default_rng([self.seed, self.epoch, cycle])
        perm = [self.shards[i] for i in rng.permutation(len(self.shards))]
        mine = perm[slot::slots]
        if not mine and self.resampled:
            own = np.random.default_rng([self.seed, self.epoch, cycle, slot])
            mine = [self.shards[int(own.integers(len(self.shards)))]]
        return mine

    def _samples(self, shard: str) -> Iterator[Any]:
        seen = 0
        try:
            for key, members in iter_tar_groups(self.open_fn(shard)):
                seen += 1
                if any(m not in members for m in self.require):
                    self.stats["bad_samples"] += 1  # incomplete sample (e.g. a truncated tail)
                    continue
                try:
                    sample = self.decode(key, members)
                except Exception:  # corrupt member: skip and count
                    self.stats["bad_samples"] += 1
                    continue
                yield sample
        except self.fatal:
            raise
        except (tarfile.TarError, OSError, EOFError):
            self.stats["bad_shards"] += 1
        if shard in self.expected and seen < self.expected[shard]:
            self.stats["missing_samples"] += self.expected[shard] - seen

    def __iter__(self) -> Iterator[Any]:
        slot, slots, workers = self._slot()
        limit = None
        if self.resampled:
            if self.epoch_length is None:
                raise RuntimeError("ShardStream: resampled=True without epoch_length (refused by __init__)")
            limit = self.epoch_length // workers + (1 if slot % workers < self.epoch_length % workers else 0)
        produced, cycle, empty_cycles = 0, 0, 0
        while True:
            got_any = False
            for shard in self.shard_order(slot, slots, cycle):
                for sample in self._samples(shard):
                    got_any = True
                    self.stats["samples"] += 1
                    yield sample
                    produced += 1
                    if limit is not None and produced >= limit:
                        return
            cycle += 1
            if not self.resampled:
                return
            empty_cycles = 0 if got_any else empty_cycles + 1
            if empty_cycles > 2 * len(self.shards) + 2:
                raise RuntimeError(f"ShardStream: no readable samples in {len(self.shards)} shards "
                                   f"(bad shards: {self.stats['bad_shards']}, bad samples: {self.stats['bad_samples']})")
