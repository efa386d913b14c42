"""Quality probes during teacher training (scripts/gpu_teacher_sweep.py judges recipes by them): the probe
sees the raw and EMA models at its interval, and probing changes nothing about the trained weights."""
from __future__ import annotations

import dataclasses

import torch

from snapgen_model.training import bootstrap as bs


def _train(cfg, vae, pool, probe=None, every=0):
    models, _ = bs.train_teacher(cfg, None, vae, pool=pool, probe=probe, probe_every=every)
    return [p.detach().clone() for p in models.transformer.parameters()]


def test_probe_sees_raw_and_ema_at_its_interval_and_leaves_training_unchanged():
    cfg = dataclasses.replace(bs.get_bootstrap_config("toy-smoke"), teacher_steps=6, log_every=1)
    vae, _ = bs.train_autoencoder(dataclasses.replace(cfg, ae_steps=2))
    pool = bs.render_pool(cfg)
    seen = []

    def probe(step, models):
        assert not models["raw"].transformer.training and not torch.is_grad_enabled()
        # a probe that runs the models (as sampling does) must not disturb the run
        x = torch.randn(1, cfg.ae_latent_channels, cfg.latent_size, cfg.latent_size)
        models["raw"].transformer(hidden_states=x, encoder_hidden_states=torch.randn(1, 3, cfg.joint_dim),
                                  pooled_projections=torch.randn(1, cfg.pooled_dim), timestep=torch.tensor([500.0]))
        seen.append((step, sorted(models)))

    plain = _train(cfg, vae, pool)
    probed = _train(cfg, vae, pool, probe, every=2)
    assert seen == [(2, ["ema", "raw"]), (4, ["ema", "raw"]), (6, ["ema", "raw"])]
    assert all(torch.equal(a, b) for a, b in zip(plain, probed))
