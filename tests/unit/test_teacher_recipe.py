"""The toy teacher's recipe (issue 14): adaLN-Zero init, one EMA over transformer + text encoder tied to
the run length, resumable training (bitwise for a step-limited run), a training hash that ignores the
evaluation settings."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from snapgen_model.training import bootstrap as bs
from snapgen_model.training.ema import ModuleEMA, decay_for_run, relative_change


@pytest.fixture(scope="module")
def smoke():
    cfg = bs.get_bootstrap_config("toy-smoke")
    vae, _ = bs.train_autoencoder(cfg)
    return cfg, vae, bs.render_pool(cfg)


def _velocity(model: torch.nn.Module, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.ae_latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    ctx, pooled = torch.randn(2, 5, cfg.joint_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)
    return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                 timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


def test_adaln_zero_teacher_starts_at_zero_velocity_and_still_learns():
    cfg = bs.get_bootstrap_config("toy-smoke")
    model = bs.build_teacher(cfg)
    assert torch.count_nonzero(_velocity(model, cfg)) == 0  # output projection and modulation zeroed
    for block in model.transformer_blocks:
        assert torch.count_nonzero(block.norm1.linear.weight) == 0  # gates zero: every block is the identity
    # without the init (diffusers' default) the velocity is not zero
    plain = bs.build_teacher(dataclasses.replace(cfg, teacher_zero_init=False))
    assert torch.count_nonzero(_velocity(plain, cfg)) > 0
    # gradients reach the zeroed layers, so one step makes the output non-zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _velocity(model, cfg).sum().backward()  # zero output, but d/d(proj_out) is not zero
    loss = (_velocity(model, cfg) - 1.0).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.count_nonzero(_velocity(model, cfg)) > 0


def test_ema_decay_is_tied_to_the_run_length():
    assert decay_for_run(20_000) == pytest.approx(0.9995)
    assert decay_for_run(300) == pytest.approx(1 - 1 / 30)
    assert decay_for_run(10) == 0.9  # clamped
    with pytest.raises(ValueError, match="steps"):
        decay_for_run(0)


def test_one_ema_averages_every_module_together():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    ema = ModuleEMA({"unet": a, "conditioner": b}, decay=0.5)
    before = [p.clone() for p in ema["conditioner"].parameters()]
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.add_(1.0)
    used = ema.update(step=1000)  # past the warm-up: decay 0.5
    assert used == 0.5
    for e, s, old in zip(ema["conditioner"].parameters(), b.parameters(), before):
        torch.testing.assert_close(e, 0.5 * old + 0.5 * s)  # the conditioner is averaged too
    assert relative_change(before, ema["conditioner"].parameters()) > 0
    with pytest.raises(KeyError, match="conditioner"):
        ema.load_state_dict({"unet": a.state_dict()})


def test_teacher_ema_covers_the_text_encoder(smoke):
    cfg, vae, pool = smoke
    models, result = bs.train_teacher(cfg, None, vae, pool=pool)
    assert result.metrics["teacher_weights"] == "ema"
    raw_cfg = dataclasses.replace(cfg, teacher_ema=False)
    raw, _ = bs.train_teacher(raw_cfg, None, vae, pool=pool)
    # same training, different weights shipped: both the transformer and the text encoder are the EMA
    assert not torch.equal(next(models.text_model.parameters()), next(raw.text_model.parameters()))
    assert not torch.equal(models.transformer.proj_out.weight, raw.transformer.proj_out.weight)


def test_interrupted_teacher_resumes_bitwise(smoke, tmp_path):
    cfg, vae, pool = smoke
    cfg = dataclasses.replace(cfg, checkpoint_every=10)
    whole, whole_result = bs.train_teacher(cfg, None, vae, pool=pool, checkpoint_dir=tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_at_25(phase, step, total, info):
        if step >= 25:
            raise Stop

    with pytest.raises(Stop):  # killed after step 25: the checkpoint holds step 20
        bs.train_teacher(cfg, None, vae, pool=pool, checkpoint_dir=tmp_path / "cut", progress_cb=stop_at_25)
    resumed, result = bs.train_teacher(cfg, None, vae, pool=pool, checkpoint_dir=tmp_path / "cut")
    assert result.metrics["teacher_resumed_at_step"] == 20 and result.metrics["teacher_steps"] == cfg.teacher_steps
    for a, b in zip(whole.transformer.parameters(), resumed.transformer.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.text_model.parameters(), resumed.text_model.parameters()):
        assert torch.equal(a, b)
    assert [p["loss"] for p in result.curve] == [p["loss"] for p in whole_result.curve]
    # a finished run is not retrained
    again, again_result = bs.train_teacher(cfg, None, vae, pool=pool, checkpoint_dir=tmp_path / "whole")
    assert again_result.metrics["teacher_resumed_at_step"] == cfg.teacher_steps
    assert torch.equal(again.transformer.proj_out.weight, whole.transformer.proj_out.weight)


def test_checkpoint_of_another_config_is_refused(smoke, tmp_path):
    cfg, vae, pool = smoke
    bs.train_teacher(dataclasses.replace(cfg, teacher_steps=10), None, vae, pool=pool, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint of config"):
        bs.train_teacher(cfg, None, vae, pool=pool, checkpoint_dir=tmp_path)
    (tmp_path / bs.TEACHER_STATE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable teacher checkpoint"):
        bs.train_teacher(cfg, None, vae, pool=pool, checkpoint_dir=tmp_path)


def test_training_hash_ignores_evaluation_settings():
    base = bs.get_bootstrap_config("toy-release")
    assert base.content_hash() == bs.get_bootstrap_config("toy-release", ["eval_guidance=2.0", "checkpoint_every=100"]).content_hash()
    assert base.content_hash() != bs.get_bootstrap_config("toy-release", ["teacher_lr=2e-3"]).content_hash()
    assert base.content_hash() != bs.get_bootstrap_config("toy-release", ["teacher_zero_init=false"]).content_hash()
