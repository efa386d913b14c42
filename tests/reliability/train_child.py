"""Training child process for the kill -9 tests: ``python -m tests.reliability.train_child SPEC.json``.

It runs the same library entry points the product runs (``fit`` for pretraining over a cache
folder read by ``load_cache_folder``, as ``snapgen_model.training.launch`` does; ``fit_distill``
for step distillation) with one extra callback that appends the finished step to a progress file
(after the checkpoint callback has run), so the parent knows how far the run got when it was
killed. ``throttle_s`` sleeps after each step to give the parent a window to kill mid-run; it
changes no numbers (all randomness is seeded by step).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

TOKENS, POOLED, CONTEXT = 24, 32, 32


def write_cache(folder: Path, n: int = 8, targets: int = 2) -> Path:
    """A cache folder in the caching stage's on-disk format (two shards; tests/fixtures/caches.py)."""
    from tests.fixtures.caches import synthetic_cache

    return synthetic_cache(folder, n=n, targets=targets, shards=2, pooled=POOLED)


def tiny_teacher():
    """A random 2-block SD3 transformer (8x8x16 latents), the discriminator backbone."""
    from tests.fixtures.memory_data import tiny_teacher as build

    return build(context=CONTEXT, pooled=POOLED)


def teacher_null():
    """A fixed stand-in for the teacher text encoder's empty-prompt encoding (the guided KD target's null)."""
    from snapgen_model.distill.text import Encoded

    g = torch.Generator().manual_seed(5)
    return {"clip": Encoded(torch.randn(1, 6, TOKENS, generator=g), torch.randn(1, POOLED, generator=g), torch.ones(1, 6))}


def student_and_conditioner(preset):
    from snapgen_model.distill.text import TextConditioner, TextConditionerConfig
    from snapgen_model.nn.unet import SnapGenUNet

    torch.manual_seed(0)
    return SnapGenUNet(preset.unet), TextConditioner(TextConditionerConfig(width=CONTEXT, pooled_dim=POOLED),
                                                     {"clip": (TOKENS, POOLED)})


def progress_callback(path: str | None, throttle_s: float):
    import lightning.pytorch as pl

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if path:
                with open(path, "a") as f:
                    f.write(f"{pl_module.current_step()}\n")
                    f.flush()
            if throttle_s:
                time.sleep(throttle_s)

    return Progress()


def run(spec: dict[str, Any], callbacks: tuple = (), loggers: list | None = None) -> dict[str, Any]:
    """Train as ``spec`` says; returns the fit result (without the module)."""
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset
    from snapgen_model.training.data import load_cache_folder

    preset = get_preset("toy-smoke")
    cache_cfg = CacheConfig(targets_per_sample=2)
    if (spec.get("extra") or {}).get("data") == "stream":  # the streaming data path: the folder is read, not loaded
        from snapgen_model.training.stream import StreamData

        data = StreamData.from_folder(spec["cache_dir"], ["clip"])
    else:
        data = load_cache_folder(spec["cache_dir"], ["clip"])
    callbacks = (*callbacks, progress_callback(spec.get("progress_path"), float(spec.get("throttle_s", 0.0))))
    if spec["stage"] == "pretrain":
        from snapgen_model.training.pretrain import PretrainConfig, fit

        cfg = PretrainConfig.from_dict({"steps": spec["steps"], "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                                        "checkpoint_every": spec["checkpoint_every"], "log_every": 1,
                                        "accelerator": "cpu", "kd": {"feature_kd": False}} | spec.get("extra", {}))
        result = fit(preset, cfg, data, cache_cfg, spec["state_root"], callbacks=callbacks, loggers=loggers)
    else:
        from snapgen_model.training.distill_steps import StepDistillConfig, fit_distill

        cfg = StepDistillConfig.from_dict({"steps": spec["steps"], "batch_size": 4, "lr_g": 1e-3, "lr_d": 1e-3,
                                           "sampler_steps": 2, "checkpoint_every": spec["checkpoint_every"],
                                           "log_every": 1, "accelerator": "cpu",
                                           "discriminator": {"feature_layers": [0, -1], "head_width": 8}}
                                          | spec.get("extra", {}))
        student, conditioner = student_and_conditioner(preset)
        result = fit_distill(preset, cfg, data, cache_cfg, spec["state_root"], teacher=tiny_teacher(),
                             student=student, conditioner=conditioner, teacher_null=teacher_null(),
                             callbacks=callbacks, loggers=loggers)
    result.pop("module", None)
    return result


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    if spec.get("result_path"):
        Path(spec["result_path"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
