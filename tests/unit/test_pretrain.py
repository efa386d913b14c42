"""Pretraining: losses fall on a fixed batch, cached == online targets, bitwise resume, SIGTERM, NaN."""
from __future__ import annotations

import signal

import lightning.pytorch as pl
import pytest
import torch

from snapgen_model.distill.cache import CacheConfig, draw_pair
from snapgen_model.presets import get_preset
from snapgen_model.training.data import CachedData, global_batch_indices
from snapgen_model.training.pretrain import NonFiniteLossError, PretrainConfig, fit
from snapgen_model.training.state import latest_state
from tests.fixtures import memory_data
from tests.fixtures.training import StopAt

PRESET = get_preset("toy-smoke")
CACHE = CacheConfig(targets_per_sample=2)


def synthetic_data(n: int = 16, k: int = 2, feat: bool = True) -> CachedData:
    return memory_data.synthetic_data(CACHE, n, k, width=24, pooled=24, feat=feat)


def cfg(**kw) -> PretrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1, accelerator="cpu",
                kd={"student_feature": "up1"})
    return PretrainConfig.from_dict(base | kw)


def test_batches_are_a_function_of_step():
    a = global_batch_indices(12, 4, 7, seed=1)
    assert torch.equal(a, global_batch_indices(12, 4, 7, seed=1)) and len(set(a.tolist())) == 4
    epoch = torch.cat([global_batch_indices(10, 5, s, 1) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))


class LossLog(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _flow_matching_loss(module, data: CachedData, draws: int = 16) -> tuple[float, float]:
    """(student, zero-velocity baseline) task loss on a fixed, seeded set of (t, noise) draws."""
    from snapgen_model.diffusion.flow import interpolate, sample_timesteps

    g = torch.Generator().manual_seed(123)
    cond = module.conditioner(module._encoded(data))
    student = baseline = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = sample_timesteps(len(data), PRESET.flow, g)
            noise = torch.randn(data.latent.shape, generator=g)
            v = module.student(interpolate(data.latent, noise, t), t, **cond)
            student += float((v - (noise - data.latent)).pow(2).mean()) / draws
            baseline += float((noise - data.latent).pow(2).mean()) / draws
    return student, baseline


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    """The task term draws a fresh (t, noise) every step, so the per-step loss is noisy: the student is
    judged on a fixed set of draws instead, against the fresh (zero-output) UNet's loss."""
    data = synthetic_data(n=4)
    log = LossLog()
    result = fit(PRESET, cfg(steps=40, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=0,
                             encoder_dropout=0.0), data, CACHE, tmp_path, callbacks=[log])
    assert result["step"] == 40 and len(log.losses) == 40
    trained, untrained = _flow_matching_loss(result["module"], data)
    assert trained < 0.92 * untrained, (trained, untrained)


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "modules.safetensors"))


def test_resume_is_bitwise_identical(tmp_path):
    data = synthetic_data()
    fit(PRESET, cfg(), data, CACHE, tmp_path / "full")
    part = fit(PRESET, cfg(), data, CACHE, tmp_path / "part", callbacks=[StopAt(3)])
    assert part["step"] == 3
    resumed = fit(PRESET, cfg(), data, CACHE, tmp_path / "part")
    assert resumed["resumed_from"].endswith("step-00000003") and resumed["step"] == 6
    a, b = _weights(latest_state(tmp_path / "full")), _weights(latest_state(tmp_path / "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("ema/") for k in a) and any(k.startswith("projector/") for k in a)


def test_checkpoint_retention(tmp_path):
    fit(PRESET, cfg(steps=8, checkpoint_every=2, keep_checkpoints=2), synthetic_data(), CACHE, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000006", "step-00000008"]


def test_sigterm_writes_a_checkpoint_and_stops_the_run(tmp_path):
    """A SIGTERM (a stopped container, a cancelled flow run) saves the state and ends the run with
    TrainingInterrupted: `fit` used to return as if training had finished, and the pipeline saved, evaluated
    and registered a student trained for a fraction of its steps. The next call resumes and finishes."""
    from snapgen_model.training.state import TrainingInterrupted
    from tests.fixtures.training import SigtermAt, sigterm_handler_kept

    with sigterm_handler_kept() as old:
        with pytest.raises(TrainingInterrupted, match="pretrain: stopped by SIGTERM at step 3 of 6") as stopped:
            fit(PRESET, cfg(steps=6, checkpoint_every=0), synthetic_data(), CACHE, tmp_path, callbacks=[SigtermAt(2)])
        assert signal.getsignal(signal.SIGTERM) is old  # the run put the process's handler back
    assert stopped.value.code == 143 and isinstance(stopped.value, SystemExit)  # not retried in a stopping process
    assert latest_state(tmp_path).name == "step-00000003" and stopped.value.state == latest_state(tmp_path)
    result = fit(PRESET, cfg(steps=6, checkpoint_every=0), synthetic_data(), CACHE, tmp_path)
    assert result["resumed_from"].endswith("step-00000003") and result["step"] == 6


def test_nonfinite_losses_skip_then_stop(tmp_path):
    data = synthetic_data()
    data.v[:] = float("nan")  # every KD target is NaN: each step's loss is non-finite
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite losses"):
        fit(PRESET, cfg(steps=20, max_nonfinite=3, encoder_dropout=0.0, kd={"feature_kd": False}), data, CACHE, tmp_path)


def test_cached_and_online_targets_agree(tiny_bundle):
    """The cached target for (key, k) equals the online teacher on the same (t, noise)."""
    from snapgen_model.diffusion.flow import interpolate
    from snapgen_model.distill.cache import cache_batch
    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig
    from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec, sd3_teacher_condition
    from snapgen_model.distill.vae import VAEAdapter, VAEConfig
    from snapgen_model.data.shapes import ShapesWorld, ShapesWorldConfig
    from snapgen_model.training.data import CachedData

    world = ShapesWorld(ShapesWorldConfig(resolution=32, object_size_px=(8, 11)))
    images, scenes = world.batch(range(3))
    vae = VAEAdapter.from_pretrained(VAEConfig(path=str(tiny_bundle), subfolder="vae"))
    enc = TextEncoderAdapter.from_pretrained(TextEncoderSpec(name="clip", kind="clip", path=str(tiny_bundle),
                                                             subfolder="text_encoder", max_length=16))
    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=str(tiny_bundle)))
    cc = CacheConfig(targets_per_sample=2, feature_dtype="float32", store_features=True)
    members = cache_batch(["a", "b", "c"], list(images), [s.caption for s in scenes], vae=vae,
                          encoders={"clip": enc}, teacher=teacher, cfg=cc)
    data = CachedData.from_members([(m["__key__"], m) for m in members], ["clip"])
    assert data.v.shape == (3, 2, 16, 8, 8) and "block1" in data.features
    t, noise = draw_pair("b", 1, data.latent.shape[1:], cc)
    cond = sd3_teacher_condition({"clip": enc([scenes[1].caption])}, ["clip"], 32)
    online = teacher(interpolate(data.latent[1:2], noise[None], t.view(1)), t.view(1), cond["context"], cond["pooled"])
    assert torch.allclose(online.velocity[0], data.v[1, 1], atol=1e-4)
    assert torch.allclose(online.features["block1"][0], data.features["block1"][1, 1], atol=1e-4)
