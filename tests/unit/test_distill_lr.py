"""Step distillation LR schedule: linear warm-up then cosine decay for the generator and the
discriminator (as pretraining), checkpointed with both schedulers, bitwise resume mid-warm-up;
the defaults keep both rates constant."""
from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest

from snapgen_model.config_base import ConfigError
from snapgen_model.training.distill_steps import StepDistillConfig
from snapgen_model.training.pretrain import lr_lambda
from snapgen_model.training.state import latest_state
from tests.unit.test_distill_steps import StopAt, run, synthetic_data
from tests.fixtures.training import same, weights



class Rates(pl.Callback):
    """(lr_g, lr_d) in effect during each step."""

    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        g, d = trainer.optimizers
        self.rates.append((g.param_groups[0]["lr"], d.param_groups[0]["lr"]))


def test_warmup_then_cosine_for_both_optimisers(tmp_path):
    rates = Rates()
    run(synthetic_data(), tmp_path / "s", steps=6, checkpoint_every=0, lr_g=1e-3, lr_d=4e-3, warmup_steps=2,
        min_lr_ratio=0.1, callbacks=[rates])
    cfg = StepDistillConfig(steps=6, warmup_steps=2, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    expected = [f(s) for s in range(6)]
    assert expected[:2] == [0.5, 1.0] and math.isclose(expected[-1], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert [r[0] for r in rates.rates] == pytest.approx([1e-3 * x for x in expected], rel=1e-12)
    assert [r[1] for r in rates.rates] == pytest.approx([4e-3 * x for x in expected], rel=1e-12)


def test_no_warmup_and_floor_one_keep_the_rates_constant(tmp_path):
    rates = Rates()
    run(synthetic_data(), tmp_path / "s", steps=3, checkpoint_every=0, warmup_steps=0,
        callbacks=[rates])  # lr_g = lr_d = 1e-3
    assert rates.rates == [(1e-3, 1e-3)] * 3
    assert StepDistillConfig().min_lr_ratio == 1.0  # the defaults: warm-up, then constant
    with pytest.raises(ConfigError, match="distill.min_lr_ratio"):
        StepDistillConfig(min_lr_ratio=1.5)


def test_resume_mid_warmup_is_bitwise_identical(tmp_path):
    kw = dict(warmup_steps=3, min_lr_ratio=0.2)
    data = synthetic_data()
    run(data, tmp_path / "full", **kw)
    assert run(data, tmp_path / "part", callbacks=[StopAt(2)], **kw)["step"] == 2
    meta = json.loads((latest_state(tmp_path / "part") / "state.json").read_text())
    assert meta["scheduler"]["generator"]["last_epoch"] == 2 and meta["scheduler"]["discriminator"]["last_epoch"] == 2
    rates = Rates()
    assert run(data, tmp_path / "part", callbacks=[rates], **kw)["step"] == 4
    f = lr_lambda(StepDistillConfig(steps=4, **kw))
    assert [r[0] for r in rates.rates] == pytest.approx([1e-3 * f(s) for s in (2, 3)], rel=1e-12)
    for name in ("modules.safetensors", "optimizer.safetensors"):
        assert same(weights(tmp_path / "full", name), weights(tmp_path / "part", name)), name
