"""Tasks of the evaluation stage (DESIGN.md stage 5): thin wrappers over `snapgen_model.evaluation`.

Layout of one model's evaluation, under `<eval root>/<model id>/<sampler key>/`:
    <prompt set>-<hash>/<index:05d>/metadata.jsonl, samples/NNNN.png   GenEval layout, manifest.json last
    <prompt set>-<hash>/results.jsonl                                   GenEval rows (official format)
    <prompt set>-<hash>/dpg/grids/<item>.png, dpg/questions.csv, dpg_scores.jsonl
    <prompt set>-<hash>/grids/<tag>.png                                 sample grids per category
    results.json                                                       the last results table
and `<home>/eval/fid_stats/<hash>.npz`: Inception statistics of image sets, keyed by content hash.
"""
from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, cast

import torch
from prefect import task
from prefect.context import TaskRunContext

from snapgen_model.artifacts import student as student_files
from snapgen_model.data.shapes import ShapesWorldConfig
from snapgen_model.evaluation import atomic, suite
from snapgen_model.artifacts.teacher_bundle import (
    BUNDLE_FILE,
    bundle_image_size,
    bundle_world,
    is_bundle_folder,
    is_toy_teacher_bundle,
)
from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator, BundleTeacherGenerator
from snapgen_model.evaluation.clip_score import ClipScoreConfig, clip_score
from snapgen_model.evaluation.dpg import DPGConfig, VQABackend, load_prompts, load_questions, write_questions
from snapgen_model.evaluation.fid import FeatureStats, FIDConfig, file_sha256
from snapgen_model.evaluation.geneval import GenEvalBackend
from snapgen_model.evaluation.hf_backends import (
    BackendUnavailable,
    ClipColourClassifier,
    Mask2FormerDetector,
    TransformersVQA,
)
from snapgen_model.evaluation.runner import (
    CheckpointGenerator,
    GenerationConfig,
    chunks,
    claim_folder,
    folder_complete,
    generate_chunk,
    generation_key,
    missing_prompts,
    prompt_complete,
    prompts_hash,
    resolve_checkpoint,
    write_manifest,
)
from snapgen_model.evaluation.toy_backends import OracleVQA, scene_parser_backend
from snapgen_model.evaluation.toy_reference import (
    ToyReferenceConfig,
    fid_reference_images,
    item_id,
    prompt_splits,
    score_reference_rows,
    toy_dpg_questions,
    toy_prompts,
)
from snapgen_model.storage.checkpoint import read_preset
from snapgen_model.artifacts.teacher_bundle import read_bundle_record
from tasks import tracking
from tasks.lineage import lineage_tags
from tasks.cache import local_folder
from tasks.defaults import compute_task_options, io_task_options
from tasks.settings import get_settings
from tasks.keys import code_hash, content_key
from tasks.storage import storage

MODEL_URI_PREFIX = "models:/"


def code_version() -> str:
    """The behaviour of the evaluation and sampling code (`tasks.keys.code_hash("evaluation")`): part of
    every cross-run cache key."""
    return code_hash("evaluation")


# ----------------------------------------------------------------------------- model and prompts

def _registry_source(ref: str) -> dict[str, Any]:
    """Resolve `models:/name@alias` or `models:/name/N` through the registry."""
    from tasks.registry import resolve_model_version

    return dict(resolve_model_version(get_settings(), ref))


def _local_checkpoint(uri: str) -> str:
    """A local path for a checkpoint URI; s3:// files are downloaded once into the eval cache."""
    if not uri.startswith("s3://"):
        return uri
    store = storage()
    local = Path(get_settings().home) / "eval" / "_models" / content_key(uri)[:16]
    target = local / ("unet.safetensors" if not uri.endswith(".safetensors") else Path(uri).name)
    if not target.is_file():
        store.download_file(uri if uri.endswith(".safetensors") else store.join(uri, "unet.safetensors"), target)
        sibling = store.join(uri.rsplit("/", 1)[0], "decoder.safetensors")
        if store.exists(sibling):
            store.download_file(sibling, local / "decoder.safetensors")
    return str(target)


def _model_folder(uri: str) -> Path | None:
    """A local folder for a folder-like model URI (a student folder or a teacher bundle), else None."""
    if uri.endswith(".safetensors"):
        return None
    if uri.startswith("s3://"):
        store = storage()
        if not (store.exists(store.join(uri, student_files.CARD)) or store.exists(store.join(uri, BUNDLE_FILE))):
            return None
    folder = local_folder(uri)
    return folder if folder.is_dir() and (student_files.is_student_folder(folder) or is_bundle_folder(folder)) else None


def _folder_model(ref: str, source: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Model record of a student folder (student.json + weights) or a teacher bundle (bundle.json)."""
    common = {"ref": ref, "folder": str(folder), "decoder": None, "run_id": source.get("run_id"),
              "version": source.get("version")}
    if is_bundle_folder(folder) and not student_files.is_student_folder(folder):
        if not is_toy_teacher_bundle(folder):
            raise ValueError(f"--model {ref}: {folder} is a teacher bundle but not one the toy bootstrap wrote "
                             "(bundle.json has no format); only toy teacher bundles can be sampled for evaluation")
        record = read_bundle_record(folder)
        return common | {"kind": "teacher", "unet": None, "bundle": str(folder), "world": bundle_world(folder),
                         "model_id": "t" + content_key(record.get("files") or record.get("config_hash"))[:15],
                         "preset": str(record.get("preset", "toy")), "image_size": bundle_image_size(folder)}
    card = student_files.read_card(folder)
    bundle = local_folder(card["bundle_uri"])
    if not is_bundle_folder(bundle):
        raise FileNotFoundError(f"--model {ref}: its teacher bundle {card['bundle_uri']} (student.json) is not a "
                                "finished bundle (bundle.json missing)")
    unet = folder / student_files.UNET
    preset = read_preset(unet)
    if preset is None:
        raise ValueError(f"--model {ref}: {unet} carries no preset (sampler settings)")
    model_id = content_key([file_sha256(str(unet)), file_sha256(str(folder / student_files.CONDITIONER)),
                     card.get("bundle_id")])[:16]
    return common | {"kind": "student", "unet": str(unet), "bundle": str(bundle), "world": bundle_world(bundle),
                     "model_id": model_id, "preset": preset.name, "image_size": preset.image_size,
                     "stage": card.get("stage")}


@task(name="resolve-model", **io_task_options())
def resolve_model(ref: str) -> dict[str, Any]:
    """{ref, kind, unet, decoder, model_id, preset, image_size, run_id, ...} of a checkpoint path/URI, a
    student folder, a teacher bundle folder, or a registry ref (`models:/name@alias`, `models:/name/N`)."""
    source: dict[str, Any] = {"source": ref}
    if ref.startswith(MODEL_URI_PREFIX):
        source = _registry_source(ref)
    uri = str(source["source"])
    folder = _model_folder(uri)
    if folder is not None:
        return _folder_model(ref, source, folder)
    unet, decoder = resolve_checkpoint(_local_checkpoint(uri[len("file://"):] if uri.startswith("file://") else uri))
    preset = read_preset(unet)
    if preset is None:
        raise ValueError(f"--model {ref}: {unet} carries no preset (sampler settings); "
                         "save it with save_model(preset=...)")
    return {"ref": ref, "kind": "checkpoint", "unet": str(unet), "decoder": str(decoder) if decoder else None,
            "model_id": file_sha256(str(unet))[:16], "preset": preset.name, "image_size": preset.image_size,
            "run_id": source.get("run_id"), "version": source.get("version")}


def toy_world(model: dict[str, Any], world: dict[str, Any]) -> ShapesWorldConfig:
    """The world a toy model is scored in: its teacher bundle's (held-out pairs included) when it has
    one, else the default world at its image size; `world` (EvaluateParams.world) on top."""
    base = dict(model.get("world") or {})
    if not base:  # the default world at this size, object sizes scaled from the 64 px calibration (as curation)
        lo, hi = (max(8, round(v * model["image_size"] / 64)) for v in (14, 22))
        base = {"object_size_px": (lo, hi)}
    return ShapesWorldConfig(**(base | {"resolution": model["image_size"]} | world))


@task(name="build-prompt-sets", **compute_task_options())
def build_prompt_sets(scale: str, model: dict[str, Any], world: dict[str, Any], benchmarks: list[str],
                      max_per_task: int, max_prompts: int) -> dict[str, list[dict[str, Any]]]:
    """Prompt set name -> GenEval-schema records. Toy: one shapes-world set serves every benchmark."""
    if scale == "toy":
        return {"shapes": toy_prompts(toy_world(model, world), "all", max_per_task)}
    settings, sets = get_settings(), {}
    if {"geneval", "fid", "clip"} & set(benchmarks):
        if settings.geneval_metadata_path is None:
            raise ValueError("full-scale GenEval needs settings.geneval_metadata_path (SNAPGEN_GENEVAL_METADATA_PATH)")
        lines = Path(settings.geneval_metadata_path).read_text().splitlines()
        sets["geneval"] = [json.loads(x) for x in lines if x.strip()][:max_prompts or None]
    if "dpg" in benchmarks:
        if settings.dpg_bench_dir is None:
            raise ValueError("full-scale DPG-Bench needs settings.dpg_bench_dir (SNAPGEN_DPG_BENCH_DIR)")
        items = list(load_prompts(settings.dpg_bench_dir).items())[:max_prompts or None]
        sets["dpg"] = [{"tag": "dpg", "item_id": k, "prompt": v} for k, v in items]
    return sets


# ----------------------------------------------------------------------------- generation

@functools.lru_cache(maxsize=4)
def _generator(kind: str, unet: str | None, decoder: str | None, folder: str | None, bundle: str | None,
               steps: int | None, guidance: float | None, sampler_kind: str | None = None) -> Any:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # images do not depend on it beyond float noise
    if kind == "student":
        if folder is None or bundle is None:
            raise RuntimeError("a student model record has a folder and a bundle (resolve_model)")
        return BundleStudentGenerator(folder, bundle, steps=steps, guidance=guidance, kind=sampler_kind, device=device)
    if kind == "teacher":
        if bundle is None:
            raise RuntimeError("a teacher model record has a bundle (resolve_model)")
        return BundleTeacherGenerator(bundle, steps=steps, guidance=guidance, kind=sampler_kind, device=device)
    if unet is None:
        raise RuntimeError("a checkpoint model record has a unet (resolve_model)")
    return CheckpointGenerator(unet, decoder_path=decoder, steps=steps, guidance=guidance, device=device,
                               kind=sampler_kind)


_GENERATOR_LOCK = threading.Lock()  # generation tasks run in threads; loading is not thread-safe


def generator_for(model: dict[str, Any], sampler: dict[str, Any]) -> Any:
    """The ImageGenerator of a resolved model (checkpoint, bundle student or bundle teacher)."""
    with _GENERATOR_LOCK:
        return _generator(model.get("kind", "checkpoint"), model.get("unet"), model.get("decoder"), model.get("folder"),
                      model.get("bundle"), sampler.get("steps"), sampler.get("guidance"), sampler.get("kind"))


def set_folder(root: str, model: dict[str, Any], sampler: dict[str, Any], gen: GenerationConfig, name: str,
               prompts: list[dict[str, Any]]) -> Path:
    """`<root>/<model id>/<sampler key>/<name>-<prompts hash>`."""
    identity = generator_for(model, sampler).identity
    sampler_key = content_key([identity, gen.images_per_prompt, gen.base_seed, gen.batch_prompts])[:12]
    return Path(root) / model["model_id"] / sampler_key / f"{name}-{prompts_hash(prompts)[:8]}"


@task(name="plan-generation", **compute_task_options())
def plan_generation(model: dict[str, Any], sampler: dict[str, Any], gen: GenerationConfig, folder: str,
                    prompts: list[dict[str, Any]], reuse_images: bool) -> dict[str, Any]:
    """{key, complete, chunks, describe}: what is left to generate in `folder`."""
    generator = generator_for(model, sampler)
    key = generation_key(generator.identity, prompts, gen)
    if reuse_images:
        missing = missing_prompts(folder, prompts, gen)
        if missing:
            raise FileNotFoundError(f"--reuse-images: {len(missing)} of {len(prompts)} prompts have no complete "
                                    f"samples in {folder} (first: {missing[:5]})")
        return {"key": key, "complete": True, "chunks": [], "describe": generator.describe()}
    claim_folder(folder, key)
    complete = folder_complete(folder, prompts, gen, key)
    todo = [] if complete else [c for c in chunks(len(prompts), gen) if not _chunk_done(folder, prompts, c, gen)]
    return {"key": key, "complete": complete, "chunks": todo, "describe": generator.describe()}


def _chunk_done(folder: str, prompts: list[dict[str, Any]], indices: list[int], gen: GenerationConfig) -> bool:
    return all(prompt_complete(folder, i, prompts[i], gen.images_per_prompt) for i in indices)


def _chunk_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cached by model + prompt set + seeds + sampler settings (the generation key) and the chunk,
    and only while the chunk's files are on disk: deleted samples are never a stale cache hit."""
    p = parameters
    state = "on-disk" if _chunk_done(p["folder"], p["prompts"], p["indices"], p["gen"]) else uuid.uuid4().hex
    return "eval-gen-" + content_key([p["key"], p["folder"], p["indices"], code_version(), state])[:32]


@task(name="generate-chunk", cache_key_fn=_chunk_cache_key, **compute_task_options(retries=1))
def generate_chunk_task(model: dict[str, Any], sampler: dict[str, Any], gen: GenerationConfig, folder: str,
                        prompts: list[dict[str, Any]], indices: list[int], key: str) -> dict[str, int]:
    """Generate and save one chunk of prompts (complete prompts are skipped: resumable)."""
    return generate_chunk(generator_for(model, sampler), folder, prompts, indices, gen)


@task(name="finish-generation", **compute_task_options())
def finish_generation(folder: str, prompts: list[dict[str, Any]], gen: GenerationConfig, key: str,
                      describe: dict[str, Any]) -> list[int]:
    """Write the manifest when every prompt is complete; else return the incomplete prompt indices."""
    missing = missing_prompts(folder, prompts, gen)
    if not missing:
        write_manifest(folder, key, prompts, gen, {"generator": describe})
    return missing


# ----------------------------------------------------------------------------- scoring

@task(name="score-geneval", **compute_task_options())
def score_geneval_task(folder: str, scale: str, model: dict[str, Any], world: dict[str, Any],
                       models: dict[str, str | None]) -> dict[str, Any]:
    """GenEval rows (results.jsonl) and summary: scene parser (toy) or Mask2Former + CLIP (full)."""
    if scale == "toy":
        w = toy_world(model, world)
        splits = prompt_splits(w) if (w.held_out_pairs or w.held_out_prompts) else None
        return suite.score_geneval(folder, scene_parser_backend(w), splits)
    try:  # a None path (no model given) is BackendUnavailable (check_model_dir)
        backend = GenEvalBackend(Mask2FormerDetector(cast(str, models["detector"])),
                                 ClipColourClassifier(cast(str, models.get("colour") or models["clip"])))
    except BackendUnavailable as exc:
        return suite.unavailable(str(exc))
    return suite.score_geneval(folder, backend)


@task(name="score-dpg", **compute_task_options())
def score_dpg_task(folder: str, scale: str, model: dict[str, Any], world: dict[str, Any], prompts: list[dict[str, Any]],
                   images: int, models: dict[str, str | None], dpg_csv: str | None) -> dict[str, Any]:
    """DPG-Bench: toy question graphs + oracle VQA (toy), or dpg_bench.csv + a VQA model (full)."""
    out = Path(folder) / "dpg"
    csv_path: str | Path
    vqa: VQABackend
    if scale == "toy":
        csv_path = write_questions([q for qs in toy_dpg_questions(prompts).values() for q in qs], out / "questions.csv")
        questions = load_questions(csv_path, DPGConfig(official_first_row=False))
        vqa = OracleVQA(toy_world(model, world))
        ids = [item_id(i) for i in range(len(prompts))]
    else:
        csv_path = dpg_csv or (str(Path(get_settings().dpg_bench_dir or ".") / "dpg_bench.csv"))
        try:  # a None path (no model given) is BackendUnavailable (check_model_dir)
            questions, vqa = load_questions(csv_path), TransformersVQA(cast(str, models["vqa"]))
        except (FileNotFoundError, BackendUnavailable) as exc:
            return suite.unavailable(str(exc))
        ids = [p["item_id"] for p in prompts]
        questions = {k: v for k, v in questions.items() if k in set(ids)}
    grids = suite.write_dpg_grids(folder, prompts, ids, out / "grids", images)
    return suite.score_dpg(grids, questions, vqa, DPGConfig(tiles=min(4, images)))


@task(name="score-fid", **compute_task_options())
def score_fid_task(folder: str, scale: str, model: dict[str, Any], world: dict[str, Any], prompts: list[dict[str, Any]],
                   images: int, fid: dict[str, Any]) -> dict[str, Any]:
    """FID/KID of the saved samples against held-out renders (toy) or reference statistics (full)."""
    cache = Path(get_settings().home) / "eval" / "fid_stats"
    cfg = FIDConfig(weights_path=fid.get("weights") or "")
    if scale == "toy":
        reference: Any = fid_reference_images(toy_world(model, world), int(fid.get("reference_images", 128)))
    elif not fid.get("reference"):
        return suite.unavailable("no FID reference statistics given (--fid-reference: an .npz from FeatureStats.save)")
    elif not Path(fid["reference"]).is_file():
        return suite.unavailable(f"FID reference statistics {fid['reference']!r} do not exist")
    else:
        reference = FeatureStats.load(fid["reference"])
    generated = suite.folder_images(folder, prompts, images, int(fid.get("max_images") or 0))
    return suite.score_fid(generated, reference, cache, cfg)


@task(name="score-clip", **compute_task_options())
def score_clip_task(folder: str, prompts: list[dict[str, Any]], images: int, clip_model: str | None) -> dict[str, Any]:
    """CLIP score of the saved samples, or the "not available" row."""
    if not clip_model:
        return suite.unavailable("no CLIP model given (--clip-model PATH: a local transformers CLIP folder)")
    texts = suite.folder_prompts(prompts, images)
    result = clip_score(suite.folder_images(folder, prompts, images), texts,  # type: ignore[arg-type]  # (N, H, W, 3): N images
                        ClipScoreConfig(model_path=clip_model))
    return result.to_dict()


def _rows_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    p = parameters
    return "eval-reference-" + content_key([p["prompts"], p["world"], p["cfg"].to_dict(), p["model"]["image_size"],
                                     p["model"].get("world"), _ae_bundle(p["model"]), code_version()])[:32]


def _ae_bundle(model: dict[str, Any]) -> str | None:
    """The toy teacher bundle whose autoencoder gives the AE-ceiling row (None: no such row)."""
    bundle = model.get("bundle")
    return bundle if bundle and is_toy_teacher_bundle(bundle) else None


@task(name="reference-rows", cache_key_fn=_rows_cache_key, **compute_task_options())
def reference_rows_task(prompts: list[dict[str, Any]], model: dict[str, Any], world: dict[str, Any],
                        cfg: ToyReferenceConfig) -> dict[str, Any]:
    """The toy reference rows (clean, floor, noise, blank, and the AE ceiling when the model has a toy
    teacher bundle: clean renders through its autoencoder) scored by the same rules."""
    decode = None
    ae_bundle = _ae_bundle(model)
    if ae_bundle:
        from snapgen_model.artifacts.teacher_bundle import autoencoder_roundtrip, load_bundle

        bundle = load_bundle(ae_bundle)
        decode = lambda images: autoencoder_roundtrip(bundle, images)  # noqa: E731
    return score_reference_rows(prompts, toy_world(model, world), cfg, decode=decode)


@task(name="sample-grids", **compute_task_options())
def sample_grids_task(folder: str, prompts: list[dict[str, Any]], images: int) -> dict[str, str]:
    """Write `<folder>/grids/<category>.png`; returns category -> path."""
    out = Path(folder) / "grids"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for tag, grid in suite.category_grids(folder, prompts, images).items():
        atomic.save_image(grid, out / f"{tag}.png")
        paths[tag] = str(out / f"{tag}.png")
    return paths


# ----------------------------------------------------------------------------- results

@task(name="write-results", **io_task_options())
def write_results_json(results: dict[str, Any], path: str) -> str:
    atomic.write_text(path, json.dumps(results, indent=2, default=str))
    return path


def previous_run_id(path: str) -> str | None:
    """The MLflow run of the last evaluation written to `path` (re-evaluations link to it)."""
    p = Path(path)
    return json.loads(p.read_text()).get("mlflow_run_id") if p.is_file() else None


def evaluation_run_name(results: dict[str, Any]) -> str:
    """What an evaluation run evaluated, for the MLflow UI: "evaluate teacher", "evaluate student 4-step",
    "evaluate student 24-step (snapgen v3)"; the model id stays in the run's tags."""
    model = results.get("model") or {}
    kind = str(model.get("kind") or "checkpoint")
    steps = ((results.get("generation") or {}).get("sampler") or {}).get("steps")
    name = f"evaluate {kind}" + (f" {steps}-step" if steps and kind != "teacher" else "")
    ref = str(model.get("ref") or "")
    if ref.startswith(MODEL_URI_PREFIX) and model.get("version"):
        name += f" ({ref[len(MODEL_URI_PREFIX):].split('@')[0].split('/')[0]} v{model['version']})"
    return name


@task(name="log-evaluation", **io_task_options())
def log_evaluation(results: dict[str, Any], markdown: str, grids: dict[str, str], parent_run_id: str | None) -> str:
    """One MLflow run: metrics (consistent names), the table, the results JSON and the sample grids."""
    model = results["model"]
    tags = lineage_tags(parent_runs=[parent_run_id] if parent_run_id else None) | {
        "snapgen.stage": "evaluate", "snapgen.model_ref": model["ref"], "snapgen.model_id": model["model_id"]}
    with tracking.start_run(get_settings(), evaluation_run_name(results), tags=tags,
                            parent_run_id=parent_run_id) as run:
        run.log_params({"model": model, "generation": results["generation"], "benchmarks": results["requested"]})
        run.log_metrics(suite.flatten_metrics(results))
        run.log_dict(results, "eval_results.json")
        run.log_text(markdown, "eval_table.md")
        for path in grids.values():
            run.log_artifact(path, "sample_grids")
        return run.run_id


# ----------------------------------------------------------------------------- concurrency

EVAL_LIMIT = "snapgen-evaluate"


def _ensure_limit(name: str, limit: int) -> None:
    """Create the Prefect global concurrency limit `name` if it does not exist (first caller wins)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except Exception:  # noqa: BLE001 - a concurrent first caller created it: fine if it exists now
                client.read_global_concurrency_limit_by_name(name)


@contextlib.contextmanager
def evaluation_slot() -> Iterator[dict[str, float]]:
    """Hold one slot of the `snapgen-evaluate` global concurrency limit (settings.eval_concurrency slots,
    created on first use): evaluations beyond the limit queue here. Yields {waited_s, started}."""
    from prefect.concurrency.sync import concurrency

    _ensure_limit(EVAL_LIMIT, get_settings().eval_concurrency)
    asked = time.time()
    with concurrency(EVAL_LIMIT, occupy=1, strict=True):
        yield {"waited_s": time.time() - asked, "started": time.time()}
