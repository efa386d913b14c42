"""Training data from the teacher cache: an in-memory tensor set and a step-indexed batch stream.

The data position is the optimiser step: batch s is a pure function of (seed, s), drawn from
seeded epoch permutations, and rank r of a world of W takes rows r::W of the global batch. So a
run resumed at step s reads exactly the batches an uninterrupted run reads, on any world size.
This module covers cache sizes that fit in memory (`PretrainConfig.data = "memory"`, the toy
world's default); `snapgen_model.training.stream` streams the same shards with a shuffle buffer
and a saved data position (`data = "stream"`). Both read samples through `decode_members` and
skip and count corrupt data by the same rules.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from snapgen_model.distill.cache import load_npy

# errors of a damaged tar (garbled header, truncated stream): the shard's remaining samples are lost
TAR_ERRORS: tuple[type[BaseException], ...]


def _tar_errors() -> tuple[type[BaseException], ...]:
    import tarfile
    import zlib

    return (tarfile.TarError, EOFError, zlib.error)


TAR_ERRORS = _tar_errors()


def decode_members(members: dict[str, bytes]) -> tuple[tuple, dict[str, np.ndarray]] | None:
    """(signature, arrays) of a cached sample: every `.npy` member decoded, the signature being the
    (name, shape, dtype) of each; None when a member is undecodable or non-finite (a corrupt sample)."""
    sig, arrays = [], {}
    for name in sorted(members):
        if not name.endswith(".npy"):
            continue
        try:
            arr = load_npy(members[name])
        except Exception:  # noqa: BLE001 - any decoding failure means a corrupt member
            return None
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return None
        sig.append((name, arr.shape, arr.dtype.str))
        arrays[name] = arr
    return tuple(sig), arrays


def _is_target(name: str) -> bool:
    return name[:1] in ("v", "f") and name[1:].split(".", 1)[0].isdigit()


def layout_and_bucket(signature: tuple) -> tuple[tuple, tuple] | None:
    """Split a sample's signature into its layout (member names, dtypes, and the shapes that do not
    depend on the image size) and its bucket (latent h, w, then the token count of each teacher
    feature): samples of one cache share the layout; each aspect ratio / resolution is a bucket.
    None when the spatial members disagree (a velocity target not shaped like the latent, or one
    feature with different token counts across pairs): a corrupt sample."""
    shapes = {name: shape for name, shape, _ in signature}
    latent = shapes.get("latent.npy")
    if latent is None or len(latent) != 3:
        return signature, ()
    layout: list[tuple] = []
    tokens: dict[str, int] = {}
    for name, shape, dtype in signature:
        if name == "latent.npy" or (name[:1] == "v" and _is_target(name)):
            if shape != latent:
                return None
            layout.append((name, shape[:1], dtype))
        elif name[:1] == "f" and _is_target(name) and len(shape) == 2:
            feature = name.split(".", 1)[1]
            if tokens.setdefault(feature, shape[0]) != shape[0]:
                return None
            layout.append((name, shape[1:], dtype))
        else:
            layout.append((name, shape, dtype))
    return tuple(layout), tuple(latent[1:]) + tuple(tokens[f] for f in sorted(tokens))


def bucket_name(bucket: tuple) -> str:
    """'16x8' (latent h x w), with '/t64' per teacher feature token count."""
    return "x".join(map(str, bucket[:2])) + "".join(f"/t{t}" for t in bucket[2:])


def _signature(members: dict[str, bytes]) -> tuple | None:
    """(name, shape, dtype) of every .npy member, or None when one is undecodable or non-finite."""
    decoded = decode_members(members)
    return None if decoded is None else decoded[0]


def manifest_counts(manifest: dict[str, Any] | None) -> dict[str, int]:
    """Samples per shard (by tar file name) promised by a cache manifest: detects lost tails."""
    import posixpath

    if not manifest:
        return {}
    return {posixpath.basename(s["name"]): int(s["samples"]) for s in manifest.get("shards", []) if "samples" in s}


@dataclasses.dataclass
class CachedData:
    keys: list[str]
    latent: torch.Tensor  # (N, C, h, w)
    tokens: dict[str, torch.Tensor]  # encoder -> (N, L, D)
    pooled: dict[str, torch.Tensor]  # encoder -> (N, P) (CLIP-like encoders only)
    mask: dict[str, torch.Tensor]  # encoder -> (N, L)
    t: torch.Tensor | None  # (N, K) pre-drawn timesteps of the cached targets
    v: torch.Tensor | None  # (N, K, C, h, w) teacher velocity targets
    features: dict[str, torch.Tensor]  # teacher feature name -> (N, K, T, D)
    labels: torch.Tensor | None = None  # (N,) int64 class labels (class-conditional caches)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # corrupt data left out (load_cache_folder)

    @property
    def targets(self) -> int:
        return 0 if self.t is None else self.t.shape[1]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_members(cls, samples: list[tuple[str, dict[str, bytes]]], encoders: list[str]) -> "CachedData":
        """Build from (key, members) of cached shards (tasks read them from storage)."""
        if not samples:
            raise ValueError("CachedData: no cached samples")
        return cls.from_arrays([(key, {n: load_npy(b) for n, b in m.items() if n.endswith(".npy")})
                                for key, m in samples], encoders)

    @classmethod
    def from_arrays(cls, samples: list[tuple[str, dict[str, np.ndarray]]], encoders: list[str]) -> "CachedData":
        """Build from (key, {member name: array}) of decoded cached samples (all of one layout)."""
        if not samples:
            raise ValueError("CachedData: no cached samples")
        arr = lambda name: torch.from_numpy(np.stack([m[name] for _, m in samples]).astype(np.float32))  # noqa: E731
        first = samples[0][1]
        k = sum(1 for n in first if n.startswith("v") and n[1:].split(".")[0].isdigit())
        feats = sorted({n.split(".", 1)[1][:-4] for n in first if n.startswith("f0.")})
        return cls(
            keys=[key for key, _ in samples], latent=arr("latent.npy"),
            tokens={e: arr(f"{e}.tokens.npy") for e in encoders},
            pooled={e: arr(f"{e}.pooled.npy") for e in encoders if f"{e}.pooled.npy" in first},
            mask={e: arr(f"{e}.mask.npy") for e in encoders},
            t=torch.stack([arr(f"t{i}.npy")[:, 0] for i in range(k)], 1) if k else None,
            v=torch.stack([arr(f"v{i}.npy") for i in range(k)], 1) if k else None,
            features={f: torch.stack([arr(f"f{i}.{f}.npy") for i in range(k)], 1) for f in feats} if k else {},
            labels=(torch.from_numpy(np.stack([m["label.npy"] for _, m in samples]).astype(np.int64)).reshape(-1)
                    if "label.npy" in first else None),
        )

    def select(self, idx: torch.Tensor) -> "CachedData":
        """The rows `idx` (a batch), as a CachedData of their own."""
        ix = idx.tolist()
        return CachedData(keys=[self.keys[i] for i in ix], latent=self.latent[idx],
                          tokens={e: x[idx] for e, x in self.tokens.items()},
                          pooled={e: x[idx] for e, x in self.pooled.items()},
                          mask={e: x[idx] for e, x in self.mask.items()},
                          t=None if self.t is None else self.t[idx], v=None if self.v is None else self.v[idx],
                          features={f: x[idx] for f, x in self.features.items()},
                          labels=None if self.labels is None else self.labels[idx])


@dataclasses.dataclass
class BucketedData:
    """A cache holding several latent shapes (aspect-ratio / resolution buckets): one CachedData per
    bucket, in sorted bucket order. Batches are drawn from one bucket at a time."""

    buckets: dict[tuple, CachedData]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.buckets = dict(sorted(self.buckets.items()))

    @property
    def bucket_keys(self) -> list[tuple]:
        return list(self.buckets)

    @property
    def reference(self) -> CachedData:
        return next(iter(self.buckets.values()))

    def __len__(self) -> int:
        return sum(len(d) for d in self.buckets.values())


def as_buckets(data: "CachedData | BucketedData") -> dict[tuple, CachedData]:
    """{bucket: CachedData} of either form (a plain CachedData is one bucket)."""
    if isinstance(data, BucketedData):
        return data.buckets
    return {tuple(data.latent.shape[2:]) + tuple(f.shape[2] for _, f in sorted(data.features.items())): data}


def load_cache_folder(folder, encoders: list[str]) -> "CachedData | BucketedData":
    """CachedData from a local cache folder (`shards/*.tar` as written by the caching stage), or a
    BucketedData when the cache holds several latent shapes (aspect-ratio or resolution buckets).

    Corrupt data is skipped and counted, never fatal: a truncated or garbled tar keeps the samples
    before the damage (`skipped["bad_shards"]`; the samples the manifest promised but that could not
    be read count in `skipped["bad_samples"]`), and a sample with an undecodable or non-finite array,
    arrays whose names, dtypes or size-independent shapes differ from the other samples' (the
    layout), or spatial members that disagree with its latent, is left out (`bad_samples`)."""
    import collections
    import json
    import logging
    from pathlib import Path

    from snapgen_model.data.sources import iter_tar_groups

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else None
    expected = manifest_counts(manifest)
    good: list[tuple[str, dict[str, np.ndarray], tuple, tuple]] = []
    skipped = {"bad_samples": 0, "bad_shards": 0}
    for shard in sorted(folder.joinpath("shards").glob("*.tar")):
        seen = 0
        try:
            with open(shard, "rb") as f:
                for key, members in iter_tar_groups(f):
                    seen += 1
                    decoded = decode_members(members)
                    split = None if decoded is None else layout_and_bucket(decoded[0])
                    if decoded is None or split is None:
                        skipped["bad_samples"] += 1
                    else:
                        good.append((key, decoded[1], *split))
        except TAR_ERRORS:
            skipped["bad_shards"] += 1
        skipped["bad_samples"] += max(0, expected.get(shard.name, seen) - seen)
    if good:  # the layout most samples share is the cache's; a sample that differs is corrupt
        common = collections.Counter(layout for _, _, layout, _ in good).most_common(1)[0][0]
        skipped["bad_samples"] += sum(layout != common for _, _, layout, _ in good)
        good = [g for g in good if g[2] == common]
    if skipped["bad_samples"] or skipped["bad_shards"]:
        logging.getLogger(__name__).warning("%s: skipped %d corrupt samples (%d damaged shards)", folder,
                                            skipped["bad_samples"], skipped["bad_shards"])
    groups: dict[tuple, list[tuple[str, dict[str, np.ndarray]]]] = {}
    for key, arrays, _, bucket in good:
        groups.setdefault(bucket, []).append((key, arrays))
    if len(groups) > 1:
        return BucketedData({b: CachedData.from_arrays(rows, encoders) for b, rows in groups.items()}, skipped)
    data = CachedData.from_arrays([(key, arrays) for key, arrays, _, _ in good], encoders)
    data.skipped = skipped
    return data


def global_batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at `step`: consecutive slices of seeded epoch permutations."""
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset:offset + batch - len(out)].tolist())
    return torch.tensor(out)


class StepBatches(IterableDataset):
    """Yields this rank's index tensor for steps start, start+1, ... (exactly `steps` of them)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1) -> None:
        if batch % world:
            raise ValueError(f"pretrain.batch_size {batch} is not divisible by the world size {world}")
        self.n, self.batch, self.seed, self.start, self.steps = n, batch, seed, start, steps
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step in range(self.start, self.start + self.steps):
            idx = global_batch_indices(self.n, self.batch, step, self.seed)
            yield {"step": step, "idx": idx[self.rank::self.world]}

    def __len__(self) -> int:
        return self.steps


@functools.lru_cache(maxsize=8)
def _bucket_epoch(sizes: tuple[int, ...], batch: int, epoch: int, seed: int) -> list[tuple[int, list[int]]]:
    """One epoch of bucketed batches: each bucket's seeded permutation cut into batches (the last
    one wrapping around to the bucket's start), all batches in seeded order."""
    chunks = []
    for b, n in enumerate(sizes):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 8191 + b))
        count = -(-n // batch)
        ext = perm.repeat(-(-count * batch // n))[:count * batch].tolist()
        chunks += [(b, ext[c * batch:(c + 1) * batch]) for c in range(count)]
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_000_003))
    return [chunks[i] for i in order.tolist()]


def bucketed_batch_indices(sizes: list[int], batch: int, step: int, seed: int) -> tuple[int, torch.Tensor]:
    """(bucket, indices in that bucket) of the global batch at `step`: every batch from one bucket,
    each bucket's samples once per epoch (a pure function of (sizes, batch, step, seed))."""
    per_epoch = sum(-(-n // batch) for n in sizes)
    epoch, j = divmod(step, per_epoch)
    bucket, idx = _bucket_epoch(tuple(sizes), batch, epoch, seed)[j]
    return bucket, torch.tensor(idx)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Steps [start, end) of one training stage: global batch size, the data source key (a cache
    name, "" = the run's cache) and the buckets of that source it draws from (with their sizes,
    for the in-memory path; `accept` decides for the stream)."""

    index: int
    start: int
    end: int
    batch: int
    resolution: int = 0
    cache: str = ""
    buckets: tuple[int, ...] = ()  # in-memory path: indices into the source's sorted bucket list
    sizes: tuple[int, ...] = ()  # ... and their sample counts

    @property
    def seed_offset(self) -> int:
        return 0 if self.index == 0 else 7919 * self.index


def stage_at(plan: list[StagePlan], step: int) -> StagePlan:
    for stage in plan:
        if stage.start <= step < stage.end:
            return stage
    return plan[-1]


class StagedBatches(IterableDataset):
    """In-memory path: yields this rank's {"step", "stage", "bucket", "idx"} for steps
    start .. end-1, each stage's batches from its buckets (one bucket per batch). A single stage of
    a single bucket draws exactly `global_batch_indices` (the batches of earlier versions)."""

    def __init__(self, plan: list[StagePlan], seed: int, start: int, end: int, rank: int = 0, world: int = 1) -> None:
        for stage in plan:
            if stage.batch % world:
                raise ValueError(f"stage {stage.index}: batch_size {stage.batch} is not divisible by the world size {world}")
        self.plan, self.seed, self.start, self.end, self.rank, self.world = plan, seed, start, end, rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step in range(self.start, self.end):
            stage = stage_at(self.plan, step)
            seed, local = self.seed + stage.seed_offset, step - stage.start
            if len(stage.buckets) == 1:
                bucket, idx = stage.buckets[0], global_batch_indices(stage.sizes[0], stage.batch, local, seed)
            else:
                j, idx = bucketed_batch_indices(list(stage.sizes), stage.batch, local, seed)
                bucket = stage.buckets[j]
            yield {"step": step, "stage": stage.index, "bucket": bucket, "idx": idx[self.rank::self.world]}

    def __len__(self) -> int:
        return self.end - self.start
