"""Tasks of the pretraining stage: fetch the cache, train (in process or through the DDP launcher),
upload checkpoints and the student to storage, log to MLflow through Lightning's logger."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.data import load_cache_folder
from snapgen_model.training.pretrain import PretrainConfig, fit, online_teacher, save_student
from snapgen_model.training.stream import ShardSource, StreamData
from tasks.cache import local_folder
from tasks.defaults import compute_task_options, io_task_options
from tasks.preview import preview_callback
from tasks.progress import training_progress
from tasks.settings import get_settings
from tasks.keys import content_key
from tasks.storage import Storage, storage
from tasks.student import write_student_card


@task(name="fetch-cache", **io_task_options())
def fetch_cache(cache_uri: str, download: bool = True) -> tuple[str, dict[str, Any]]:
    """(cache location, cache manifest). `download`: a local folder (s3 caches are downloaded once
    under <home>/cache), for the in-memory data path; otherwise the URI as given (the streaming data
    path reads the shards where they are, see `stream_source`)."""
    if not download and "://" in cache_uri and not cache_uri.startswith("file://"):
        return cache_uri, storage().read_json(cache_uri.rstrip("/") + "/manifest.json")
    folder = local_folder(cache_uri)
    manifest = json.loads((folder / "manifest.json").read_text())
    return str(folder), manifest


class StoreOpener:
    """open_fn of a cache in storage: shard names relative to the cache URI, opened with
    `Storage.open_read` (one persistent client; s3:// bodies resume on broken connections)."""

    def __init__(self, store: Storage, base_uri: str) -> None:
        self.store, self.base = store, base_uri.rstrip("/")

    def __call__(self, name: str):
        return self.store.open_read(self.store.join(self.base, name))


def stream_source(location: str, store: Storage | None = None) -> ShardSource:
    """The cached shards to stream: a local folder read with plain files, or a URI (file:// or
    s3://) listed and read through the storage layer (the injected opener)."""
    if "://" not in location:
        return ShardSource.from_folder(location)
    from snapgen_model.training.data import manifest_counts

    store = store or storage()
    base = location.rstrip("/")
    prefix = store.join(base, "shards") + "/"
    names = [uri[len(base) + 1:] for uri in store.list(prefix) if uri.endswith(".tar")]
    manifest_uri = store.join(base, "manifest.json")
    manifest = store.read_json(manifest_uri) if store.exists(manifest_uri) else None
    return ShardSource(names, StoreOpener(store, base), manifest_counts(manifest), location)


def training_data(location: str, encoders: list[str], mode: str, stage_caches: dict[str, str] | None = None):
    """CachedData (memory: a local folder, loaded whole) or StreamData (stream: any location); with
    `stage_caches` ({cache URI a stage names: its location}), {"": run cache, uri: data, ...}."""
    def load(where: str):
        return load_cache_folder(where, encoders) if mode == "memory" else StreamData(stream_source(where), encoders)

    main = load(location)
    if not stage_caches:
        return main
    return {"": main} | {name: load(where) for name, where in stage_caches.items()}


def fetch_stage_caches(cfg: PretrainConfig) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """({cache URI a stage names: its location}, {uri: its manifest}): fetched as the run cache is
    (a local copy for the in-memory path, in place for the stream)."""
    locations, manifests = {}, {}
    for uri in sorted({s.cache for s in cfg.stages if s.cache}):
        locations[uri], manifests[uri] = fetch_cache.fn(uri, download=cfg.data == "memory")
    return locations, manifests


def run_key(cache_manifest: dict, preset: str, overrides: list[str], cfg: PretrainConfig,
            stage_manifests: dict[str, dict] | None = None) -> str:
    config = cfg.to_dict()
    if not config["init"]:  # random init, as before pretrain.init existed: earlier runs keep their key (and state)
        del config["init"]
    parts = [cache_manifest["key"], preset, overrides, config]
    if stage_manifests:  # the caches stages name are inputs too
        parts.append({name: m.get("key") for name, m in sorted(stage_manifests.items())})
    return content_key(parts, 16)


# Backoff of checkpoint/student uploads on top of botocore's own retries: about two minutes of
# object-store outage are ridden out (training waits); after that the run fails with a clear error
# and resumes from its complete local state on the next run.
UPLOAD_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)


def upload_with_retry(store: Storage, local: Path, uri: str, delays: tuple[float, ...] = UPLOAD_RETRY_DELAYS_S) -> None:
    """`store.upload_file` retried with exponential backoff (+ up to 50% jitter) on I/O errors."""
    import logging
    import random
    import time

    from tasks.defaults import is_io_error

    for attempt in range(len(delays) + 1):
        try:
            return store.upload_file(local, uri)
        except Exception as exc:
            if not is_io_error(exc):
                raise
            if attempt == len(delays):
                raise RuntimeError(f"upload of {local} to {uri} failed {attempt + 1} times (last: {exc}); the local "
                                   "copy is complete: re-run to resume and upload again") from None
            wait = delays[attempt] * (1 + random.random() / 2)
            logging.getLogger(__name__).warning("upload to %s failed (%s); retry %d/%d in %.1fs", uri, exc,
                                                attempt + 1, len(delays), wait)
            time.sleep(wait)


def _uploader(store: Storage, base_uri: str, keep: int, delays: tuple[float, ...] = UPLOAD_RETRY_DELAYS_S):
    """Upload a finished state folder; `state.json` goes last, so a checkpoint in storage without
    it is an unfinished upload, never a finished checkpoint. Then the stored copies keep the same
    retention as the local ones (`keep_checkpoints`): `prune_uploaded`."""
    from snapgen_model.training.state import STATE_FILE

    def upload(folder: Path) -> None:
        for f in sorted(folder.iterdir(), key=lambda p: (p.name == STATE_FILE, p.name)):
            upload_with_retry(store, f, store.join(base_uri, folder.name, f.name), delays)
        prune_uploaded(store, base_uri, keep)
    return upload


def prune_uploaded(store: Storage, base_uri: str, keep: int) -> list[str]:
    """Delete the stored checkpoints older than the newest `keep` finished ones (a `step-*` folder with its
    `state.json`), unfinished uploads among them; returns the folders deleted. A run's storage then holds
    `keep` full states, not one per `checkpoint_every` steps for ever (a full-size state is ~6 GB). Retention
    is housekeeping: a failed delete is logged and retried at the next checkpoint, never fails training."""
    import logging

    from snapgen_model.training.state import STATE_FILE

    prefix = base_uri.rstrip("/") + "/"
    try:
        objects = store.list(prefix)
        folders: dict[str, list[str]] = {}
        for uri in objects:
            name = uri[len(prefix):].split("/", 1)[0]
            if name.startswith("step-"):
                folders.setdefault(name, []).append(uri)
        finished = sorted(n for n, uris in folders.items() if any(u.endswith("/" + STATE_FILE) for u in uris))
        if len(finished) <= keep:
            return []
        oldest_kept = finished[-keep]
        stale = sorted(n for n in folders if n < oldest_kept)
        for name in stale:
            # state.json first: a half-deleted folder then reads as an unfinished upload, never as a checkpoint
            for uri in sorted(folders[name], key=lambda u: not u.endswith("/" + STATE_FILE)):
                store.delete(uri)
        return stale
    except Exception as exc:  # noqa: BLE001 - housekeeping must not stop a training run
        logging.getLogger(__name__).warning("could not prune old checkpoints under %s (%s): they stay until the next "
                                            "checkpoint", base_uri, exc)
        return []


def kd_tags(result: dict[str, Any]) -> dict[str, str]:
    """MLflow tags saying which KD levels a run trained: `snapgen.kd_levels` ("output", "output+feature",
    "none", ...) and `snapgen.kd_levels_note` (why: e.g. feature KD asked for, but no cached features)."""
    if not result.get("kd_levels"):
        return {}
    return {"snapgen.kd_levels": str(result["kd_levels"]), "snapgen.kd_levels_note": str(result.get("kd_levels_note", ""))[:4000]}


def log_kd_levels(result: dict[str, Any], run) -> None:
    """The KD levels of a finished `fit` in the flow log (a warning when fewer than asked for) and as tags."""
    tags = kd_tags(result)
    if not tags:
        return
    from prefect import get_run_logger

    logger = get_run_logger()
    (logger.warning if result.get("kd_levels_warning") else logger.info)(tags["snapgen.kd_levels_note"])
    run.set_tags(tags)


@task(name="train-student", **compute_task_options())
def train_student(cache_dir: str, cache_manifest: dict[str, Any], preset: str, overrides: list[str],
                  cfg: PretrainConfig, resume: str = "latest") -> dict[str, Any]:
    """Train to `cfg.steps` (resuming the latest checkpoint) and save the student: the EMA UNet with the
    EMA conditioner (what evaluation and export use), and the raw pair beside them. `cfg` comes parsed
    from the flow's parameters (`PretrainParams.config`); `overrides` are the preset's."""
    from tasks.lineage import lineage_tags
    from tasks.metric_log import lightning_logger
    from tasks.tracking import start_run

    settings = get_settings()
    stage_caches, stage_manifests = fetch_stage_caches(cfg)
    key = run_key(cache_manifest, preset, overrides, cfg, stage_manifests)
    store = storage()
    base = store.join(settings.storage_root, "runs", f"pretrain-{key}")
    state_root = Path(settings.home) / "runs" / f"pretrain-{key}" / "state"
    encoders = [e["name"] for e in cache_manifest["encoders"]]
    tags = lineage_tags(dataset_hash=cache_manifest["dataset_hash"], teacher_id=cache_manifest["bundle_id"],
                        config_hash=key) | {"snapgen.stage": "pretrain", "snapgen.checkpoints": base}
    if cfg.init:
        tags["snapgen.init"] = cfg.init
    with start_run(settings, f"pretrain student {preset}", tags=tags, system_metrics=True) as run:
        run.log_params({"preset": preset, "overrides": overrides, "pretrain": cfg.to_dict()})
        init = cfg.init
        from snapgen_model.training.state import latest_state

        if not (latest_state(state_root) if resume == "latest" else resume not in ("none", "")):
            cfg = local_init(cfg, cache_manifest)  # after the key: the run is named by the URI, not the local copy
        # (a resumed run loads its own state and never reads the init: it may be gone by then)
        student_tmp = tempfile.TemporaryDirectory(prefix="student-")
        saved: dict[str, str] | None = None  # the student's files, saved by the launched rank 0
        if cfg.devices * cfg.num_nodes > 1:
            # every rank logs through Lightning (rank 0 writes to this run), rank 0 uploads checkpoints and
            # saves the EMA student: the same outputs as the in-process path below
            result = _launch(cache_dir, cache_manifest, preset, overrides, cfg, state_root, encoders, stage_caches,
                             hooks={"mlflow_run_id": run.run_id, "checkpoint_uri": store.join(base, "checkpoints"),
                                    "student_dir": student_tmp.name}, resume=resume)
            module, skipped, saved = None, result.get("data_skipped", {}), result.get("student_files")
            log_kd_levels(result, run)
        else:
            data = training_data(cache_dir, encoders, cfg.data, stage_caches)
            student_preset = get_preset(preset, overrides)
            # previews render text prompts: none for a class-conditional student
            preview = (preview_callback(cache_manifest, student_preset, run, cfg.sample_every)
                       if student_preset.unet.conditioning == "text" else None)
            teacher = online_teacher(cfg, teacher_folder(cfg, cache_manifest), cache_manifest.get("feature_layers", [-1]))
            result = fit(student_preset, cfg, data, CacheConfig.from_dict(cache_manifest["config"]),
                         state_root, teacher=teacher, loggers=[lightning_logger(settings, run.run_id)],
                         upload=_uploader(store, store.join(base, "checkpoints"), cfg.keep_checkpoints), resume=resume,
                         callbacks=[*([preview] if preview else []), training_progress("pretrain", cfg.steps)])
            module = result.pop("module", None)
            skipped = result.get("data_skipped", {})
            log_kd_levels(result, run)
            if result.get("kd_note"):  # how a class-conditional student was trained (KD or task only, and why)
                from prefect import get_run_logger

                logger = get_run_logger()
                (logger.warning if "task loss only" in result["kd_note"] else logger.info)(result["kd_note"])
                run.set_tags({"snapgen.kd": result["kd_note"]})
        out = {"key": key, "step": result["step"], "mlflow_run_id": run.run_id, "checkpoints": store.join(base, "checkpoints"),
               "nonfinite_total": result.get("nonfinite_total"), "data_skipped": skipped,
               "resumed_from": result.get("resumed_from")}
        if result.get("kd_note"):
            out["kd_note"] = result["kd_note"]
        if init:
            out["init"] = init  # where the student started (a shipped release, another run's student)
        if result.get("kd_levels"):
            out["kd_levels"] = result["kd_levels"]
        run.log_metrics({f"data/{k}": v for k, v in skipped.items()}, step=0)  # corrupt cache data left out
        with student_tmp:
            paths = save_student(module, student_tmp.name) if module is not None else saved
            if paths:
                for name, p in paths.items():
                    upload_with_retry(store, Path(p), store.join(base, "student", Path(p).name))
                out["student"] = {n: store.join(base, "student", Path(p).name) for n, p in paths.items()}
                out["student_uri"] = write_student_card(store, store.join(base, "student"), cache_manifest,
                                                        "pretrain", key, run.run_id)
                run.log_dict(out, "pretrain_result.json")
        return out


def local_init(cfg: PretrainConfig, cache_manifest: dict[str, Any]) -> PretrainConfig:
    """`cfg` with `pretrain.init` as a folder the training process can read (an s3:// student downloaded
    once; release:// and local folders as they are), warning when that student was trained on another
    teacher than the one this run's cache was made with."""
    import dataclasses

    from snapgen_model.artifacts.student import CARD
    from snapgen_model.training.release import is_release_uri, release_folder

    if not cfg.init:
        return cfg
    folder = release_folder(cfg.init) if is_release_uri(cfg.init) else local_folder(cfg.init)
    card_path = Path(folder) / CARD
    if card_path.is_file():
        trained_on = json.loads(card_path.read_text()).get("bundle_id")
        if trained_on and cache_manifest.get("bundle_id") and trained_on != cache_manifest["bundle_id"]:
            from prefect import get_run_logger

            get_run_logger().warning(
                f"pretrain.init={cfg.init} was trained on teacher {trained_on}; this run's cache is of teacher "
                f"{cache_manifest['bundle_id']}: the student starts from another teacher's knowledge")
    return cfg if is_release_uri(cfg.init) else dataclasses.replace(cfg, init=str(folder))


def teacher_folder(cfg: PretrainConfig, cache_manifest: dict[str, Any]) -> str | None:
    """The local teacher bundle an online run loads (the one the cache was made with); None when cached."""
    if cfg.mode != "online":
        return None
    uri = cache_manifest.get("bundle_uri")
    if not uri:
        raise ValueError("pretrain.mode=online runs the teacher each step, but this cache names no teacher bundle "
                         "(its manifest has no bundle_uri): cache with a teacher, or use pretrain.mode=cached")
    return str(local_folder(uri))


def launch_spec(cache_dir, manifest, preset, overrides, cfg, state_root, encoders, stage_caches=None,
                hooks: dict[str, Any] | None = None, resume: str = "latest") -> dict[str, Any]:
    """The spec `python -m snapgen_model.training.launch` pretrains from: the same inputs as the in-process
    path (resume policy included), plus rank 0's hooks (`tasks.launch.launch_hooks`)."""
    spec = {"stage": "pretrain", "preset": preset, "overrides": overrides, "pretrain": cfg.to_dict(),
            "cache": manifest["config"], "cache_dir": cache_dir, "encoders": encoders, "state_root": str(state_root),
            "resume": resume, "teacher_folder": teacher_folder(cfg, manifest),
            "feature_layers": manifest.get("feature_layers", [-1])}
    spec |= {k: v for k, v in (hooks or {}).items() if v}
    if stage_caches:
        spec["stage_caches"] = stage_caches
    if cfg.data == "stream":  # each rank streams through the storage layer
        spec |= {"cache_uri": cache_dir, "stream_source": "tasks.pretrain:stream_source"}
    return spec


def _launch(cache_dir, manifest, preset, overrides, cfg, state_root, encoders, stage_caches=None,
            hooks: dict[str, Any] | None = None, resume: str = "latest") -> dict[str, Any]:
    """Multi-process run through the launcher (`tasks.launch.run_launched`).
    `hooks`: {mlflow_run_id, checkpoint_uri, student_dir} (rank 0 logs, uploads and saves the student)."""
    from tasks.launch import run_launched

    return run_launched(launch_spec(cache_dir, manifest, preset, overrides, cfg, state_root, encoders, stage_caches,
                                    hooks, resume), "pretrain")
