"""The student-pretraining recipe: K cached KD pairs drawn per sample and step with a fresh task pair,
the KD levels a run trains (said in its log and tags), one EMA over UNet + conditioner (saved with
the raw pair beside it), and the online teacher conditioned on every text encoder (CLIP + T5)."""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch

from snapgen_model.distill.cache import CacheConfig, draw_pair
from snapgen_model.presets import get_preset
from snapgen_model.training.data import CachedData, global_batch_indices
from snapgen_model.training.ema import decay_for_run
from snapgen_model.training.pretrain import PretrainConfig, fit, save_student
from snapgen_model.training.state import latest_state
from tests.fixtures import memory_data
from tests.fixtures.training import StopAt

PRESET = get_preset("toy-smoke")
K = 8
CACHE = CacheConfig(targets_per_sample=K)
LOGGER = "snapgen_model.training.pretrain"


def synthetic_data(n: int = 4, k: int = K, feat: bool = True, t5: bool = False) -> CachedData:
    """A cache in the caching stage's layout: pair j of sample `key` is `draw_pair(key, j)`."""
    return memory_data.synthetic_data(CACHE, n, k, width=32, pooled=32, feat=feat, t5=t5)


def cfg(**kw) -> PretrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=0, log_every=1, accelerator="cpu",
                kd={"student_feature": "up1"})
    return PretrainConfig.from_dict(base | kw)


class StudentInputs(pl.Callback):
    """Every student forward's (step, x_t, t) during training."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        def record(module, args):
            self.calls.append((pl_module.current_step(), args[0].detach().clone(), args[1].detach().clone()))
        pl_module.student.register_forward_pre_hook(record)


# ---------------------------------------------------------------- 1. K cached pairs, a fresh task pair
@pytest.mark.parametrize("preset", ["toy-smoke", "toy", "toy-gpu"])
def test_toy_pipeline_presets_cache_k_pairs_and_the_features_feature_kd_needs(preset):
    """Cached KD: K >= 8 pairs per image and the features feature KD needs. Online KD (the `toy` demo
    since 2026-12-06): the teacher runs on every step's own pair, so nothing is cached for it."""
    from flows.pipeline_config import build_config

    pipeline = build_config(preset)
    cache = CacheConfig().with_overrides(pipeline.cache.overrides)
    pre = PretrainConfig().with_overrides(pipeline.pretrain.train)
    kd = pre.kd
    if pre.mode == "online":
        assert cache.targets_per_sample == 0 and not cache.store_features
    else:
        assert cache.targets_per_sample >= 8
        assert cache.store_features == (kd.feature_kd and kd.combine != "task_only")
    # the demo and the quality run: multi-level KD
    assert preset == "toy-smoke" or (kd.feature_kd and kd.output_kd and kd.combine != "task_only")


def test_kd_pair_is_drawn_among_the_k_cached_pairs_and_the_task_pair_is_fresh(tmp_path):
    data = synthetic_data()
    spy = StudentInputs()
    fit(PRESET, cfg(steps=6, encoder_dropout=0.0), data, CACHE, tmp_path / "a", callbacks=[spy])
    assert len(spy.calls) == 6  # one batched forward per step: rows [KD pair; task pair]
    cached = {float(v): (i, j) for i, row in enumerate(data.t) for j, v in enumerate(row)}
    drawn: dict[int, set[int]] = {}
    task_t: dict[int, list[float]] = {}
    for step, x_t, t in spy.calls:
        assert x_t.shape[0] == 8 and t.shape == (8,)
        rows = global_batch_indices(len(data), 4, step, 0).tolist()
        for r, i in enumerate(rows):
            owner, pair = cached[float(t[r])]  # a KD row: one of this sample's own cached pairs ...
            assert owner == i
            _, noise = draw_pair(data.keys[i], pair, data.latent.shape[1:], CACHE)
            want = (1 - t[r]) * data.latent[i] + t[r] * noise  # ... with that pair's own noise
            assert torch.allclose(x_t[r], want, atol=1e-6)
            drawn.setdefault(i, set()).add(pair)
            task = float(t[4 + r])  # the task row of the same sample: a fresh draw, not a cached pair
            assert task not in cached
            task_t.setdefault(i, []).append(task)
    assert all(len(pairs) >= 3 for pairs in drawn.values()), drawn  # 6 uniform draws among 8 pairs
    assert all(len(set(ts)) == len(ts) for ts in task_t.values())  # a new task t every step
    # reproducible: the same seed draws the same pairs and the same fresh (t, noise)
    again = StudentInputs()
    fit(PRESET, cfg(steps=6, encoder_dropout=0.0), data, CACHE, tmp_path / "b", callbacks=[again])
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(spy.calls, again.calls))


def test_resume_with_k_pairs_is_bitwise_identical(tmp_path):
    from safetensors.torch import load_file

    data, c = synthetic_data(), cfg(steps=6, checkpoint_every=3)
    fit(PRESET, c, data, CACHE, tmp_path / "full")
    fit(PRESET, c, data, CACHE, tmp_path / "part", callbacks=[StopAt(3)])
    assert fit(PRESET, c, data, CACHE, tmp_path / "part")["resumed_from"].endswith("step-00000003")
    a = load_file(str(latest_state(tmp_path / "full") / "modules.safetensors"))
    b = load_file(str(latest_state(tmp_path / "part") / "modules.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("ema/conditioner.") for k in a) and any(k.startswith("ema/student.") for k in a)


# ---------------------------------------------------------------- 2. the KD levels, said
@pytest.mark.parametrize("feat, kd, levels, warn", [
    (True, {}, "output+feature", False),
    (False, {}, "output", True),  # feature KD asked for, but the cache holds no features
    (True, {"feature_kd": False}, "output", False),
    (True, {"combine": "task_only"}, "none", False),
])
def test_a_run_says_which_kd_levels_it_trains(tmp_path, caplog, feat, kd, levels, warn):
    logged = set()

    class Keys(pl.Callback):
        def on_train_batch_end(self, trainer, *a):
            logged.update(trainer.callback_metrics)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = fit(PRESET, cfg(steps=1, kd={"student_feature": "up1", **kd}), synthetic_data(feat=feat), CACHE,
                     tmp_path, callbacks=[Keys()])
    assert result["kd_levels"] == levels and result["kd_levels_warning"] is warn
    record = next(r for r in caplog.records if r.getMessage().startswith("KD levels:"))
    assert record.levelno == (logging.WARNING if warn else logging.INFO) and not record.exc_info
    if warn:
        assert "cache.store_features=true" in record.getMessage()
    assert ("loss/feat" in logged) == ("feature" in levels) and ("loss/out" in logged) == ("output" in levels)


def test_kd_from_pairs_drawn_from_another_timestep_density_is_refused(tmp_path):
    """The task term draws t from the preset's flow and a_t divides by that density: cached pairs drawn
    from another density (a shift-3 preset on a shift-1 cache) are refused with both named; the same
    cache is fine with the matching density, online, or task-only."""
    import dataclasses

    from snapgen_model.configs import FlowMatchingConfig

    shifted = dataclasses.replace(PRESET, flow=FlowMatchingConfig(shift=3.0))
    with pytest.raises(ValueError, match=r"shift=1\.0.*cache\.flow.*shift=3\.0"):
        fit(shifted, cfg(steps=1), synthetic_data(), CACHE, tmp_path / "a")
    assert fit(shifted, cfg(steps=1, kd={"student_feature": "up1", "combine": "task_only"}), synthetic_data(),
               CACHE, tmp_path / "b")["step"] == 1
    cache3 = CacheConfig(targets_per_sample=K, flow=FlowMatchingConfig(shift=3.0))
    assert fit(shifted, cfg(steps=1), synthetic_data(), cache3, tmp_path / "c")["step"] == 1


def test_kd_levels_become_mlflow_tags():
    from tasks.pretrain import kd_tags

    tags = kd_tags({"kd_levels": "output", "kd_levels_note": "KD levels: output (feature KD requested ...)"})
    assert tags == {"snapgen.kd_levels": "output", "snapgen.kd_levels_note": "KD levels: output (feature KD requested ...)"}
    assert kd_tags({}) == {}


# ---------------------------------------------------------------- 3. one EMA over the saved student
def test_one_ema_over_unet_and_conditioner_tied_to_the_run_length(tmp_path):
    result = fit(PRESET, cfg(steps=5), synthetic_data(), CACHE, tmp_path / "tied")
    module = result["module"]
    assert module.ema.names() == ["student", "conditioner"]  # not the projector: it is not part of the student
    assert module.ema.decay == decay_for_run(5)
    raw, ema = module.conditioner.state_dict(), module.ema_conditioner.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # averaged, not a copy of the raw weights
    assert fit(PRESET, cfg(steps=1, ema_decay=0.5), synthetic_data(), CACHE, tmp_path / "x")["module"].ema.decay == 0.5


def test_saved_student_pairs_ema_unet_with_ema_conditioner_and_keeps_the_raw_pair(tmp_path):
    from snapgen_model.storage.checkpoint import load_model
    from snapgen_model.artifacts.student import load_conditioner

    module = fit(PRESET, cfg(steps=5), synthetic_data(), CACHE, tmp_path / "s")["module"]
    paths = save_student(module, tmp_path / "out")
    assert set(paths) == {"unet", "conditioner", "unet_raw", "conditioner_raw"}
    assert paths["unet"].endswith("unet_ema.safetensors") and paths["conditioner"].endswith("conditioner.safetensors")
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)  # noqa: E731
    assert same(load_model(paths["unet"]).state_dict(), module.ema_unet.state_dict())
    assert same(load_conditioner(paths["conditioner"]).state_dict(), module.ema_conditioner.state_dict())
    assert same(load_model(paths["unet_raw"]).state_dict(), module.student.state_dict())
    assert same(load_conditioner(paths["conditioner_raw"]).state_dict(), module.conditioner.state_dict())
    assert not same(load_conditioner(paths["conditioner"]).state_dict(), module.conditioner.state_dict())


# ---------------------------------------------------------------- 5. online teacher: CLIP + T5
def test_online_teacher_condition_has_every_text_encoder(tmp_path, tiny_bundle):
    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig
    from snapgen_model.distill.text import Encoded, sd3_teacher_condition

    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=str(tiny_bundle)))
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    data = synthetic_data(n=2, k=0, t5=True)
    cache = CacheConfig(targets_per_sample=0, teacher_clip_encoders=("clip",), teacher_t5_encoder="t5")
    result = fit(PRESET, cfg(steps=2, batch_size=2, mode="online"), data, cache, tmp_path, teacher=teacher)
    assert result["kd_levels"] == "output+feature"
    assert len(seen) == 2
    for step, context in enumerate(seen):
        rows = global_batch_indices(2, 2, step, 0)
        encoded = {e: Encoded(data.tokens[e][rows], data.pooled[e][rows] if e in data.pooled else None,
                              data.mask[e][rows]) for e in data.tokens}
        want = sd3_teacher_condition(encoded, ["clip"], 32, "t5")["context"]  # as the caching stage builds it
        assert context.shape == (2, 6 + 5, 32) and torch.equal(context, want)


def test_preview_renders_the_ema_pair(tmp_path):
    from snapgen_model.training.preview import PreviewCallback

    seen = []
    preview = PreviewCallback(lambda unet, cond, preset: seen.append((unet, cond)) or torch.zeros(1), lambda *a: None)
    module = fit(PRESET, cfg(steps=1), synthetic_data(), CACHE, tmp_path, callbacks=[preview])["module"]
    assert seen == [(module.ema_unet, module.ema_conditioner)]
