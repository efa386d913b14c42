"""Step distillation (issue 14): the guided teacher KD target against a hand computation, one EMA over
UNet + conditioner (run-length decay, saved as the EMA pair with the raw pair beside it), and the
weight-change / discriminator-accuracy diagnostics with the defaults that move the weights."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from snapgen_model.distill.text import Encoded, sd3_teacher_condition
from snapgen_model.training.distill_steps import StepDistillConfig, StepDistillModule, fit_distill, save_distilled
from snapgen_model.training.ema import decay_for_run, relative_change
from snapgen_model.training.state import latest_state
from tests.unit.test_distill_steps import (
    CACHE,
    PRESET,
    cfg,
    make_module,
    run,
    student_and_conditioner,
    synthetic_data,
    teacher_null,
    tiny_teacher,
)


def _inputs(module: StepDistillModule, n: int = 4):
    idx = torch.arange(n)
    g = torch.Generator().manual_seed(3)
    x_t, t = torch.randn(n, 16, 8, 8, generator=g), torch.rand(n, generator=g)
    return idx, x_t, t, module.teacher_condition(module._encoded(idx))


def _by_hand(module: StepDistillModule, x_t, t, tcond, w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v_u, v_c, v_u + w (v_c - v_u)): the teacher called once per branch, the null built from its encoding."""
    teacher, n = module.discriminator.teacher, len(x_t)
    null = {k: Encoded(e.tokens.expand(n, -1, -1), e.pooled.expand(n, -1), e.mask.expand(n, -1))
            for k, e in teacher_null().items()}
    ncond = sd3_teacher_condition(null, ["clip"], 32)
    with torch.no_grad():
        v_c = teacher(x_t, t, tcond["context"], tcond["pooled"]).velocity
        v_u = teacher(x_t, t, ncond["context"], ncond["pooled"]).velocity
    return v_u, v_c, v_u + w * (v_c - v_u)


def test_guided_teacher_target_equals_the_cfg_combination_by_hand():
    module = make_module(synthetic_data(n=4), teacher_guidance=3.0)
    _, x_t, t, tcond = _inputs(module)
    v_u, v_c, guided = _by_hand(module, x_t, t, tcond, 3.0)
    v = module.teacher_velocity(x_t, t, tcond)
    assert torch.allclose(v, guided, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(v, v_c, atol=1e-3)  # the guidance is not a no-op here
    unguided = make_module(synthetic_data(n=4), teacher_guidance=1.0)
    assert torch.allclose(unguided.teacher_velocity(x_t, t, tcond), v_c, atol=1e-6)


def test_kd_targets_use_the_cached_pairs_and_the_guided_teacher_online():
    data = synthetic_data(n=4)
    guided, plain = make_module(data, teacher_guidance=2.5), make_module(data, teacher_guidance=1.0)
    idx, _, _, tcond = _inputs(guided)
    b, latent = data.select(idx), data.latent[idx]
    t_c, noise_c, v_cached = plain._kd_targets(b, latent, torch.Generator().manual_seed(7), tcond)
    t_g, noise_g, v_g = guided._kd_targets(b, latent, torch.Generator().manual_seed(7), tcond)
    assert torch.equal(t_c, t_g) and torch.equal(noise_c, noise_g)  # the same cached (t, noise) pair
    k = [int(torch.nonzero(data.t[i] == t_c[i])[0]) for i in range(4)]
    assert torch.equal(v_cached, torch.stack([data.v[i, k[i]] for i in range(4)]))  # w = 1: the cached v_c
    x_t = (1 - t_g.view(-1, 1, 1, 1)) * latent + t_g.view(-1, 1, 1, 1) * noise_g
    assert torch.allclose(v_g, _by_hand(guided, x_t, t_g, tcond, 2.5)[2], atol=1e-5, rtol=1e-4)


def test_guidance_without_the_teacher_null_is_refused():
    student, conditioner = student_and_conditioner()
    cfg = StepDistillConfig(teacher_guidance=2.0, discriminator={"feature_layers": [0, -1], "head_width": 8})
    with pytest.raises(ValueError, match="teacher_null"):
        StepDistillModule(PRESET, cfg, synthetic_data(n=4), CACHE, teacher=tiny_teacher(), student=student,
                          conditioner=conditioner)


def test_one_ema_over_unet_and_conditioner_saved_as_a_pair_with_the_raw_pair_beside(tmp_path):
    module = make_module(synthetic_data(n=4))
    assert module.ema.names() == ["student", "conditioner"] and module.ema.decay == decay_for_run(4)
    assert make_module(synthetic_data(n=4), ema_decay=0.95).ema.decay == 0.95
    student, conditioner = student_and_conditioner()
    result = fit_distill(PRESET, cfg(steps=3, checkpoint_every=0), synthetic_data(), CACHE, tmp_path / "state",
                         teacher=tiny_teacher(), student=student, conditioner=conditioner, teacher_null=teacher_null())
    m = result["module"]
    assert any(not torch.equal(a, b) for a, b in zip(m.conditioner.parameters(), conditioner.parameters()))
    state = load_file(str(latest_state(tmp_path / "state") / "modules.safetensors"))
    ema_cond = {k[len("ema/conditioner."):]: v for k, v in state.items() if k.startswith("ema/conditioner.")}
    assert ema_cond and all(torch.equal(v, m.ema_conditioner.state_dict()[k]) for k, v in ema_cond.items())
    paths = save_distilled(m, tmp_path / "out")
    saved = load_file(paths["conditioner"])
    assert all(torch.equal(v, m.ema_conditioner.state_dict()[k]) for k, v in saved.items())
    assert any(not torch.equal(v, m.conditioner.state_dict()[k]) for k, v in saved.items())  # EMA, not raw
    raw = load_file(paths["conditioner_raw"])
    assert all(torch.equal(v, m.conditioner.state_dict()[k]) for k, v in raw.items())
    unet_raw = load_file(paths["unet_raw"])
    assert all(torch.equal(v, m.student.state_dict()[k]) for k, v in unet_raw.items())


class Metrics(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_weight_change_and_discriminator_accuracy_are_logged_and_returned(tmp_path):
    rec = Metrics()
    result = run(synthetic_data(), tmp_path / "state", steps=3, checkpoint_every=0, callbacks=[rec])
    assert all({"weights/rel_change_g", "weights/rel_change_ema", "d/acc_real", "d/acc_fake"} <= set(r)
               for r in rec.rows)
    assert all(0 <= r["d/acc_real"] <= 1 and 0 <= r["d/acc_fake"] <= 1 for r in rec.rows)
    m, metrics = result["module"], result["metrics"]
    start, _ = student_and_conditioner()
    raw = [p for p in m.student.parameters() if p.requires_grad]
    first = [p for p in start.parameters() if p.requires_grad]
    n_unet = len(first)
    assert metrics["generator_rel_change"] == pytest.approx(
        relative_change(m.start_weights, m.generator_parameters()))
    assert relative_change(first, raw) == pytest.approx(relative_change(m.start_weights[:n_unet], raw))
    assert metrics["generator_rel_change"] > 0 and metrics["ema_rel_change"] > 0
    assert rec.rows[-1]["weights/rel_change_g"] == pytest.approx(metrics["generator_rel_change"], rel=1e-6)
    assert 0 <= metrics["d_acc_real"] <= 1 and 0 <= metrics["d_acc_fake"] <= 1


def test_default_rates_move_the_weights_far_more_than_the_old_ones(tmp_path):
    c = StepDistillConfig()
    assert 1e-4 <= c.lr_g <= 3e-4 and 1e-4 <= c.lr_d <= 3e-4 and c.warmup_steps > 0
    assert c.ema_decay == 0 and c.ema() == decay_for_run(c.steps) and c.teacher_guidance > 1
    kw = dict(steps=4, checkpoint_every=0, warmup_steps=0, discriminator={"feature_layers": [0, -1], "head_width": 8})
    new = run(synthetic_data(), tmp_path / "new", lr_g=c.lr_g, lr_d=c.lr_d, **kw)["metrics"]["generator_rel_change"]
    old = run(synthetic_data(), tmp_path / "old", lr_g=1e-5, lr_d=1e-4, **kw)["metrics"]["generator_rel_change"]
    assert new > 5 * old, (new, old)
