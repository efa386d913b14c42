"""The data side of the training modules (pretraining and step distillation), shared.

`DataFeed` is a LightningModule mixin: it turns a batch of either data path into a `CachedData` of
the batch's rows (`batch_data`), builds the stream loader, and keeps the stream's data position:
the position of the last batch the module consumed (`on_train_batch_start`), gathered from every
rank before a checkpoint is written (`before_state_save`, called collectively by StateCheckpoint)
and saved in state.json as {"world": W, "ranks": [position of rank 0, ...]}.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from snapgen_model.training.data import CachedData
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


def rank_position(saved: dict[str, Any] | None, rank: int, world: int, shards: int) -> dict[str, Any] | None:
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
    return {"epoch": epoch, "pos": 0, "group": 0, "counter": 0, "emitted": 0, "epoch_good": False,
            "empty_epochs": 0, "split": "shards" if shards >= world else "samples", "stats": stats, "buffer": []}


def summed_stats(positions: list[dict[str, Any] | None]) -> dict[str, int]:
    return {k: sum(int(p["stats"][k]) for p in positions if p) for k in ZERO_SKIPPED}


class DataFeed:
    """Mixin of the training modules (see the module docstring). Expects `self.data`,
    `self.resume_position` (state.json's data_position or None) and `self.trainer`."""

    data: Any
    resume_position: dict[str, Any] | None = None
    _position: dict[str, Any] | None = None
    _positions: list[dict[str, Any] | None] | None = None

    @property
    def streaming(self) -> bool:
        return isinstance(self.data, StreamData)

    def reference_data(self) -> CachedData:
        """A CachedData to size the modules from (the stream's one-sample reference)."""
        return self.data.reference if self.streaming else self.data

    def batch_data(self, batch: dict[str, Any]) -> CachedData:
        """The batch's rows: carried by a stream batch, selected from memory by index otherwise."""
        if "data" in batch:
            return batch["data"]
        return self.data.select(batch["idx"].cpu())

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # tensors move to the device where they are used (indices and positions stay on the CPU)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._position = batch.get("position")

    def stream_loader(self, *, batch: int, seed: int, start: int, steps: int, buffer: int, workers: int):
        world, rank = self.trainer.world_size, self.global_rank
        position = rank_position(self.resume_position, rank, world, len(self.data.source.names))
        self._position = position
        return StreamBatches(self.data, batch=batch, seed=seed, start=start, steps=steps, rank=rank, world=world,
                             buffer_size=buffer, position=position).loader(workers)

    def before_state_save(self, trainer) -> None:
        """Collective: every rank's position, for the checkpoint global rank 0 writes."""
        self._positions = gather_objects(self._position, trainer.world_size) if self.streaming else None

    def data_position(self) -> dict[str, Any] | None:
        if not self.streaming or self._positions is None:
            return None
        return {"world": len(self._positions), "ranks": self._positions}

    def finish_data(self, trainer) -> None:
        """Collective, at train end: the stream's corrupt-data counters summed over ranks."""
        if self.streaming:
            self.data.skipped = summed_stats(gather_objects(self._position, trainer.world_size))

    def data_skipped(self) -> dict[str, int]:
        return dict(getattr(self.data, "skipped", {}) or {})
