"""Non-finite values injected into a training batch: detected, the step skipped (weights untouched),
counted; a persistent NaN stops the run with a clear error and a usable last checkpoint."""
from __future__ import annotations

import json
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.pretrain import NonFiniteLossError
from snapgen_model.training.state import latest_state
from tests.reliability.train_child import run, write_cache

PRESET, CACHE = get_preset("toy-smoke"), CacheConfig(targets_per_sample=2)


class MemoryLogger(Logger):
    """Collects what the training module logs (stands in for the MLflow logger here)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    name, version = "memory", "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class InjectNaN(pl.Callback):
    """Sets the latents of the batch at the given steps to NaN (restored after the step unless
    ``persistent``) and records the student's weights around those steps."""

    def __init__(self, steps: set[int], persistent_from: int | None = None) -> None:
        self.steps, self.persistent_from = steps, persistent_from
        self.saved: torch.Tensor | None = None
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}

    @staticmethod
    def flat(module) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in module.student.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, idx = int(batch["step"]), batch["idx"]
        if self.persistent_from is not None and step >= self.persistent_from:
            pl_module.data.latent[:] = float("nan")
        elif step in self.steps:
            self.saved = pl_module.data.latent[idx].clone()
            pl_module.data.latent[idx[0]] = float("nan")
            self.before[step] = self.flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(batch["step"])
        if step in self.before:
            self.after[step] = self.flat(pl_module)
            pl_module.data.latent[batch["idx"]] = self.saved


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_nan_batch_is_skipped_and_counted(stage, tmp_path, record):
    cache = write_cache(tmp_path / "cache")
    inject, logger = InjectNaN({3}), MemoryLogger()
    spec = {"stage": stage, "cache_dir": str(cache), "steps": 6, "checkpoint_every": 3,
            "state_root": str(tmp_path / "state")}
    started = time.monotonic()
    result = run(spec, callbacks=(inject,), loggers=[logger])
    elapsed = time.monotonic() - started
    assert result["step"] == 6 and result["nonfinite_total"] == 1
    assert torch.equal(inject.before[3], inject.after[3]), "the NaN step changed the weights"
    final = latest_state(tmp_path / "state")
    meta = json.loads((final / "state.json").read_text())
    assert meta["nonfinite_total"] == 1
    from safetensors.torch import load_file

    weights = load_file(str(final / "modules.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    logged = [m["nonfinite/total"] for _, m in logger.metrics if "nonfinite/total" in m]
    assert logged and logged[-1] == 1.0, logger.metrics
    record(stage=stage, injected="NaN latent in 1 sample of the batch at step 3", skipped_steps=1,
           nonfinite_total=result["nonfinite_total"], run_s=elapsed, data_lost="that one batch's update")


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_persistent_nan_stops_with_clear_error_and_usable_checkpoint(stage, tmp_path, record):
    cache = write_cache(tmp_path / "cache")
    limit_key = "max_nonfinite"
    spec = {"stage": stage, "cache_dir": str(cache), "steps": 12, "checkpoint_every": 2,
            "state_root": str(tmp_path / "state"), "extra": {limit_key: 2}}
    started = time.monotonic()
    with pytest.raises(NonFiniteLossError) as info:
        run(spec, callbacks=(InjectNaN(set(), persistent_from=5),))
    stopped_s = time.monotonic() - started
    message = str(info.value)
    field = "pretrain.max_nonfinite" if stage == "pretrain" else "distill.max_nonfinite"
    assert "3 consecutive non-finite losses" in message and f"{field}=2" in message and "checkpoint" in message
    last = latest_state(tmp_path / "state")
    assert last is not None and int(last.name.split("-")[1]) >= 4, last
    from safetensors.torch import load_file

    weights = load_file(str(last / "modules.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values()), "the last checkpoint holds non-finite weights"
    started = time.monotonic()
    resumed = run(spec)  # clean data again: resumes from the last checkpoint to the end
    recover_s = time.monotonic() - started
    assert resumed["resumed_from"] == str(last) and resumed["step"] == 12
    record(stage=stage, injected="NaN latents from step 5 on", error=message, last_checkpoint=last.name,
           time_to_stop_s=stopped_s, resume_to_end_s=recover_s)
