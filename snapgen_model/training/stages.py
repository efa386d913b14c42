"""Progressive resolution schedule and aspect buckets (SNAPGEN_SPEC.md section 4).

`PretrainConfig.stages` lists training stages, each with its own steps and global batch size,
and its data: a `cache` (a cache URI the task layer resolves; "" = the run's cache) and/or a
`resolution` (pixels): the stage draws from the buckets of its cache whose resolution is nearest
to its own among the resolutions of the stages sharing that cache (bucket resolution =
sqrt(latent h * latent w) * the latent down-sampling factor; 0 = every bucket). An empty list is
one stage of `steps` x `batch_size` over the whole run cache: the behaviour of earlier versions.

Stage i covers global steps [sum of earlier steps, + its steps); the switch happens at that step
whether the run was resumed or not (batches are a function of (seed, stage, step)). One optimiser,
LR schedule (warm-up + cosine over all steps), EMA and student carry through the stages.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from snapgen_model.config_base import ConfigBase, check
from snapgen_model.training.data import BucketedData, StagePlan, as_buckets, bucket_name


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig(ConfigBase):
    """One stage of the progressive schedule."""

    steps: int  # optimiser steps of this stage
    batch_size: int  # global batch of this stage (split over ranks)
    resolution: int = 0  # pixels: the buckets nearest to this resolution (0 = every bucket of the cache)
    cache: str = ""  # a cache URI for this stage ("" = the run's cache)

    def __post_init__(self) -> None:
        check(self.steps >= 1, "stages[].steps", "must be >= 1")
        check(self.batch_size >= 1, "stages[].batch_size", "must be >= 1")
        check(self.resolution >= 0, "stages[].resolution", "must be >= 0 (0 = every bucket)")


def bucket_resolution(bucket: tuple, downsample: int) -> float:
    """Pixel resolution of a bucket: sqrt(h * w) of its latent times the VAE down-sampling."""
    return math.sqrt(bucket[0] * bucket[1]) * downsample


def nearest(bucket: tuple, resolutions: tuple[int, ...], downsample: int) -> int:
    px = bucket_resolution(bucket, downsample)
    return min(resolutions, key=lambda r: (abs(math.log(px / r)), r))


@dataclasses.dataclass(frozen=True)
class ResolutionFilter:
    """Stream side of a stage's bucket choice: accept(bucket) -> bool (picklable)."""

    resolution: int
    resolutions: tuple[int, ...]
    downsample: int

    def __call__(self, bucket: tuple) -> bool:
        return not self.resolution or nearest(bucket, self.resolutions, self.downsample) == self.resolution


def stage_configs(stages: tuple[StageConfig, ...], steps: int, batch_size: int) -> list[StageConfig]:
    return list(stages) or [StageConfig(steps=steps, batch_size=batch_size)]


def stage_filters(stages: list[StageConfig], downsample: int) -> list[ResolutionFilter]:
    """Per stage, the resolutions competing for its cache's buckets, as a filter."""
    out = []
    for st in stages:
        rivals = tuple(sorted({s.resolution for s in stages if s.cache == st.cache and s.resolution}))
        out.append(ResolutionFilter(st.resolution, rivals, downsample))
    return out


def make_plan(stages: list[StageConfig], sources: dict[str, Any], downsample: int) -> list[StagePlan]:
    """StagePlans with their step ranges; for in-memory sources, the buckets each stage draws from
    (a stage that would draw from none is an error naming it)."""
    plan, start = [], 0
    for i, (st, accept) in enumerate(zip(stages, stage_filters(stages, downsample))):
        if st.cache not in sources:
            raise ValueError(f"pretrain.stages[{i}].cache: {st.cache!r} was not loaded (known: {sorted(sources)})")
        buckets: tuple[int, ...] = ()
        sizes: tuple[int, ...] = ()
        src = sources[st.cache]
        if not hasattr(src, "source"):  # in memory: choose the buckets now
            all_buckets = as_buckets(src)
            chosen = [(j, b) for j, b in enumerate(all_buckets) if accept(b)]
            if not chosen:
                have = ", ".join(f"{bucket_name(b)} (~{bucket_resolution(b, downsample):.0f} px)" for b in all_buckets)
                raise ValueError(f"pretrain.stages[{i}].resolution: no cached samples near {st.resolution} px in "
                                 f"cache {st.cache or '(run cache)'!r}; its buckets: {have}")
            buckets = tuple(j for j, _ in chosen)
            sizes = tuple(len(all_buckets[b]) for _, b in chosen)
        plan.append(StagePlan(index=i, start=start, end=start + st.steps, batch=st.batch_size,
                              resolution=st.resolution, cache=st.cache, buckets=buckets, sizes=sizes))
        start += st.steps
    return plan


def bucket_data(src: Any, bucket: int):
    """The CachedData of bucket index `bucket` of an in-memory source."""
    if isinstance(src, BucketedData):
        return src.buckets[src.bucket_keys[bucket]]
    return src
