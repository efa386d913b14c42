"""Class-conditional pretraining (snapgen-in1k-256 style) at toy scale: cached latents + integer
labels, label dropout to the null label for CFG, the task loss, KD terms only from cached
class-conditional teacher targets (else task only, with a log line saying why)."""
from __future__ import annotations

import io
import logging

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from snapgen_model.distill.cache import CacheConfig, cache_batch, load_npy
from snapgen_model.presets import get_preset
from snapgen_model.training.data import load_cache_folder
from snapgen_model.training.pretrain import PretrainConfig, fit, save_student
from snapgen_model.training.stream import StreamData
from tests.fixtures.training import StopAt, same, weights
from tests.unit.test_stream_data import sample, write_cache

CLASSES = 4
PRESET = get_preset("toy-smoke", ["task=class-conditional", "unet.conditioning=class", f"unet.num_classes={CLASSES}"])
TEXT_TARGETS, CLASS_TARGETS = CacheConfig(targets_per_sample=2), CacheConfig(targets_per_sample=2,
                                                                              target_condition="class")



def label(value: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(value, dtype=np.int64))
    return buf.getvalue()


def labelled_cache(folder, n: int = 8, labels=None):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        s = sample(f"k{i:04d}", rng)
        s["label.npy"] = label(labels[i] if labels is not None else i % CLASSES)
        rows.append(s)
    return write_cache(folder, [rows[: n // 2], rows[n // 2:]])


def cfg(**kw) -> PretrainConfig:
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=1, accelerator="cpu",
                kd={"feature_kd": False})
    return PretrainConfig.from_dict(base | kw)


class Logged(pl.Callback):
    def __init__(self):
        self.keys = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys |= set(trainer.callback_metrics)


def test_cached_labels_load_on_both_paths(tmp_path):
    folder = labelled_cache(tmp_path / "c")
    data = load_cache_folder(folder, ["clip"])
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [i % CLASSES for i in range(8)]
    assert data.select(torch.tensor([5, 2])).labels.tolist() == [1, 2]
    assert StreamData.from_folder(folder, ["clip"]).reference.labels.tolist() == [0]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_text_conditioned_targets_train_task_only_with_a_log_line(tmp_path, caplog, mode):
    folder = labelled_cache(tmp_path / "c")
    data = load_cache_folder(folder, ["clip"]) if mode == "memory" else StreamData.from_folder(folder, ["clip"])
    logged = Logged()
    with caplog.at_level(logging.WARNING, logger="snapgen_model.training.pretrain"):
        result = fit(PRESET, cfg(data=mode), data, TEXT_TARGETS, tmp_path / "s", callbacks=[logged])
    assert "task loss only, no KD terms (the cached teacher targets are text-conditioned" in caplog.text
    assert "task loss only" in result["kd_note"] and result["step"] == 4
    assert "loss/task" in logged.keys and not any(k.startswith(("loss/out", "scale/")) for k in logged.keys)
    module = result["module"]
    assert module.conditioner is None and "conditioner" not in module.trainable_modules()


def test_class_conditional_targets_add_the_kd_terms(tmp_path, caplog):
    logged = Logged()
    with caplog.at_level(logging.INFO, logger="snapgen_model.training.pretrain"):
        result = fit(PRESET, cfg(), load_cache_folder(labelled_cache(tmp_path / "c"), ["clip"]), CLASS_TARGETS,
                     tmp_path / "s", callbacks=[logged])
    assert "KD from 2 cached class-conditional teacher targets" in caplog.text and "KD from" in result["kd_note"]
    assert {"loss/task", "loss/out", "scale/out_ratio_mean"} <= logged.keys


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_label_dropout_trains_the_null_label(tmp_path, dropout):
    """Dropout 0: the null label's embedding never trains; dropout 1: only the null label trains."""
    result = fit(PRESET, cfg(label_dropout=dropout, checkpoint_every=0), load_cache_folder(labelled_cache(tmp_path / "c"),
                                                                                          ["clip"]),
                 TEXT_TARGETS, tmp_path / "s")
    torch.manual_seed(0)
    from snapgen_model.nn.unet import SnapGenUNet

    init = SnapGenUNet(PRESET.unet).class_embed.weight
    trained = result["module"].student.class_embed.weight.detach()
    moved = [not torch.equal(init[c], trained[c]) for c in range(CLASSES + 1)]
    assert moved == ([True] * CLASSES + [False] if dropout == 0.0 else [False] * CLASSES + [True])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_class_conditional_resume_is_bitwise_identical(tmp_path, mode):
    folder = labelled_cache(tmp_path / "c")
    load = (lambda: load_cache_folder(folder, ["clip"])) if mode == "memory" else \
        (lambda: StreamData.from_folder(folder, ["clip"]))
    c = cfg(data=mode, label_dropout=0.5)
    fit(PRESET, c, load(), CLASS_TARGETS, tmp_path / "full")
    assert fit(PRESET, c, load(), CLASS_TARGETS, tmp_path / "part", callbacks=[StopAt(2)])["step"] == 2
    assert fit(PRESET, c, load(), CLASS_TARGETS, tmp_path / "part")["step"] == 4
    for name in ("modules.safetensors", "optimizer.safetensors"):
        assert same(weights(tmp_path / "full", name), weights(tmp_path / "part", name)), name


def test_saved_student_is_the_class_conditional_unet(tmp_path):
    from snapgen_model.storage.checkpoint import load_model, read_preset

    result = fit(PRESET, cfg(steps=1, checkpoint_every=0), load_cache_folder(labelled_cache(tmp_path / "c"), ["clip"]),
                 TEXT_TARGETS, tmp_path / "s")
    paths = save_student(result["module"], tmp_path / "out")
    assert set(paths) == {"unet", "unet_raw"} and read_preset(paths["unet"]).unet.conditioning == "class"
    unet = load_model(paths["unet"])
    v = unet(torch.zeros(2, 16, 8, 8), torch.tensor([0.3, 0.7]), labels=torch.tensor([1, CLASSES]))
    assert v.shape == (2, 16, 8, 8)


def test_errors_name_the_problem(tmp_path):
    plain = write_cache(tmp_path / "plain", [[sample(f"k{i}", np.random.default_rng(i)) for i in range(4)]])
    with pytest.raises(ValueError, match="needs class labels in the cache"):
        fit(PRESET, cfg(), load_cache_folder(plain, ["clip"]), TEXT_TARGETS, tmp_path / "a")
    with pytest.raises(ValueError, match="mode=online: the online teacher is text-conditioned"):
        fit(PRESET, cfg(mode="online"), load_cache_folder(labelled_cache(tmp_path / "c"), ["clip"]), TEXT_TARGETS,
            tmp_path / "b", teacher=object())
    wide = labelled_cache(tmp_path / "w", labels=[0, 1, 2, 9, 0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"class labels out of range \[0, 4\).*unet.num_classes"):
        fit(PRESET, cfg(batch_size=8), load_cache_folder(wide, ["clip"]), TEXT_TARGETS, tmp_path / "c2")


class ClassTeacher(torch.nn.Module):
    """A stand-in class-conditional teacher: v = x * (1 + label) (the cache's `teacher(x, t, labels=)` protocol)."""

    def forward(self, x, t, labels):
        from types import SimpleNamespace

        return SimpleNamespace(velocity=x * (1 + labels.view(-1, 1, 1, 1).float()), features={})


def test_caching_stores_labels_and_class_conditional_targets():
    class VAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def encode(self, x):
            return torch.nn.functional.avg_pool2d(x, 4).repeat(1, 6, 1, 1)[:, :16] * self.w

    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    members = cache_batch(["a", "b", "c"], images, ["", "", ""], vae=VAE(), encoders={}, teacher=ClassTeacher(),
                          cfg=CacheConfig(targets_per_sample=1, target_condition="class", feature_dtype="float32"),
                          labels=[0, 2, 3])
    assert [int(load_npy(m["label.npy"])) for m in members] == [0, 2, 3]
    from snapgen_model.diffusion.flow import interpolate
    from snapgen_model.distill.cache import draw_pair

    latent = torch.from_numpy(load_npy(members[1]["latent.npy"]))
    t, noise = draw_pair("b", 0, latent.shape, CacheConfig(target_condition="class"))
    expected = interpolate(latent[None], noise[None], t.view(1))[0] * 3
    assert torch.allclose(torch.from_numpy(load_npy(members[1]["v0.npy"])), expected, atol=1e-5)
    with pytest.raises(ValueError, match="every sample needs a class label"):
        cache_batch(["a"], images[:1], [""], vae=VAE(), encoders={}, teacher=ClassTeacher(),
                    cfg=CacheConfig(targets_per_sample=1, target_condition="class"))
