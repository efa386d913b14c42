"""The data side of the training modules (pretraining and step distillation), shared.

`DataFeed` is a LightningModule mixin: it plans the stages (`training/stages.py`) over the data
sources, builds the loader of either data path (in memory: `StagedBatches`; streamed:
`StreamBatches`), turns a batch into a `CachedData` of its rows (`batch_data`), and keeps the
stream's data position:
the position of the last batch the module consumed (`on_train_batch_start`), gathered from every
rank before a checkpoint is written (`before_state_save`, called collectively by StateCheckpoint)
and saved in state.json as {"world": W, "ranks": [position of rank 0, ...]}.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from snapgen_model.training.data import BucketedData, CachedData, StagedBatches, stage_at
from snapgen_model.training.stages import StageConfig, bucket_data, make_plan, stage_filters
from snapgen_model.training.stream import StreamBatches, StreamData

log = logging.getLogger(__name__)
ZERO_SKIPPED = {"bad_samples": 0, "bad_shards": 0}


def gather_objects(obj: Any, world: int) -> list[Any]:
    """`obj` of every rank (collective when world > 1)."""
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def rank_position(saved: dict[str, Any] | None, rank: int, world: int) -> dict[str, Any] | None:
    """This rank's stream position from a checkpoint's `data_position`. Resumed on another world
    size, the exact position cannot carry over: every rank starts the epoch after the furthest one
    saved (a logged warning), and rank 0 carries the corrupt-data counters."""
    if not saved:
        return None
    ranks = saved["ranks"]
    if saved["world"] == world:
        return ranks[rank]
    epoch = max(int(p["epoch"]) for p in ranks) + 1
    log.warning("stream position saved by %d ranks, resumed on %d: the exact data position cannot carry over; "
                "every rank starts epoch %d", saved["world"], world, epoch)
    stats = {k: sum(int(p["stats"][k]) for p in ranks) if rank == 0 else 0 for k in ZERO_SKIPPED}
    stream = {"epoch": epoch, "pos": 0, "group": 0, "counter": 0, "emitted": 0, "epoch_good": False,
              "empty_epochs": 0, "stats": dict(ZERO_SKIPPED), "buffer": []}
    return {"stage": ranks[0]["stage"], "stream": stream, "done": stats, "partial": [], "stats": stats}


def summed_stats(positions: list[dict[str, Any] | None]) -> dict[str, int]:
    return {k: sum(int(p["stats"][k]) for p in positions if p) for k in ZERO_SKIPPED}


def as_sources(data: Any) -> dict[str, Any]:
    """{cache name: data}: "" is the run's cache; other names are the caches stages name."""
    sources = dict(data) if isinstance(data, dict) else {"": data}
    if "" not in sources:
        raise ValueError("training data: the run's own cache (key \"\") is missing")
    kinds = {isinstance(d, StreamData) for d in sources.values()}
    if len(kinds) > 1:
        raise ValueError("training data: mix of streamed and in-memory caches; use one data path for all stages")
    return sources


class DataFeed:
    """Mixin of the training modules (see the module docstring). Expects `self.data` (the run's
    cache), `self.sources` (`as_sources`), `self.resume_position` (state.json's data_position or
    None) and `self.trainer`; `setup_plan` makes `self.plan`."""

    data: Any
    sources: dict[str, Any]
    plan: list
    trainer: Any
    global_rank: int
    resume_position: dict[str, Any] | None = None
    _position: dict[str, Any] | None = None
    _positions: list[dict[str, Any] | None] | None = None
    _stage: int | None = None

    @property
    def streaming(self) -> bool:
        return isinstance(self.data, StreamData)

    def reference_data(self) -> CachedData:
        """A CachedData to size the modules from (the stream's one-sample reference)."""
        if self.streaming or isinstance(self.data, BucketedData):
            return self.data.reference
        return self.data

    def setup_plan(self, stages: list[StageConfig], downsample: int) -> None:
        self.stage_cfgs = stages
        self.plan = make_plan(stages, self.sources, downsample)
        self.filters = stage_filters(stages, downsample)
        ref = self.reference_data()
        for name, src in self.sources.items():  # every stage's cache must fit the conditioner built for the run cache
            other = src.reference if (self.streaming or isinstance(src, BucketedData)) else src
            dims = lambda d: ({e: tuple(x.shape[2:]) for e, x in d.tokens.items()},  # noqa: E731
                              {e: tuple(x.shape[1:]) for e, x in d.pooled.items()}, d.targets)
            if dims(other) != dims(ref):
                raise ValueError(f"stage cache {name!r}: its text states or target count differ from the run cache's")

    def batch_data(self, batch: dict[str, Any]) -> CachedData:
        """The batch's rows: carried by a stream batch, selected from memory by index otherwise."""
        if "data" in batch:
            return batch["data"]
        stage = self.plan[batch.get("stage", 0)]
        return bucket_data(self.sources[stage.cache], batch.get("bucket", 0)).select(batch["idx"].cpu())

    def memory_loader(self, *, seed: int, start: int, end: int):
        batches = StagedBatches(self.plan, seed, start, end, rank=self.global_rank, world=self.trainer.world_size)
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0)

    def stage_changed(self, batch: dict[str, Any]) -> bool:
        """True on the first batch of a stage (and the first batch of a run); logs the switch."""
        stage = int(batch.get("stage", 0))
        if stage == self._stage:
            return False
        self._stage = stage
        if len(self.plan) > 1:
            st = self.plan[stage]
            log.info("step %d: stage %d of %d (resolution %s, batch %d, cache %s, steps %d-%d)", int(batch["step"]),
                     stage, len(self.plan), st.resolution or "all", st.batch, st.cache or "(run cache)",
                     st.start, st.end - 1)
        return True

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # tensors move to the device where they are used (indices and positions stay on the CPU)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._position = batch.get("position")

    def stream_loader(self, *, seed: int, start: int, end: int, buffer: int, workers: int):
        world, rank = self.trainer.world_size, self.global_rank
        position = rank_position(self.resume_position, rank, world)
        self._position = position
        stage = stage_at(self.plan, start)
        return StreamBatches(self.data, batch=stage.batch, seed=seed, start=start, steps=end - start, rank=rank,
                             world=world, buffer_size=buffer, position=position, plan=self.plan,
                             sources=self.sources, filters=self.filters).loader(workers)

    def before_state_save(self, trainer) -> None:
        """Collective: every rank's position, for the checkpoint global rank 0 writes."""
        self._positions = gather_objects(self._position, trainer.world_size) if self.streaming else None

    def data_position(self) -> dict[str, Any] | None:
        if not self.streaming or self._positions is None:
            return None
        return {"world": len(self._positions), "ranks": self._positions}

    def train_dataloader(self):
        """The stream or the in-memory batches from the current step to `cfg.steps` (Lightning hook)."""
        if self.streaming:
            return self.stream_loader(seed=self.cfg.seed, start=self.start_step, end=self.cfg.steps,
                                      buffer=self.cfg.shuffle_buffer, workers=self.cfg.data_workers)
        return self.memory_loader(seed=self.cfg.seed, start=self.start_step, end=self.cfg.steps)

    def on_train_end(self) -> None:
        self.finish_data(self.trainer)

    def finish_data(self, trainer) -> None:
        """Collective, at train end: the stream's corrupt-data counters summed over ranks."""
        if self.streaming:
            self.data.skipped = summed_stats(gather_objects(self._position, trainer.world_size))

    def data_skipped(self) -> dict[str, int]:
        """Corrupt data left out: the stream's counters (summed over ranks and stage caches), or the
        in-memory loaders' (summed over the caches)."""
        if self.streaming:
            return dict(self.data.skipped)
        total = dict(ZERO_SKIPPED)
        for src in self.sources.values():
            for k, v in (getattr(src, "skipped", {}) or {}).items():
                total[k] = total.get(k, 0) + int(v)
        return total
