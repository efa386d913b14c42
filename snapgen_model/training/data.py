"""Training data from the teacher cache: an in-memory tensor set and a step-indexed batch stream.

The data position is the optimiser step: batch s is a pure function of (seed, s), drawn from
seeded epoch permutations, and rank r of a world of W takes rows r::W of the global batch. So a
run resumed at step s reads exactly the batches an uninterrupted run reads, on any world size.
(At full scale the same contract holds over the streaming ShardStream with epoch + offset; this
module covers cache sizes that fit in memory, as the toy world does.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from snapgen_model.distill.cache import load_npy


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
        arr = lambda name: torch.from_numpy(np.stack([load_npy(m[name]).astype(np.float32) for _, m in samples]))  # noqa: E731
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
        )


def load_cache_folder(folder, encoders: list[str]) -> CachedData:
    """CachedData from a local cache folder (`shards/*.tar` as written by the caching stage)."""
    from pathlib import Path

    from snapgen_model.data.sources import iter_tar_groups

    samples = []
    for shard in sorted(Path(folder, "shards").glob("*.tar")):
        with open(shard, "rb") as f:
            samples.extend(iter_tar_groups(f))
    return CachedData.from_members(samples, encoders)


def global_batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at `step`: consecutive slices of seeded epoch permutations."""
    start = step * batch
    out = []
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
