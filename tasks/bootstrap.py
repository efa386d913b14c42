"""Tasks of the toy teacher bootstrap (`flows/bootstrap.py`): thin wrappers over
`snapgen_model.training.bootstrap`, plus storage (the bundle under `<storage root>/teachers/<config hash>/`)
and MLflow (run, loss curves, diagnostics, sample grid, registered model `snapgen-toy-teacher`).

Models travel between tasks as folders in a local work directory (`<home>/bootstrap/<config hash>/`),
never as pickles (STYLE.md: no pickled code as checkpoints).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task

from snapgen_model.imaging import make_grid
from snapgen_model.training import bootstrap as bs
from tasks.defaults import compute_task_options, io_task_options
from tasks.settings import get_settings
from tasks.storage import storage
from tasks.lineage import lineage_tags
from tasks.registry import find_model_versions, register_model_version
from tasks.tracking import log_metric_series, start_run

MODEL_NAME = "snapgen-toy-teacher"
STAGE_TAG = "bootstrap-teacher"
PROGRESS_EVERY_S = 10.0  # seconds between progress log lines of a training phase


def device() -> str:
    """cuda when a GPU is present, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def workdir(config_hash: str) -> Path:
    """Local work folder of one bootstrap: `<home>/bootstrap/<config hash>/`."""
    return Path(get_settings().home) / "bootstrap" / config_hash


def state_dir(folder: str | Path) -> Path:
    """Resumable training state of the bundle folder `folder`: its sibling `<folder>-state/` (kept out of
    the bundle, which is published as it is)."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}-state")


def bundle_uri(config_hash: str) -> str:
    """Storage URI of the bundle of a config: `<storage root>/teachers/<config hash>`."""
    return storage().uri("teachers", config_hash)


def _reporter(phase_label: str):
    """A progress callback writing a log line at most every PROGRESS_EVERY_S seconds, and at the end."""
    logger, last = get_run_logger(), [0.0]

    def report(phase: str, step: int, total: int, info: dict[str, float]) -> None:
        now = time.monotonic()
        final = step >= total or (info["budget_s"] > 0 and info["elapsed_s"] >= info["budget_s"])
        if not final and now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        budget = f" of {info['budget_s']:.0f}" if info["budget_s"] > 0 else ""
        terms = " ".join(f"{k} {v:.4f}" for k, v in info.items() if k not in ("step", "elapsed_s", "budget_s"))
        logger.info("[%s] step %d/%d, %.0f%s s: %s", phase_label or phase, step, total, info["elapsed_s"], budget, terms)
    return report


@task(name="resolve-bootstrap-config", **compute_task_options(persist_result=False))
def resolve_config(preset: str, overrides: list[str]) -> dict[str, Any]:
    """The preset's config with overrides: {"config", "config_hash", "preset"}."""
    cfg = bs.get_bootstrap_config(preset, overrides)
    return {"config": cfg.to_dict(), "config_hash": cfg.content_hash(), "preset": preset}


@task(name="find-cached-teacher", **io_task_options(persist_result=False))
def find_cached_bundle(config_hash: str) -> dict[str, Any] | None:
    """The finished bundle of this config in storage ({"bundle_uri", "record"}), or None.
    A bundle counts only when its bundle.json (written last) exists."""
    store = storage()
    uri = bundle_uri(config_hash)
    record_uri = store.join(uri, bs.BUNDLE_FILE)
    if not store.exists(record_uri):
        return None
    return {"bundle_uri": uri, "record": store.read_json(record_uri)}


@task(name="find-registered-teacher", **io_task_options(persist_result=False))
def find_registered(config_hash: str) -> dict[str, str] | None:
    """The newest registered version of this config ({"version", "run_id", "source"}), or None."""
    found = find_model_versions(get_settings(), MODEL_NAME, "snapgen.config_hash", config_hash)
    return found[0] if found else None


@task(name="train-autoencoder", **compute_task_options(persist_result=False))
def train_autoencoder_task(config: dict[str, Any], folder: str) -> dict[str, Any]:
    """Train the toy AE; save it to `<folder>/vae`. Returns {"metrics", "curve"}. A rerun after an
    interruption reuses a finished AE of the same config (its result record is written last)."""
    cfg = bs.ToyBootstrapConfig.from_dict(config)
    record = state_dir(folder) / "autoencoder.json"
    if record.is_file() and (Path(folder) / "vae" / "config.json").is_file():
        done = json.loads(record.read_text())
        if done.get("config_hash") == cfg.content_hash():
            get_run_logger().info("autoencoder of config %s already trained in %s: reused", cfg.content_hash(), folder)
            return {"metrics": done["metrics"], "curve": done["curve"]}
    vae, result = bs.train_autoencoder(cfg, None, device(), _reporter("autoencoder"))
    vae.save_pretrained(Path(folder) / "vae")
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(".autoencoder.json.tmp")
    tmp.write_text(json.dumps({"config_hash": cfg.content_hash(), "metrics": result.metrics, "curve": result.curve}))
    tmp.replace(record)
    return {"metrics": result.metrics, "curve": result.curve}


@task(name="train-teacher", **compute_task_options(persist_result=False))
def train_teacher_task(config: dict[str, Any], folder: str, autoencoder: dict[str, Any]) -> dict[str, Any]:
    """Train the teacher + text encoder on the AE in `<folder>/vae`; save the bundle into `folder`."""
    from diffusers import AutoencoderKL

    from snapgen_model.distill.teacher import load_pretrained

    cfg = bs.ToyBootstrapConfig.from_dict(config)
    vae = load_pretrained(AutoencoderKL, str(Path(folder).resolve()), subfolder="vae").to(device())
    models, result = bs.train_teacher(cfg, None, vae, device(), _reporter("teacher"), checkpoint_dir=state_dir(folder))
    metrics = autoencoder["metrics"] | result.metrics
    curves = {"autoencoder": autoencoder["curve"], "teacher": result.curve}
    bs.save_bundle(folder, cfg, vae, models.transformer, models.text_model, models.tokenizer, metrics, curves)
    return {"metrics": result.metrics, "curve": result.curve}


@task(name="evaluate-teacher", **compute_task_options(persist_result=False))
def evaluate_teacher_task(folder: str) -> dict[str, Any]:
    """Load the bundle through the production adapters, sample and score it; write the grid PNG and the
    evaluation into bundle.json. Returns {"evaluation", "grid_path", "grid_prompts", "grid_seeds"}."""
    started = time.monotonic()
    bundle = bs.load_bundle(folder, device())
    evaluation = bs.evaluate_bundle(bundle) | {"seconds": 0.0}
    images, prompts, seeds = bs.sample_grid(bundle)
    captions = [p.removeprefix("a photo of ") for p in prompts]
    grid_path = Path(folder).with_name(f"{Path(folder).name}-eval") / "teacher_samples.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, cols=6, captions=captions).save(grid_path)
    evaluation["seconds"] = round(time.monotonic() - started, 2)
    bs.update_bundle_record(folder, evaluation=evaluation)
    return {"evaluation": evaluation, "grid_path": str(grid_path), "grid_prompts": prompts, "grid_seeds": seeds}


@task(name="publish-teacher-bundle", **io_task_options(persist_result=False))
def publish_bundle(folder: str, config_hash: str) -> str:
    """Upload the bundle folder to `<storage root>/teachers/<hash>/`, bundle.json last. Returns its URI."""
    store = storage()
    uri = bundle_uri(config_hash)
    store.delete(store.join(uri, bs.BUNDLE_FILE))  # unfinished until the new record lands
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in sorted(files, key=lambda p: p.name == bs.BUNDLE_FILE):
        store.upload_file(path, store.join(uri, path.relative_to(folder).as_posix()))
    return uri


def flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a.b": value} (NaN and non-numbers skipped)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out |= flat_numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj:
        out[prefix] = float(obj)
    return out


def _log_curves(run: Any, curves: dict[str, list[dict[str, float]]]) -> None:
    """Every loss term of every phase as a metric history: `<phase>/<term>` over steps."""
    for phase, points in curves.items():
        terms = [k for k in (points[0] if points else {}) if k not in ("step", "elapsed_s")]
        for term in terms:
            log_metric_series(run, f"{phase}/{term}", [(int(p["step"]), p[term]) for p in points])


@task(name="log-teacher-run", **io_task_options(persist_result=False))
def log_bootstrap_run(folder: str, uri: str, preset: str, grid: dict[str, Any]) -> dict[str, str]:
    """One MLflow run (params, loss curves, metrics, diagnostics, sample grid, bundle.json, the bundle's
    files) and a new version of registered model `snapgen-toy-teacher` whose source is that bundle."""
    settings = get_settings()
    record = bs.read_bundle_record(folder)
    config_hash = record["config_hash"]
    tags = lineage_tags(config_hash=config_hash) | {"snapgen.stage": STAGE_TAG, "snapgen.preset": preset,
                                                    "snapgen.bundle_uri": uri}
    with start_run(settings, f"bootstrap teacher {preset}", tags=tags) as run:
        run.log_params(record["config"] | {"preset": preset, "config_hash": config_hash, "bundle_uri": uri})
        _log_curves(run, record["curves"])
        run.log_metrics(flat_numbers(record["metrics"]) | flat_numbers(record.get("evaluation", {}), "eval"))
        run.log_artifact(grid["grid_path"], "samples")
        run.log_dict({"prompts": grid["grid_prompts"], "seeds": grid["grid_seeds"]}, "samples/grid_prompts.json")
        run.log_dict(record, "bundle.json")
        run.log_artifact(folder, "bundle")
        run_id = run.run_id
    version = register_model_version(settings, MODEL_NAME, f"runs:/{run_id}/bundle", run_id=run_id,
                                     tags=tags, description=f"toy teacher bundle ({preset}), stored at {uri}")
    return {"mlflow_run_id": run_id, "model_version": version}


def result_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a bundle record: training metrics and the evaluation's main numbers."""
    evaluation = record.get("evaluation", {})
    teacher = evaluation.get("teacher", {})
    summary = dict(record.get("metrics", {}))
    for key in ("colour_present", "shaped_fraction", "object_count_match", "objects_per_image"):
        if key in teacher:
            summary[key] = teacher[key]
    if "geneval" in teacher:
        summary["geneval_overall"] = teacher["geneval"]["overall"]
        summary["geneval_exact_count"] = teacher["geneval"]["exact_count"]
        summary |= {f"geneval_{k}": v for k, v in teacher["geneval"].get("splits", {}).items()}
    summary |= {f"reference_{row}": v["overall"] for row, v in evaluation.get("reference", {}).items()}
    summary["eval_seconds"] = evaluation.get("seconds")
    return json.loads(json.dumps(summary, default=float))


def bundle_summary(folder: str) -> dict[str, Any]:
    """`result_summary` of the bundle record in a local bundle folder."""
    return result_summary(bs.read_bundle_record(folder))


# ----------------------------------------------------------------------------- shipped releases

@task(name="verify-teacher-release", **io_task_options(persist_result=False, retries=0))
def verify_release_task(name: str) -> dict[str, Any]:
    """Check a shipped release's checksums (releases/index.json -> bundle.json -> every file).
    Returns {"folder", "config_hash", "record"}; LoadError naming the bad file otherwise."""
    from snapgen_model.training import release

    folder = release.verify_release(name)
    record = bs.read_bundle_record(folder)
    return {"folder": str(folder), "config_hash": record["config_hash"], "record": record}


@task(name="log-teacher-release", **io_task_options(persist_result=False))
def log_release_run(folder: str, uri: str, name: str) -> dict[str, str]:
    """One MLflow run for a shipped release (params, curves, metrics, card, pictures) and a version of
    `snapgen-toy-teacher` whose source is that run's copy of the release."""
    settings = get_settings()
    record = bs.read_bundle_record(folder)
    config_hash = record["config_hash"]
    tags = lineage_tags(config_hash=config_hash) | {"snapgen.stage": STAGE_TAG, "snapgen.preset": record.get("preset", ""),
                                                    "snapgen.bundle_uri": uri, "snapgen.release": name}
    with start_run(settings, f"register teacher release {name}", tags=tags) as run:
        run.log_params(record["config"] | {"release": name, "config_hash": config_hash, "bundle_uri": uri})
        _log_curves(run, record.get("curves", {}))
        run.log_metrics(flat_numbers(record.get("metrics", {})) | flat_numbers(record.get("evaluation", {}), "eval"))
        run.log_dict(record, "bundle.json")
        run.log_artifact(folder, "bundle")
        run_id = run.run_id
    version = register_model_version(settings, MODEL_NAME, f"runs:/{run_id}/bundle", run_id=run_id, tags=tags,
                                     description=f"shipped toy teacher release {name}, stored at {uri}")
    return {"mlflow_run_id": run_id, "model_version": version}
