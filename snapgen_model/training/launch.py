"""Process entry point of a training run (pretraining, or step distillation with `"stage": "distill"`):
`python -m snapgen_model.training.launch SPEC.json`.

Lightning's DDP launcher re-executes this command once per local rank, and torchrun or a
Kubernetes Job runs it once per node (see docs/training.md), so multi-process and multi-node runs
go through the same code as the in-process call. The spec is plain JSON (no pickles):
{preset, overrides, pretrain, cache, cache_dir, encoders, state_root, result_path}, and for an
online run (`pretrain.mode=online`) the teacher bundle's local folder and feature layers. A distillation
spec has {stage: "distill", distill, cache, cache_dir, encoders, encoder_specs, student_folder,
bundle_folder, state_root, result_path}. Both take `resume`, `hooks` and `student_dir` (rank 0 saves the
student there).

With `pretrain.data = "stream"` the shards are streamed from `cache_dir` (a local folder), or, when
the spec names `stream_source` ("module:function", called with `cache_uri`, returning a
`ShardSource`), through the opener that factory builds: the task layer names its own, which reads
s3:// through the storage client this package does not import.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.data import load_cache_folder
from snapgen_model.training.pretrain import PretrainConfig, fit, online_teacher
from snapgen_model.training.stream import ShardSource, StreamData

if TYPE_CHECKING:
    from snapgen_model.training.distill_steps import StepDistillConfig


def training_data(spec: dict, cfg: PretrainConfig | StepDistillConfig):
    """CachedData (memory) or StreamData (stream) as the spec says; with `stage_caches` ({cache URI
    a stage names: its location}), {"": run cache, uri: data, ...}."""
    def load(where: str):
        if cfg.data == "memory":
            return load_cache_folder(where, spec["encoders"])
        factory = spec.get("stream_source")
        if factory:
            import importlib

            module, _, name = factory.partition(":")
            return StreamData(getattr(importlib.import_module(module), name)(where), spec["encoders"])
        return StreamData(ShardSource.from_folder(where), spec["encoders"])

    main = load(spec.get("cache_uri") or spec["cache_dir"] if cfg.data == "stream" else spec["cache_dir"])
    stages = spec.get("stage_caches") or {}
    return {"": main} | {name: load(where) for name, where in stages.items()} if stages else main


def _factory(name: str):
    """The callable `"module:function"` names (the task layer's, which this package does not import)."""
    import importlib

    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def run(spec: dict) -> dict:
    """Train the spec's stage ("pretrain", the default, or "distill") on this process's rank."""
    stage = spec.get("stage", "pretrain")
    if stage == "distill":
        return run_distill(spec)
    if stage != "pretrain":
        raise SystemExit(f"launch spec: unknown stage {stage!r}; choose pretrain or distill")
    return run_pretrain(spec)


def run_pretrain(spec: dict) -> dict:
    preset = get_preset(spec["preset"], spec.get("overrides", []))
    cfg = PretrainConfig.from_dict(spec["pretrain"])
    data = training_data(spec, cfg)
    teacher = online_teacher(cfg, spec.get("teacher_folder"), spec.get("feature_layers", [-1]))
    hooks = _factory(spec["hooks"])(spec) if spec.get("hooks") else {}
    result = fit(preset, cfg, data, CacheConfig.from_dict(spec["cache"]), spec["state_root"], teacher=teacher,
                 resume=spec.get("resume", "latest"), loggers=hooks.get("loggers"), upload=hooks.get("upload"),
                 callbacks=hooks.get("callbacks") or ())
    module = result.pop("module", None)
    # the student's modules, gathered on every rank when the run is sharded (collective), saved by rank 0
    parts = module.student_parts() if module is not None and spec.get("student_dir") else None
    if module is not None and module.global_rank == 0:
        if parts is not None:  # the EMA student, as the in-process path saves it
            from snapgen_model.training.pretrain import save_student

            result["student_files"] = save_student(module, spec["student_dir"], parts)
        if spec.get("result_path"):
            run_cache = data[""] if isinstance(data, dict) else data
            samples = len(run_cache) if cfg.data == "memory" else None  # a stream does not know its length up front
            out = result | {"world_size": module.trainer.world_size, "samples": samples}
            Path(spec["result_path"]).write_text(json.dumps(out, default=str))
    return result


def run_distill(spec: dict) -> dict:
    """Step distillation on this rank: the pretrained student folder, the teacher bundle folder (the
    discriminator's frozen backbone, the KD targets, and with teacher guidance its null condition from
    the bundle's text encoders `encoder_specs`), the cache; rank 0 saves the distilled student."""
    from snapgen_model.training.distill_steps import (
        StepDistillConfig,
        fit_distill,
        load_distill_teacher,
        load_pretrained_student,
        save_distilled,
    )

    cfg = StepDistillConfig.from_dict(spec["distill"])
    cache_cfg = CacheConfig.from_dict(spec["cache"])
    preset, unet, conditioner = load_pretrained_student(spec["student_folder"])
    teacher, null = load_distill_teacher(spec["bundle_folder"], cfg, cache_cfg, spec["encoder_specs"])
    data = training_data(spec, cfg)
    hooks = _factory(spec["hooks"])(spec) if spec.get("hooks") else {}
    result = fit_distill(preset, cfg, data, cache_cfg, spec["state_root"], teacher=teacher, student=unet,
                         conditioner=conditioner, teacher_null=null, resume=spec.get("resume", "latest"),
                         loggers=hooks.get("loggers"), upload=hooks.get("upload"), callbacks=hooks.get("callbacks") or ())
    module = result.pop("module")
    if module.global_rank == 0:
        if spec.get("student_dir"):
            result["student_files"] = save_distilled(module, spec["student_dir"])
        if spec.get("result_path"):
            out = result | {"world_size": module.trainer.world_size, "sampler": module.preset.sampler.to_dict()}
            Path(spec["result_path"]).write_text(json.dumps(out, default=str))
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m snapgen_model.training.launch SPEC.json")
    run(json.loads(Path(argv[0]).read_text()))


if __name__ == "__main__":
    main()
