"""Toy teacher bootstrap (toy-smoke preset): losses fall, the latent normalisation is fitted, the bundle
round-trips through the production adapters, and sampling is shaped and seeded."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from snapgen_model.config_base import ConfigError
from snapgen_model.data.shapes import ShapesWorld
from snapgen_model.distill.teacher import LoadError
from snapgen_model.distill.vae import VAEAdapter
from snapgen_model.training import bootstrap as bs


@pytest.fixture(scope="module")
def trained():
    """AE + teacher of the toy-smoke preset, trained once for the module (a few seconds)."""
    cfg = bs.get_bootstrap_config("toy-smoke")
    pool = bs.render_pool(cfg)
    vae, ae = bs.train_autoencoder(cfg)  # its own pool of the "all" split
    models, teacher = bs.train_teacher(cfg, None, vae, pool=pool)
    return cfg, pool, vae, ae, models, teacher


@pytest.fixture(scope="module")
def bundle_dir(trained, tmp_path_factory):
    cfg, _, vae, ae, models, teacher = trained
    folder = tmp_path_factory.mktemp("bundle")
    bs.save_bundle(folder, cfg, vae, models.transformer, models.text_model, models.tokenizer,
                   ae.metrics | teacher.metrics, {"autoencoder": ae.curve, "teacher": teacher.curve})
    return folder


def test_presets_validate_and_hash_stably():
    for name, cfg in bs.BOOTSTRAP_PRESETS.items():
        assert cfg.name == name and len(cfg.content_hash()) == 16
        assert cfg.latent_size == cfg.resolution // 4 and cfg.ae_latent_channels == 16  # f=4, 16 channels
    toy = bs.get_bootstrap_config("toy")
    assert toy.content_hash() == bs.ToyBootstrapConfig.from_dict(toy.to_dict()).content_hash()
    assert bs.get_bootstrap_config("toy", ["teacher_time_budget_s=60"]).content_hash() != toy.content_hash()
    assert bs.get_bootstrap_config("toy", ["object_size_px=[12, 20]"]).object_size_px == (12, 20)
    with pytest.raises(ConfigError, match="unknown bootstrap preset"):
        bs.get_bootstrap_config("toy-huge")


@pytest.mark.parametrize("override, field", [
    ("joint_dim=64", "bootstrap.joint_dim"), ("ae_norm_groups=5", "bootstrap.ae_norm_groups"),
    ("cfg_dropout=1.0", "bootstrap.cfg_dropout"), ("object_size_px=[30, 40]", "object_size_px"),
    ("held_out_pairs=[[\"red\", \"hexagon\"]]", "held_out_pairs"), ("nope=1", "nope"),
])
def test_bad_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        bs.get_bootstrap_config("toy", [override])


def test_autoencoder_loss_falls_and_latents_are_normalised(trained):
    cfg, pool, vae, ae, _, _ = trained
    losses = [p["loss"] for p in ae.curve]
    assert ae.metrics["ae_steps"] == cfg.ae_steps and len(losses) == cfg.ae_steps // cfg.log_every
    assert losses[-1] < 0.5 * losses[0]
    assert vae.config.scaling_factor == pytest.approx(1.0 / ae.metrics["latent_std"])
    z = VAEAdapter(vae).encode(pool.images[:256].float() / 127.5 - 1.0)  # (N, 16, 8, 8) normalised
    assert z.shape[1:] == (16, cfg.latent_size, cfg.latent_size)
    assert abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(1.0, abs=0.1)


def test_teacher_loss_falls(trained):
    cfg, _, _, _, models, teacher = trained
    losses = [p["loss"] for p in teacher.curve]
    assert teacher.metrics["teacher_steps"] == cfg.teacher_steps
    # adaLN-Zero starts at the zero velocity (loss ~2, the trivial predictor), so 40 steps gain less than from a random init
    assert losses[-1] < 0.9 * losses[0]
    assert teacher.metrics["teacher_params"] == sum(p.numel() for p in models.transformer.parameters())


def test_time_budget_stops_training(trained):
    cfg, pool, vae, _, _, _ = trained
    quick = dataclasses.replace(cfg, teacher_steps=100_000, teacher_time_budget_s=0.5)
    _, result = bs.train_teacher(quick, None, vae, pool=pool)
    assert 1 <= result.metrics["teacher_steps"] < 100_000 and result.metrics["teacher_seconds"] < 15.0


def test_bundle_round_trip_gives_identical_teacher_outputs(trained, bundle_dir):
    cfg, pool, vae, _, models, _ = trained
    bundle = bs.load_bundle(bundle_dir)
    assert bundle.config == cfg and bundle.record["config_hash"] == cfg.content_hash()
    assert bundle.vae.scaling_factor == pytest.approx(vae.config.scaling_factor)
    prompts = pool.captions[:3] + [""]
    ids, mask = bs.tokenize(models.tokenizer, prompts, cfg.text_max_length)
    with torch.no_grad():
        expected_cond = bs.text_condition(models.text_model, ids, mask, cfg.joint_dim)
        cond = bundle.condition(prompts)
        assert torch.equal(cond["context"], expected_cond["context"]) and torch.equal(cond["pooled"], expected_cond["pooled"])
        x, t = torch.randn(4, 16, cfg.latent_size, cfg.latent_size), torch.rand(4)
        direct = models.transformer(hidden_states=x, encoder_hidden_states=cond["context"],
                                    pooled_projections=cond["pooled"], timestep=t * 1000, return_dict=False)[0]
        assert torch.equal(bundle.teacher(x, t, cond["context"], cond["pooled"]).velocity, direct)


def test_unfinished_bundle_is_refused(trained, tmp_path):
    with pytest.raises(LoadError, match="no bundle.json"):
        bs.load_bundle(tmp_path)


def test_sampling_shapes_and_seed_determinism(bundle_dir):
    bundle = bs.load_bundle(bundle_dir)
    prompts, seeds = ["a photo of a red circle", "a photo of two squares", "a photo of a blue square"], [5, 6, 7]
    first = bs.sample_teacher(bundle, prompts, seeds, steps=3)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, bs.sample_teacher(bundle, prompts, seeds, steps=3))
    alone = bs.sample_teacher(bundle, prompts[1:2], seeds[1:2], steps=3)  # image i depends only on (prompt_i, seed_i)
    assert np.abs(alone[0].astype(int) - first[1].astype(int)).max() <= 1
    assert not np.array_equal(first[0], bs.sample_teacher(bundle, prompts[:1], [99], steps=3)[0])
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        bs.sample_teacher(bundle, prompts[:2], [0])


def test_diagnostics_are_perfect_on_clean_renders():
    cfg = bs.get_bootstrap_config("toy")
    images, scenes = ShapesWorld(cfg.world()).batch(range(24), "train", phrasing="template")
    diag = bs.teacher_diagnostics(images, [s.metadata for s in scenes], cfg.world())
    assert diag["images"] == 24
    assert diag["colour_present"] == diag["shaped_fraction"] == diag["object_count_match"] == 1.0
    if "geneval" in diag:  # the evaluation suite is importable
        assert diag["geneval"]["overall"] == 1.0 and diag["geneval"]["exact_count"] == 1.0
    blank = np.full_like(images, 180)
    assert bs.teacher_diagnostics(blank, [s.metadata for s in scenes], cfg.world())["shaped_fraction"] == 0.0


def test_evaluation_prompts_cover_seen_and_held_out():
    cfg = bs.get_bootstrap_config("toy")
    prompts = bs.evaluation_prompts(cfg)
    assert prompts == bs.evaluation_prompts(cfg)  # fixed by the config
    assert any("yellow triangle" in p["prompt"] for p in prompts)  # held-out pair present
    assert {p["tag"] for p in prompts} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_cli_command_rejects_bad_overrides_before_training():
    import typer
    from typer.testing import CliRunner

    from flows.cli_bootstrap import bootstrap

    app = typer.Typer()
    app.command("bootstrap-teacher")(bootstrap)
    app.command("noop")(lambda: None)  # two commands: typer then dispatches by name, as in flows/cli.py
    out = CliRunner().invoke(app, ["bootstrap-teacher", "--preset", "toy-smoke", "--set", "teacher_heads=0"])
    assert out.exit_code == 2 and "bootstrap.teacher_heads" in out.output
    out = CliRunner().invoke(app, ["bootstrap-teacher", "--preset", "toy-huge"])
    # presets are choices (one registry per kind): typer names the bad value and the allowed ones
    assert out.exit_code == 2 and "toy-huge" in out.output and "toy-smoke" in out.output
