"""Tasks of the step-distillation stage: fetch the pretrained student and the teacher bundle, train
the few-step student adversarially (SPEC 6), upload checkpoints and the distilled student, log to
MLflow through Lightning's logger."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from snapgen_model.artifacts.student import WEIGHTS
from snapgen_model.distill.cache import CacheConfig
from snapgen_model.training.distill_steps import (
    StepDistillConfig,
    fit_distill,
    load_distill_teacher,
    load_pretrained_student,
    save_distilled,
)
from tasks.cache import local_folder
from tasks.defaults import compute_task_options, io_task_options
from tasks.preview import preview_callback
from tasks.keys import content_key
from tasks.progress import training_progress
from tasks.pretrain import _uploader, storage, training_data, upload_with_retry
from tasks.student import write_student_card
from tasks.settings import get_settings

@task(name="fetch-model-folder", **io_task_options())
def fetch_folder(uri: str, required: tuple[str, ...] = ()) -> str:
    """A local copy of a model folder (file:// as is, s3:// downloaded once), checked for `required` files."""
    folder = local_folder(uri)
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{uri}: missing {missing} (expected a pretrained student folder with {list(required)})")
    return str(folder)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(cache_manifest: dict, student_dir: str, bundle_uri: str, cfg: StepDistillConfig) -> str:
    student = [file_digest(Path(student_dir, f)) for f in WEIGHTS]
    return content_key([cache_manifest["key"], student, bundle_uri, cfg.to_dict()], 16)


@task(name="distill-student", **compute_task_options())
def distill_student(cache_dir: str, cache_manifest: dict[str, Any], student_dir: str, bundle_dir: str,
                    bundle_uri: str, cfg: StepDistillConfig, resume: str = "latest") -> dict[str, Any]:
    """Train the N-step student to `cfg.steps` (resuming the latest checkpoint) and save it; `cfg` comes
    parsed from the flow's parameters (`DistillParams.config`). With
    several devices or nodes the ranks run through the launcher (`tasks.launch`): rank 0 logs to this
    stage's MLflow run, uploads the checkpoints and saves the EMA student, as this process does alone."""
    from tasks.lineage import lineage_tags
    from tasks.metric_log import lightning_logger
    from tasks.tracking import start_run

    settings = get_settings()
    key = run_key(cache_manifest, student_dir, bundle_uri, cfg)
    store = storage()
    base = store.join(settings.storage_root, "runs", f"distill-{key}")
    state_root = Path(settings.home) / "runs" / f"distill-{key}" / "state"
    preset, unet, conditioner = load_pretrained_student(student_dir)
    cache_cfg = CacheConfig.from_dict(cache_manifest["config"])
    encoders = [e["name"] for e in cache_manifest["encoders"]]
    tags = lineage_tags(dataset_hash=cache_manifest["dataset_hash"], teacher_id=cache_manifest["bundle_id"],
                        config_hash=key) | {"snapgen.stage": "distill_steps", "snapgen.checkpoints": base}
    with start_run(settings, f"distill student {cfg.sampler_steps}-step", tags=tags, system_metrics=True) as run, \
            tempfile.TemporaryDirectory(prefix="distilled-") as tmp:
        run.log_params({"preset": preset.name, "distill": cfg.to_dict(), "sampler": cfg.sampler().to_dict()})
        if cfg.devices * cfg.num_nodes > 1:
            from tasks.launch import run_launched

            spec = {"stage": "distill", "distill": cfg.to_dict(), "cache": cache_manifest["config"],
                    "cache_dir": cache_dir, "encoders": encoders, "encoder_specs": cache_manifest["encoders"],
                    "student_folder": student_dir, "bundle_folder": bundle_dir, "state_root": str(state_root),
                    "resume": resume, "mlflow_run_id": run.run_id, "checkpoint_uri": store.join(base, "checkpoints"),
                    "student_dir": tmp}
            if cfg.data == "stream":  # each rank streams through the storage layer
                spec |= {"cache_uri": cache_dir, "stream_source": "tasks.pretrain:stream_source"}
            result = run_launched(spec, "distill")
            paths, sampler, skipped = result["student_files"], result["sampler"], result.get("data_skipped") or {}
        else:
            teacher, teacher_null = load_distill_teacher(bundle_dir, cfg, cache_cfg, cache_manifest["encoders"])
            data = training_data(cache_dir, encoders, cfg.data)
            preview = preview_callback(cache_manifest, preset, run, cfg.sample_every)
            result = fit_distill(preset, cfg, data, cache_cfg, state_root,
                                 teacher=teacher, student=unet, conditioner=conditioner, teacher_null=teacher_null,
                                 loggers=[lightning_logger(settings, run.run_id)],
                                 upload=_uploader(store, store.join(base, "checkpoints"), cfg.keep_checkpoints),
                                 resume=resume,
                                 callbacks=[*([preview] if preview else []), training_progress("distill", cfg.steps)])
            module = result.pop("module")
            skipped = result.get("data_skipped", data.skipped)
            paths, sampler = save_distilled(module, tmp), module.preset.sampler.to_dict()
        run.log_metrics({f"data/{k}": v for k, v in skipped.items()}, step=0)  # corrupt cache data left out
        final = {f"final/{k}": float(v) for k, v in result["metrics"].items() if v is not None}
        run.log_metrics(final, step=int(result["step"]))  # weight change (raw, EMA), D accuracy over the run
        for p in paths.values():
            upload_with_retry(store, Path(p), store.join(base, "student", Path(p).name))
        out = {"key": key, "step": result["step"], "mlflow_run_id": run.run_id,
               "checkpoints": store.join(base, "checkpoints"), "nonfinite_total": result.get("nonfinite_total"),
               "data_skipped": skipped, "metrics": result["metrics"], "sampler": sampler,
               "student": {n: store.join(base, "student", Path(p).name) for n, p in paths.items()}}
        out["student_uri"] = write_student_card(store, store.join(base, "student"), cache_manifest, "distill_steps",
                                                key, run.run_id)
        run.log_dict(out, "distill_result.json")
        return out
