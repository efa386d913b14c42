"""Streaming training data from teacher-cache shards (`PretrainConfig.data = "stream"`).

At full scale the cache does not fit in memory; this module reads its shards (`shards/*.tar`, the
caching stage's format) as a stream, through an injected opener (`open_fn(name) -> binary stream`:
plain files for a local folder; the task layer passes `Storage.open_read`, so s3:// works without
this package importing a storage client).

Per rank, the stream is an endless sequence of epochs:
- each epoch the shard list (sorted names) is permuted with a seed shared by every rank
  (seed, epoch); rank r of W takes shards r::W of it, or, with fewer shards than ranks, every rank
  reads every shard and keeps the samples whose epoch-wide index is r mod W. Ranks therefore read
  disjoint shards (or samples), and, the stream being endless, every rank yields the same number
  of batches (one per step), so DDP never waits on a rank that ran out of data;
- samples pass a shuffle buffer of `shuffle_buffer` samples: sample n out of the buffer is slot
  hash(seed, rank, n) mod size, refilled from the reader at once;
- batches come from one bucket (latent shape: aspect ratio / resolution) at a time: samples out of
  the buffer collect per bucket, and a bucket that has a batch's worth is yielded. A stage of the
  progressive schedule (`training/stages.py`) streams its own cache from its start, keeping the
  buckets its resolution selects;
- corrupt data is skipped and counted by the in-memory loader's rules (`data.decode_members`): an
  undecodable or non-finite member, a layout (member names, shapes, dtypes) other than the cache's
  (the majority of a probe of the first samples in sorted shard order, the same on every rank), a
  damaged tar (`bad_shards`; its remaining samples are lost) and samples the manifest promised but
  the shard lacks (`bad_samples`). Counting happens in epoch 0 only (each shard or sample is then
  read by exactly one rank), so the totals summed over ranks equal `load_cache_folder`'s once the
  first epoch has been read.

The data position is exact and small: the stage, (epoch, shard position, samples read in that
shard, epoch sample counter, samples emitted, counters) plus the buffer and the per-bucket partial
batches as references (shard index, sample index in the shard), never the tensors. A batch carries the position after it was drawn; the training
module checkpoints the position of the last batch it consumed (prefetched batches do not count), and
a resumed stream re-reads the referenced samples and continues exactly where the run stopped: an
interrupted run reaches bitwise the weights of an uninterrupted one on CPU, as the in-memory path.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import posixpath
from pathlib import Path
from typing import Any, BinaryIO, Callable, Generator, Iterator, NamedTuple, Sequence

import numpy as np
from torch.utils.data import IterableDataset

from snapgen_model.data.sources import iter_tar_groups
from snapgen_model.training.data import (
    TAR_ERRORS,
    CachedData,
    StagePlan,
    decode_members,
    layout_and_bucket,
    manifest_counts,
    stage_at,
)

log = logging.getLogger(__name__)

Ref = tuple[int, int]  # (shard index in ShardSource.names, sample index in that shard's tar)
Groups = Generator[tuple[str, dict[str, bytes]], None, None]


class Item(NamedTuple):
    ref: Ref
    key: str
    bucket: tuple
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass
class ShardSource:
    """The cached shards to stream: names in canonical (sorted) order, the opener, and the sample
    count per shard the cache manifest promised (by tar file name; empty when there is no manifest)."""

    names: list[str]
    open_fn: Callable[[str], BinaryIO]
    expected: dict[str, int] = dataclasses.field(default_factory=dict)
    where: str = ""

    def __post_init__(self) -> None:
        self.names = sorted(self.names)
        if not self.names:
            raise ValueError(f"{self.where or 'cache'}: no cached shards (shards/*.tar) to stream")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ShardSource":
        """A local cache folder (`shards/*.tar`, optional `manifest.json`), read with plain files."""
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else None
        names = [p.relative_to(folder).as_posix() for p in folder.joinpath("shards").glob("*.tar")]
        return cls(names, _FolderOpener(folder), manifest_counts(manifest), str(folder))

    def open(self, index: int) -> BinaryIO:
        return self.open_fn(self.names[index])

    def expected_samples(self, index: int) -> int | None:
        return self.expected.get(posixpath.basename(self.names[index]))


class _FolderOpener:
    """open_fn of a local folder (a class, not a lambda: DataLoader workers may pickle it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, name: str) -> BinaryIO:
        return open(self.folder / name, "rb")


def _read_groups(source: ShardSource, index: int) -> Groups:
    with contextlib.closing(source.open(index)) as f:
        yield from iter_tar_groups(f)


def probe_layout(source: ShardSource, encoders: list[str], limit: int = 32) -> tuple[tuple, CachedData]:
    """(the cache's layout, a one-sample CachedData of it): the majority layout of the first
    `limit` decodable samples in sorted shard order (deterministic, the same on every rank)."""
    counts: collections.Counter = collections.Counter()
    first: dict[tuple, tuple[str, dict[str, np.ndarray]]] = {}
    for index in range(len(source.names)):
        try:
            for key, members in _read_groups(source, index):
                decoded = decode_members(members)
                split = None if decoded is None else layout_and_bucket(decoded[0])
                if decoded is not None and split is not None:
                    counts[split[0]] += 1
                    first.setdefault(split[0], (key, decoded[1]))
                if sum(counts.values()) >= limit:
                    break
        except TAR_ERRORS:
            pass
        if sum(counts.values()) >= limit:
            break
    if not counts:
        raise ValueError(f"{source.where or 'cache'}: no readable cached samples in {len(source.names)} shards")
    layout = counts.most_common(1)[0][0]
    return layout, CachedData.from_arrays([first[layout]], encoders)


class StreamData:
    """A streamed cache as the training modules see it before the first batch: the shard source,
    the encoders, the layout and a one-sample reference (`reference`) the modules size themselves
    from. `skipped` holds the corrupt-data counters summed over ranks once training ended."""

    def __init__(self, source: ShardSource, encoders: list[str], probe: int = 32) -> None:
        self.source, self.encoders = source, list(encoders)
        self.layout, self.reference = probe_layout(source, self.encoders, probe)
        self.skipped: dict[str, int] = {"bad_samples": 0, "bad_shards": 0}

    @classmethod
    def from_folder(cls, folder: str | Path, encoders: list[str]) -> "StreamData":
        return cls(ShardSource.from_folder(folder), encoders)

    def decode(self, members: dict[str, bytes]) -> tuple[tuple, dict[str, np.ndarray]] | None:
        """(bucket, arrays) of a sample of the cache's layout; None when it is corrupt."""
        decoded = decode_members(members)
        split = None if decoded is None else layout_and_bucket(decoded[0])
        if decoded is None or split is None or split[0] != self.layout:
            return None
        return split[1], decoded[1]


def _slot(seed: int, rank: int, n: int, size: int) -> int:
    """Buffer slot of emitted sample n: a counter-based hash, so no RNG state needs saving."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % size


class SampleStream:
    """One rank's endless, shuffled stream of valid samples (see the module docstring)."""

    MAX_EMPTY_EPOCHS = 2

    def __init__(self, data: StreamData, *, seed: int, rank: int, world: int, buffer_size: int,
                 accept: Callable[[tuple], bool] | None = None, count: bool = True) -> None:
        """`accept(bucket)`: the buckets to keep (the others are passed over, not counted as bad);
        `count`: count corrupt data (off when an earlier stage streamed the same cache)."""
        self.data, self.seed, self.rank, self.world = data, seed, rank, world
        self.accept, self.count = accept, count
        self.size = max(1, buffer_size)
        self.split = "shards" if len(data.source.names) >= world else "samples"
        self.epoch = self.pos = self.group = self.counter = self.emitted = 0
        self.epoch_good, self.empty_epochs = False, 0
        self.stats = {"bad_samples": 0, "bad_shards": 0}
        self.buffer: list[Item] = []
        self._it: Groups | None = None
        self._orders: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ reading
    def order(self, epoch: int) -> list[int]:
        """This rank's shard indices for `epoch`."""
        if epoch not in self._orders:
            perm = [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.data.source.names))]
            self._orders = {epoch: perm[self.rank::self.world] if self.split == "shards" else perm}
        return self._orders[epoch]

    def _count(self, field: str, n: int = 1) -> None:
        if self.count and self.epoch == 0 and n > 0:
            self.stats[field] += n

    def _open(self) -> Groups:
        index = self.order(self.epoch)[self.pos]
        self._it = it = _read_groups(self.data.source, index)
        for _ in range(self.group):  # resuming inside a shard: these were read before
            next(it)
        return it

    def _finish_shard(self, damaged: bool) -> None:
        if self._it is not None:
            self._it.close()
        self._it = None
        index = self.order(self.epoch)[self.pos]
        expected = self.data.source.expected_samples(index)
        lost = max(0, (expected if expected is not None else self.group) - self.group)
        if self.split == "shards":
            self._count("bad_shards", int(damaged))
            self._count("bad_samples", lost)
        else:  # every rank reads the shard: each counts the damage once overall, and its own lost samples
            self._count("bad_shards", int(damaged and self.rank == 0))
            self._count("bad_samples", sum(1 for c in range(self.counter, self.counter + lost) if c % self.world == self.rank))
        self.pos, self.group = self.pos + 1, 0

    def _end_epoch(self) -> None:
        self.empty_epochs = 0 if self.epoch_good else self.empty_epochs + 1
        if self.empty_epochs > self.MAX_EMPTY_EPOCHS:
            raise RuntimeError(f"{self.data.source.where or 'cache'}: rank {self.rank} read no valid sample "
                               f"{'of the stage' + chr(39) + 's buckets ' if self.accept else ''}in {self.empty_epochs} "
                               f"epochs over its shards (bad shards {self.stats['bad_shards']}, bad samples "
                               f"{self.stats['bad_samples']})")
        self.epoch, self.pos, self.group, self.counter, self.epoch_good = self.epoch + 1, 0, 0, 0, False

    def next_input(self) -> Item:
        """The next valid (and accepted) sample this rank owns, in reading order."""
        while True:
            it = self._it
            if it is None:
                if self.pos >= len(self.order(self.epoch)):
                    self._end_epoch()
                    continue
                it = self._open()
            try:
                key, members = next(it)
            except StopIteration:
                self._finish_shard(damaged=False)
                continue
            except TAR_ERRORS:
                self._finish_shard(damaged=True)
                continue
            group, self.group = self.group, self.group + 1
            if self.split == "samples":
                counter, self.counter = self.counter, self.counter + 1
                if counter % self.world != self.rank:
                    continue
            decoded = self.data.decode(members)
            if decoded is None:
                self._count("bad_samples")
                continue
            if self.accept is not None and not self.accept(decoded[0]):
                continue
            self.epoch_good = True
            return Item((self.order(self.epoch)[self.pos], group), key, *decoded)

    def next_sample(self) -> Item:
        """The next sample out of the shuffle buffer."""
        while len(self.buffer) < self.size:
            self.buffer.append(self.next_input())
        j = _slot(self.seed, self.rank, self.emitted, self.size)
        out, self.buffer[j] = self.buffer[j], self.next_input()
        self.emitted += 1
        return out

    # ------------------------------------------------------------------ position
    def snapshot(self) -> dict[str, Any]:
        """The exact position (JSON-able; the buffer by reference)."""
        return {"epoch": self.epoch, "pos": self.pos, "group": self.group, "counter": self.counter,
                "emitted": self.emitted, "epoch_good": self.epoch_good, "empty_epochs": self.empty_epochs,
                "split": self.split, "stats": dict(self.stats), "buffer": [list(item.ref) for item in self.buffer]}

    def restore(self, pos: dict[str, Any]) -> None:
        """Continue from `snapshot()`'s position: the buffered samples are re-read from their shards."""
        if pos.get("split", self.split) != self.split:  # (a position rebuilt for a new world size has none)
            raise ValueError("stream position: saved with another shard split (world size changed)")
        for name in ("epoch", "pos", "group", "counter", "emitted", "epoch_good", "empty_epochs"):
            setattr(self, name, type(getattr(self, name))(pos[name]))
        self.stats = {k: int(v) for k, v in pos["stats"].items()}
        self.buffer = self.read_refs([tuple(r) for r in pos["buffer"]])
        self._it = None

    def read_refs(self, refs: list[Ref]) -> list[Item]:
        """The samples at `refs` (in that order), read again from their shards."""
        wanted: dict[int, set[int]] = collections.defaultdict(set)
        for shard, group in refs:
            wanted[shard].add(group)
        found: dict[Ref, Item] = {}
        for shard, groups in wanted.items():
            last = max(groups)
            for group, (key, members) in enumerate(_read_groups(self.data.source, shard)):
                if group in groups:
                    decoded = self.data.decode(members)
                    if decoded is None:
                        raise ValueError(f"stream position: sample {group} of {self.data.source.names[shard]} "
                                         "no longer reads as it did (the cache changed since the checkpoint)")
                    found[(shard, group)] = Item((shard, group), key, *decoded)
                if group >= last:
                    break
        missing = [r for r in refs if r not in found]
        if missing:
            raise ValueError(f"stream position: samples {missing[:3]} are gone from the cache (it changed since "
                             "the checkpoint)")
        return [found[r] for r in refs]


def _identity(x: Any) -> Any:
    return x


class StreamBatches(IterableDataset):
    """Yields this rank's batch for steps start, start+1, ... (exactly `steps` of them) as
    {"step", "stage", "data": CachedData of batch // world samples of one bucket, "position": the
    stream position after it}. `plan`/`sources`/`filters`: the stages (default: one stage of `batch`
    over `data`); each stage streams its source from its start with seed (seed, stage)."""

    def __init__(self, data: StreamData, *, batch: int, seed: int, start: int, steps: int, rank: int = 0,
                 world: int = 1, buffer_size: int = 256, position: dict[str, Any] | None = None,
                 plan: list[StagePlan] | None = None, sources: dict[str, StreamData] | None = None,
                 filters: Sequence[Callable[[tuple], bool] | None] | None = None) -> None:
        self.plan = plan or [StagePlan(index=0, start=0, end=start + steps, batch=batch)]
        for stage in self.plan:
            if stage.batch % world:
                raise ValueError(f"stage {stage.index}: batch_size {stage.batch} is not divisible by the world size {world}")
        self.sources = sources or {"": data}
        self.filters = filters or [None] * len(self.plan)
        self.data, self.seed, self.start, self.steps = data, seed, start, steps
        self.rank, self.world, self.buffer_size, self.position = rank, world, buffer_size, position

    def _stream(self, stage: StagePlan) -> SampleStream:
        first = min(s.index for s in self.plan if s.cache == stage.cache)
        return SampleStream(self.sources[stage.cache], seed=self.seed + stage.seed_offset, rank=self.rank,
                            world=self.world, buffer_size=self.buffer_size, accept=self.filters[stage.index],
                            count=stage.index == first)

    def stream(self) -> SampleStream:
        """The stream of the first stage, at the saved position (tests and benchmarks)."""
        s = self._stream(stage_at(self.plan, self.start))
        if self.position:
            s.restore(self.position["stream"])
        return s

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pos = self.position
        current, stream = None, None
        partial: dict[tuple, list[Item]] = {}
        done = dict(pos["done"]) if pos else {"bad_samples": 0, "bad_shards": 0}
        for step in range(self.start, self.start + self.steps):
            stage = stage_at(self.plan, step)
            if stage is not current:
                if stream is not None:
                    done = {k: done[k] + stream.stats[k] for k in done}
                stream, partial = self._stream(stage), {}
                if pos and current is None and pos["stage"] == stage.index:  # resuming inside this stage
                    stream.restore(pos["stream"])
                    partial = {tuple(b): stream.read_refs([tuple(r) for r in refs]) for b, refs in pos["partial"]}
                elif pos and current is None:  # resuming at a stage boundary: the saved stage is complete
                    done = {k: done[k] + int(pos["stream"]["stats"][k]) for k in done}
                current = stage
            if stream is None:
                raise RuntimeError("stream: no stage stream opened before the first batch")
            local = stage.batch // self.world
            while True:
                item = stream.next_sample()
                rows = partial.setdefault(item.bucket, [])
                rows.append(item)
                if len(rows) == local:
                    del partial[item.bucket]
                    break
            data = CachedData.from_arrays([(r.key, r.arrays) for r in rows], self.sources[stage.cache].encoders)
            snap = stream.snapshot()
            position = {"stage": stage.index, "stream": snap, "done": done,
                        "partial": [[list(b), [list(r.ref) for r in items]] for b, items in partial.items()],
                        "stats": {k: done[k] + snap["stats"][k] for k in done}}
            yield {"step": step, "stage": stage.index, "data": data, "position": position}

    def __len__(self) -> int:
        return self.steps

    def loader(self, workers: int = 0):
        """A DataLoader over this stream: 0 workers (in process) or 1 (a background reader process;
        more would split the stream and change its order)."""
        import torch

        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=workers, collate_fn=_identity,
                                           prefetch_factor=2 if workers else None)
