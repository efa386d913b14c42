"""A pretraining run with `compile=true` resumes from its own checkpoints: the state holds the student's own
parameter names (not torch.compile's "_orig_mod." wrapper names), and states written that way before
2026-12-07 still load (the 16,000-step evidence student's last checkpoint was one)."""
from __future__ import annotations

import pytest
import torch

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.training.data import load_cache_folder
from snapgen_model.training.pretrain import PretrainConfig, fit
from snapgen_model.training.state import load_state, save_state
from tests.reliability.train_child import write_cache


def test_a_state_written_by_a_compiled_student_loads_into_the_plain_one(tmp_path):
    torch.manual_seed(0)
    unet = SnapGenUNet(get_preset("toy-smoke").unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p))
    opt = torch.optim.AdamW(unet.parameters())
    save_state(tmp_path / "s", modules={"student": torch.compile(unet)}, optimizer=opt, scheduler=None, step=3, extra={})
    fresh = SnapGenUNet(get_preset("toy-smoke").unet)
    load_state(tmp_path / "s", modules={"student": fresh}, optimizer=torch.optim.AdamW(fresh.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.slow
def test_a_compiled_run_resumes_from_its_checkpoint(tmp_path):
    data = load_cache_folder(write_cache(tmp_path / "cache"), ["clip"])
    common = {"batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "accelerator": "cpu",
              "compile": True, "kd": {"feature_kd": False}}
    first = fit(get_preset("toy-smoke"), PretrainConfig.from_dict(common | {"steps": 2}), data,
                CacheConfig(targets_per_sample=2), tmp_path / "state")
    assert first["step"] == 2
    from safetensors import safe_open

    with safe_open(first["state"] + "/modules.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]  # the student's own names
    resumed = fit(get_preset("toy-smoke"), PretrainConfig.from_dict(common | {"steps": 4}), data,
                  CacheConfig(targets_per_sample=2), tmp_path / "state")
    assert resumed["step"] == 4 and resumed["resumed_from"].endswith("step-00000002")


@pytest.mark.slow
def test_an_online_compiled_run_compiles_the_teacher_and_learns_the_same(tmp_path, tiny_bundle):
    """`compile=true` with the teacher online compiles the teacher's forward as well as the student (about a fifth
    of an online step on CPU, bench/RESULTS.md), and the compiled run's first losses match the eager run's."""
    from lightning.pytorch import Callback

    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig
    from tests.fixtures import memory_data

    cache = CacheConfig(targets_per_sample=0)
    data = memory_data.synthetic_data(cache, 4, 0, width=32, pooled=32, feat=True)

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    runs = {}
    for compiled in (False, True):
        teacher = SD3Teacher.from_pretrained(TeacherConfig(path=str(tiny_bundle)))
        losses = Losses()
        conf = PretrainConfig.from_dict({"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 0,
                                         "log_every": 1, "accelerator": "cpu", "mode": "online", "compile": compiled,
                                         "kd": {"student_feature": "up1"}})
        result = fit(get_preset("toy-smoke"), conf, data, cache, tmp_path / f"run-{compiled}", teacher=teacher,
                     callbacks=[losses])
        runs[compiled] = (result["module"], losses.values)
    eager, compiled_run = runs[False][0], runs[True][0]
    assert not isinstance(eager.teacher, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled_run.teacher, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled_run.kd_levels == "output+feature"  # the run trains both KD levels on the teacher's outputs
    assert len(runs[True][1]) == 3
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)
