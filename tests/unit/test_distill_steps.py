"""Adversarial step distillation: bitwise resume (discriminator included), a short run, the saved sampler."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.distill.text import Encoded, TextConditioner, TextConditionerConfig
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.training.data import CachedData
from snapgen_model.training.distill_steps import (
    StepDistillConfig,
    StepDistillModule,
    fit_distill,
    save_distilled,
)
from snapgen_model.training.state import latest_state
from tests.fixtures import memory_data
from tests.fixtures.training import StopAt
from tests.fixtures.memory_data import tiny_teacher

PRESET = get_preset("toy-smoke")  # context_dim 32, pooled_dim 32, 8x8x16 latents
CACHE = CacheConfig(targets_per_sample=2)



def synthetic_data(n: int = 8, k: int = 2) -> CachedData:
    return memory_data.synthetic_data(CACHE, n, k, width=24, pooled=32, feat=False)


def teacher_null() -> dict[str, Encoded]:
    """A fixed stand-in for the teacher text encoder's empty-prompt encoding (batch 1)."""
    g = torch.Generator().manual_seed(5)
    return {"clip": Encoded(torch.randn(1, 6, 24, generator=g), torch.randn(1, 32, generator=g), torch.ones(1, 6))}


def student_and_conditioner():
    """A stand-in for the pretrained student: its zero-initialised layers filled (as training leaves them),
    so every layer, the conditioner included, gets gradients from the first step."""
    from tests.fixtures.checkpoints import randomize_zero_init

    torch.manual_seed(0)
    return (randomize_zero_init(SnapGenUNet(PRESET.unet)),
            TextConditioner(TextConditionerConfig(width=32, pooled_dim=32), {"clip": (24, 32)}))


def cfg(**kw) -> StepDistillConfig:
    base = dict(steps=4, batch_size=4, lr_g=1e-3, lr_d=1e-3, warmup_steps=0, sampler_steps=2, checkpoint_every=2, log_every=1,
                accelerator="cpu", discriminator={"feature_layers": [0, -1], "head_width": 8})
    return StepDistillConfig.from_dict(base | kw)


def make_module(data: CachedData, **kw) -> StepDistillModule:
    student, conditioner = student_and_conditioner()
    return StepDistillModule(PRESET, cfg(**kw), data, CACHE, teacher=tiny_teacher(), student=student,
                             conditioner=conditioner, teacher_null=teacher_null())


def run(data, root, **kw):
    student, conditioner = student_and_conditioner()
    callbacks = kw.pop("callbacks", ())
    return fit_distill(PRESET, cfg(**kw), data, CACHE, root, teacher=tiny_teacher(), student=student,
                       conditioner=conditioner, teacher_null=teacher_null(), callbacks=callbacks)


class Record(pl.Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: float(v) for k, v in outputs.items()})


def test_resume_is_bitwise_identical_including_the_discriminator(tmp_path):
    data = synthetic_data()
    full = run(data, tmp_path / "full", discriminator={"feature_layers": [0, -1], "head_width": 8, "r1_weight": 0.1})
    part = run(data, tmp_path / "part", callbacks=[StopAt(2)],
               discriminator={"feature_layers": [0, -1], "head_width": 8, "r1_weight": 0.1})
    assert full["step"] == 4 and part["step"] == 2
    resumed = run(data, tmp_path / "part", discriminator={"feature_layers": [0, -1], "head_width": 8, "r1_weight": 0.1})
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["step"] == 4
    a_dir, b_dir = latest_state(tmp_path / "full"), latest_state(tmp_path / "part")
    for name in ("modules.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = load_file(str(a_dir / "modules.safetensors"))
    assert {k.split("/")[0] for k in a} == {"student", "ema", "conditioner", "heads"}
    start = load_file(str((tmp_path / "full" / "step-00000002") / "modules.safetensors"))
    assert not all(torch.equal(a[k], start[k]) for k in a if k.startswith("heads/"))  # heads trained after the resume point


def test_sigterm_saves_the_state_and_stops_the_run(tmp_path):
    """As in pretraining: a SIGTERM saves the state and raises TrainingInterrupted instead of returning a
    few-step student trained for part of its steps; the next call resumes from the saved step."""
    from snapgen_model.training.state import TrainingInterrupted
    from tests.fixtures.training import SigtermAt, sigterm_handler_kept

    with sigterm_handler_kept():
        with pytest.raises(TrainingInterrupted, match="distill: stopped by SIGTERM at step 2 of 4"):
            run(synthetic_data(), tmp_path / "state", checkpoint_every=0, callbacks=[SigtermAt(1)])
    assert latest_state(tmp_path / "state").name == "step-00000002"
    resumed = run(synthetic_data(), tmp_path / "state", checkpoint_every=0)
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["step"] == 4


def test_short_run_finite_losses_and_saved_few_step_sampler(tmp_path):
    from snapgen_model.storage.checkpoint import read_preset

    rec = Record()
    result = run(synthetic_data(), tmp_path / "state", steps=3, checkpoint_every=0, callbacks=[rec])
    assert result["step"] == 3 and len(rec.outputs) == 3
    assert all(torch.isfinite(torch.tensor(list(o.values()))).all() for o in rec.outputs)
    acc = sum(o["acc_real"] + o["acc_fake"] for o in rec.outputs) / (2 * len(rec.outputs))
    assert 0 < acc < 1, rec.outputs
    paths = save_distilled(result["module"], tmp_path / "out")
    sampler = read_preset(paths["unet"]).sampler
    assert (sampler.kind, sampler.steps, sampler.guidance) == ("few_step", 2, 1.0)
    again = run(synthetic_data(), tmp_path / "state", steps=3)  # complete: nothing trained, weights loaded
    ema = load_file(str(latest_state(tmp_path / "state") / "modules.safetensors"))
    assert all(torch.equal(v, ema[f"ema/{k}"]) for k, v in again["module"].ema_models.state_dict().items())


def test_config_defaults_and_validation():
    from snapgen_model.config_base import ConfigError

    c = StepDistillConfig()
    assert c.sampler_steps == 4 and c.discriminator.loss == "hinge" and not c.kd.feature_kd
    assert StepDistillConfig().with_overrides(["sampler_steps=8"]).sampler().steps == 8
    with pytest.raises(ConfigError, match="distill.d_updates"):
        StepDistillConfig(d_updates=0)
