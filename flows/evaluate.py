"""evaluate_flow and reevaluate_flow: generate (or reuse) samples, score benchmarks, log the table.

Orchestration only. Generation fans out over prompt chunks as retriable tasks cached by model +
prompt set + seeds + sampler settings; a complete sample folder is reused, so re-scoring never
regenerates. Scoring reads saved samples only. Results: a table (Prefect markdown artifact, MLflow
text), metrics with consistent names, a results JSON, sample grids per category.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.events import emit_evaluation_completed
from flows.params import EvaluateParams, ReevaluateParams  # noqa: F401  (the flows' parameter models)
from flows.progress import progress
from snapgen_model.evaluation.runner import GenerationConfig
from snapgen_model.evaluation.suite import results_markdown
from snapgen_model.evaluation.toy_reference import ToyReferenceConfig
from tasks.evaluate import (
    EVAL_LIMIT,
    evaluation_slot,
    build_prompt_sets,
    finish_generation,
    generate_chunk_task,
    log_evaluation,
    plan_generation,
    previous_run_id,
    reference_rows_task,
    resolve_model,
    sample_grids_task,
    score_clip_task,
    score_dpg_task,
    score_fid_task,
    score_geneval_task,
    set_folder,
    write_results_json,
)
from tasks.settings import get_settings


def _scale(params: EvaluateParams, model: dict[str, Any]) -> str:
    return params.scale if params.scale != "auto" else ("toy" if model["preset"].startswith("toy") else "full")


def _generate(params: EvaluateParams, model: dict, sampler: dict, gen: GenerationConfig, name: str,
              prompts: list[dict]) -> tuple[str, dict]:
    """Fan out the incomplete chunks of one prompt set; returns (folder, generation info)."""
    root = params.eval_root or str(Path(get_settings().home) / "eval")
    folder = str(set_folder(root, model, sampler, gen, name, prompts))
    plan = plan_generation(model, sampler, gen, folder, prompts, params.reuse_images)
    futures = [generate_chunk_task.submit(model, sampler, gen, folder, prompts, idx, plan["key"])
               for idx in plan["chunks"]]
    for future in progress(futures, f"generating {name}", len(futures)):
        future.result()
    missing = [] if plan["complete"] else finish_generation(folder, prompts, gen, plan["key"], plan["describe"])
    if missing:
        raise RuntimeError(f"generation of {name} left prompts {missing[:5]} incomplete in {folder}")
    return folder, {"reused": plan["complete"], **plan["describe"]}


def _score(params: EvaluateParams, scale: str, model: dict, folders: dict[str, str], sets: dict[str, list]) -> dict:
    """Benchmark name -> result row, each timed."""
    models = {"detector": params.detector_model, "clip": params.clip_model, "colour": params.clip_model,
              "vqa": params.vqa_model}
    fid = {"weights": params.fid_weights, "reference": params.fid_reference, "max_images": params.fid_images,
           "reference_images": params.fid_reference_images}
    main = "shapes" if scale == "toy" else "geneval"
    dpg_set = "shapes" if scale == "toy" else "dpg"
    n = params.images_per_prompt
    calls = {
        "geneval": lambda: score_geneval_task(folders[main], scale, model, params.world, models),
        "dpg": lambda: score_dpg_task(folders[dpg_set], scale, model, params.world, sets[dpg_set], n, models,
                                      params.dpg_csv),
        "fid": lambda: score_fid_task(folders[main], scale, model, params.world, sets[main], n, fid),
        "clip": lambda: score_clip_task(folders[main], sets[main], n, params.clip_model),
    }
    out = {}
    for name in params.benchmarks:
        start = time.perf_counter()
        out[name] = calls[name]() | {"seconds": round(time.perf_counter() - start, 2)}
    return out


@flow(name="evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def evaluate_flow(params: EvaluateParams) -> dict[str, Any]:
    """Returns the results table: {model, generation, benchmarks, reference_rows, timings, ...}."""
    logger, started = get_run_logger(), time.perf_counter()
    with evaluation_slot() as slot:  # evaluations beyond settings.eval_concurrency queue here
        results, grids = _evaluate(params, started)
        results["concurrency"] = {"limit": EVAL_LIMIT, "queued_s": round(slot["waited_s"], 2),
                                  "started": slot["started"], "ended": time.time()}
    return _publish(params, results, grids, logger)


def _evaluate(params: EvaluateParams, started: float) -> tuple[dict[str, Any], dict[str, str]]:
    model = resolve_model(params.model)
    scale = _scale(params, model)
    sampler = {"steps": params.steps, "guidance": params.guidance, "kind": params.sampler}
    gen = GenerationConfig(images_per_prompt=params.images_per_prompt, base_seed=params.base_seed,
                           batch_prompts=params.batch_prompts, chunk_size=params.chunk_size)
    sets = build_prompt_sets(scale, model, params.world, params.benchmarks, params.max_prompts_per_task,
                             params.max_prompts)
    t0 = time.perf_counter()
    generated = {name: _generate(params, model, sampler, gen, name, prompts) for name, prompts in sets.items()}
    folders = {name: folder for name, (folder, _) in generated.items()}
    timings = {"generation_s": round(time.perf_counter() - t0, 2)}
    results: dict[str, Any] = {
        "model": model, "scale": scale, "requested": params.benchmarks, "folders": folders,
        "generation": {**gen.to_dict(), **next(iter(generated.values()))[1],
                       "reused": all(info["reused"] for _, info in generated.values())},
        "prompt_sets": {k: len(v) for k, v in sets.items()},
        "benchmarks": _score(params, scale, model, folders, sets)}
    if scale == "toy" and params.reference_rows:
        t0 = time.perf_counter()
        ref_cfg = ToyReferenceConfig(images_per_prompt=min(4, params.images_per_prompt), dpg="dpg" in params.benchmarks)
        results["reference_rows"] = reference_rows_task(sets["shapes"], model, params.world, ref_cfg)
        timings["reference_rows_s"] = round(time.perf_counter() - t0, 2)
    grids = {f"{name}/{tag}": path for name, folder in folders.items()
             for tag, path in sample_grids_task(folder, sets[name], params.images_per_prompt).items()}
    results["timings"] = timings | {"total_s": round(time.perf_counter() - started, 2)}
    return results, grids


def _publish(params: EvaluateParams, results: dict[str, Any], grids: dict[str, str], logger: Any) -> dict[str, Any]:
    """Markdown artifact, MLflow run, results JSON next to the samples."""
    results["grids"] = dict(grids)
    table = results_markdown(results)
    create_markdown_artifact(table, key=f"evaluation-{results['model']['model_id'][:8]}",
                             description=f"evaluation of {results['model']['ref']}")
    results_path = str(Path(next(iter(results["folders"].values()))).parent / "results.json")
    parent = params.parent_run_id or results["model"].get("run_id")
    if params.track:
        results["mlflow_run_id"] = log_evaluation(results, table, grids, parent)
    results["results_path"] = write_results_json(results, results_path)  # the latest evaluation of these samples
    own = results.get("mlflow_run_id") or str(flow_run.get_id() or time.time_ns())
    results["own_results_path"] = write_results_json(results, results_path.replace("results.json", f"results-{own}.json"))
    logger.info("evaluation of %s:\n%s", params.model, table)
    if params.model.startswith("models:/"):
        emit_evaluation_completed(params.model, results)
    return results


@flow(name="reevaluate", log_prints=True)
def reevaluate_flow(params: ReevaluateParams) -> dict[str, Any]:
    """Re-score a model on a benchmark subset from its saved samples (generated only if missing);
    the MLflow run is linked to the previous evaluation of the same samples (or the model's run)."""
    base = EvaluateParams(model=params.model, benchmarks=params.benchmarks, **params.options)
    model = resolve_model(params.model)
    folder_root = Path(base.eval_root or str(Path(get_settings().home) / "eval")) / model["model_id"]
    written = sorted(folder_root.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    previous = [previous_run_id(str(p)) for p in written]
    parent = base.parent_run_id or model.get("run_id") or next((r for r in reversed(previous) if r), None)
    return evaluate_flow(base.model_copy(update={"parent_run_id": parent}))
