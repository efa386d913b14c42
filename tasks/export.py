"""Tasks of the export stage (DESIGN.md 6): thin wrappers over `snapgen_model.export`, doing the I/O.

    resolve-model-ref   model ref (path, file:// or s3:// URI; models:/ via the registry) -> local files
    read-export-manifest   the destination's manifest.json (the idempotence key), if any
    export-model        load + export + parity gates + report into a local work folder (library call)
    upload-export       work folder -> destination URI (old manifest removed first, manifest last)
    log-export          one MLflow run: params, metrics, report and the exported files as artifacts
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task

from snapgen_model.artifacts import student as student_files
from snapgen_model.export import ExportConfig, export_key, export_model, load_inputs
from snapgen_model.export.pipeline import MANIFEST
from tasks import tracking
from tasks.lineage import lineage_tags
from tasks.defaults import compute_task_options, io_task_options
from tasks.settings import get_settings
from tasks.keys import content_key
from tasks.storage import Storage, parse_uri, storage

REGISTRY_SCHEME = "models:/"
UNET_FILE, DECODER_FILE, TEXT_ENCODER_DIR = "unet.safetensors", "decoder.safetensors", "text_encoder"


def as_uri(ref: str) -> str:
    """A storage URI for a plain path (made absolute) or an existing file:// / s3:// URI."""
    return ref if "://" in ref else f"file://{Path(ref).expanduser().resolve()}"


def parent_uri(uri: str) -> str:
    """The folder URI holding `uri`."""
    return uri.rstrip("/").rsplit("/", 1)[0]


def resolve_registry_ref(ref: str) -> str:
    """`models:/name/N` or `models:/name@alias` -> a checkpoint URI (the registry's `resolve_model_version`,
    as the evaluate stage uses), after checking the registered files' checksums."""
    from tasks.registry import resolve_model_version

    resolved = resolve_model_version(get_settings(), ref)
    verify_registered_files(ref)
    return str(resolved["source"])


class TamperedArtifactError(RuntimeError):
    """A registered file no longer matches the sha256 recorded at registration."""


def verify_registered_files(ref: str) -> dict[str, str]:
    """The version's tags, after checking every registered file against its recorded sha256: a
    registered model whose files were modified is never exported."""
    from tasks import registry

    tags = registry.version_tags(ref)
    if any(k.startswith(registry.SHA_PREFIX) for k in tags):
        problems = registry.verify_checksums(tags)
        if problems:
            raise TamperedArtifactError(f"model ref {ref!r}: refusing to export: " + "; ".join(problems))
    return tags




def _cache_dir(uri: str) -> Path:
    return Path(get_settings().home) / "cache" / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _fetch(store: Storage, uri: str) -> Path | None:
    """A local path for `uri` (None when nothing is there): the file or folder itself for file://,
    else a download into the cache (a folder when `uri` is a prefix holding several objects)."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        return loc.path if loc.path.exists() else None
    target = _cache_dir(uri)
    if store.exists(uri):
        local = target / Path(loc.key).name
        if not local.is_file() or local.stat().st_size != store.size(uri):
            store.download_file(uri, local)
        return local
    prefix = uri.rstrip("/") + "/"
    objects = store.list(prefix)
    for obj in objects:
        store.download_file(obj, target / obj[len(prefix):])
    return target if objects else None


def _required(store: Storage, uri: str, what: str) -> Path:
    local = _fetch(store, uri)
    if local is None:
        raise FileNotFoundError(f"{what} {uri}: no such file or folder")
    return local


@task(name="resolve-model-ref", **io_task_options())
def resolve_model_ref(ref: str, decoder: str | None = None, text_encoder: str | None = None) -> dict[str, Any]:
    """Local paths of the UNet checkpoint and of the decoder / text encoder, and the model's URI.

    `ref` is a UNet `.safetensors` file or a folder holding `unet.safetensors`; unless given
    explicitly, a sibling `decoder.safetensors` and `text_encoder/` folder are picked up too."""
    from snapgen_model.training.release import is_release_uri, release_folder

    if is_release_uri(ref):  # a shipped model: its verified folder
        uri = as_uri(str(release_folder(ref)))
    else:
        uri = resolve_registry_ref(ref) if ref.startswith(REGISTRY_SCHEME) else as_uri(ref)
    store = storage()
    card = None
    if not store.exists(uri):  # a folder: a student (student.json + unet_ema) or a bundle with unet.safetensors
        if store.exists(store.join(uri, student_files.CARD)):
            card = store.read_json(store.join(uri, student_files.CARD))
            uri = store.join(uri, student_files.UNET)
        else:
            uri = store.join(uri, UNET_FILE)
    folder = parent_uri(uri)
    if card is None and uri.endswith(student_files.UNET) and store.exists(store.join(folder, student_files.CARD)):
        card = store.read_json(store.join(folder, student_files.CARD))
    if card and not text_encoder and card.get("bundle_uri"):  # a student's text encoder is its teacher bundle's
        bundle = card["bundle_uri"]
        bundle = as_uri(str(release_folder(bundle))) if is_release_uri(bundle) else bundle  # a shipped teacher
        bundle_te = store.join(bundle, TEXT_ENCODER_DIR)
        text_encoder = bundle_te if _fetch(store, bundle_te) is not None else None
    result: dict[str, str | None] = {"ref": ref, "uri": uri, "unet": str(_required(store, uri, "model checkpoint"))}
    for name, given, sibling in (("decoder", decoder, DECODER_FILE), ("text_encoder", text_encoder, TEXT_ENCODER_DIR)):
        if given:
            result[name] = str(_required(store, as_uri(given), name.replace("_", " ")))
        else:
            found = _fetch(store, store.join(folder, sibling))
            result[name] = str(found) if found is not None else None
    return result


def default_destination(model_uri: str) -> str:
    """Exports live beside the model: `<model folder>/export`."""
    return parent_uri(model_uri) + "/export"


def work_dir(destination: str) -> Path:
    """Local staging folder of one destination (`<home>/exports/<hash of the URI>`)."""
    return Path(get_settings().home) / "exports" / hashlib.sha256(destination.encode()).hexdigest()[:16]


@task(name="read-export-manifest", **io_task_options())
def read_export_manifest(destination: str) -> dict[str, Any] | None:
    """The destination's manifest.json, or None when there is no finished export there."""
    store = storage()
    uri = store.join(destination, MANIFEST)
    return store.read_json(uri) if store.exists(uri) else None


@task(name="read-export-report", **io_task_options())
def read_export_report(destination: str) -> dict[str, Any]:
    """The report.json of the finished export at `destination`."""
    store = storage()
    return store.read_json(store.join(destination, "report.json"))


@task(name="export-model", **compute_task_options(persist_result=False))
def export_checkpoint(paths: dict[str, Any], preset: str | None, overrides: list[str], cfg: ExportConfig,
                      formats: list[str], parts: list[str], local_dir: str, known_key: str | None,
                      force: bool) -> dict[str, Any]:
    """`snapgen_model.export.export_model` on local files; a destination already holding this export's
    key (`known_key`) is a cache hit without exporting. `cfg` comes parsed from the flow's parameters
    (`ExportParams.config`)."""
    inputs = load_inputs(paths["unet"], preset=preset, overrides=overrides, decoder=paths.get("decoder"),
                         text_encoder=paths.get("text_encoder"))
    key = export_key(inputs, cfg, formats, parts)
    if known_key == key and not force:
        return {"export_key": key, "skipped": True, "remote_hit": True}
    return export_model(inputs, local_dir, cfg, formats=formats, parts=parts, force=force)


@task(name="upload-export", **io_task_options())
def upload_export(local_dir: str, destination: str) -> dict[str, Any]:
    """Copy the export folder to `destination`: remove the old manifest, upload files, delete stale
    objects, write the manifest last (a destination with a manifest is always complete)."""
    store, root = storage(), Path(local_dir)
    manifest_uri = store.join(destination, MANIFEST)
    store.delete(manifest_uri)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    wanted = set()
    for f in files:
        uri = store.join(destination, f.relative_to(root).as_posix())
        store.upload_file(f, uri)
        wanted.add(uri)
    for uri in store.list(destination.rstrip("/") + "/"):
        if uri not in wanted and uri != manifest_uri:
            store.delete(uri)
    store.upload_file(root / MANIFEST, manifest_uri)
    return {"uri": destination, "files": len(files) + 1, "bytes": sum(f.stat().st_size for f in files)}


def export_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics of a report: sizes, counts, parity, latency, generation PSNR."""
    metrics: dict[str, float] = {"export_seconds": report.get("seconds", 0.0)}
    for name, part in report.get("parts", {}).items():
        metrics[f"{name}.params"] = part["params"]
        metrics[f"{name}.gmacs"] = part["macs"] / 1e9
        for variant, art in part.get("onnx", {}).items():
            prefix = f"{name}.onnx.{variant}"
            metrics |= {f"{prefix}.bytes": art["bytes"], f"{prefix}.max_abs": art["parity"]["max_abs"],
                        f"{prefix}.psnr": art["parity"]["psnr"]}
            if art.get("latency"):
                lat = art["latency"]
                metrics |= {f"{prefix}.ort_ms": lat["ort_ms"], f"{prefix}.torch_ms": lat["torch_ms"]}
        if part.get("coreml", {}).get("bytes"):
            metrics[f"{name}.coreml.bytes"] = part["coreml"]["bytes"]
            if part["coreml"].get("palettized"):
                metrics[f"{name}.coreml.palettized_bytes"] = part["coreml"]["palettized"]["bytes"]
    if report.get("generation"):
        metrics["generation.image_psnr"] = report["generation"]["image_psnr"]
    return {k: float(v) for k, v in metrics.items() if v is not None and abs(float(v)) != float("inf")}


@task(name="log-export", **io_task_options())
def log_export(report: dict[str, Any], local_dir: str | None, model_ref: str, destination: str,
               log_files: bool = True, error: str | None = None) -> str:
    """One MLflow run: export config as params, figures as metrics, report (+ files) as artifacts.
    A blocked export (`error`) is logged too, as a FAILED-tagged run with its report."""
    settings = get_settings()
    tags = lineage_tags(config_hash=content_key(report.get("config", {}), 16))
    tags |= {"snapgen.stage": "export", "snapgen.export_key": report.get("export_key", ""),
             "snapgen.export_parity": "failed" if error else "passed"}
    with tracking.start_run(settings, f"export {'+'.join(report.get('formats') or ['model'])} ({report.get('preset', 'model')})", tags=tags) as run:
        run.log_params({"model_ref": model_ref, "destination": destination, "formats": ",".join(report["formats"]),
                        "parts": ",".join(report.get("parts", {})), "export": report.get("config", {})})
        run.log_metrics(export_metrics(report))
        run.log_dict(report, "export_report.json")
        if error:
            run.log_text(error, "export_error.txt")
        if local_dir and not error:
            run.log_artifact(Path(local_dir) / "report.md")
            if log_files:
                run.log_artifact(local_dir, "export")
        return run.run_id
