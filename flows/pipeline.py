"""snapgen_pipeline: teacher -> curate -> cache_teacher -> train_decoder -> pretrain -> distill_steps ->
evaluate -> export -> register -> promote, each stage a subflow of retriable tasks (DESIGN.md "Stages").

Orchestration only. Every stage is keyed by the content of its inputs (its config, the keys of the
stages it consumes, the code version) and leaves a stage record when it finishes (tasks/pipeline.py):
a rerun after a failure skips the finished stages and resumes at the failed one (which itself resumes
from its checkpoints), and a rerun with unchanged inputs does no work at all. The MLflow run of the
pipeline is the parent of every stage run, in the same experiment as stand-alone stage runs (settings
`experiment_name`, `MLFLOW_EXPERIMENT_NAME`; `--set experiment=...` to separate them); it carries each
evaluated model's headline metrics and the registered model (a loadable pyfunc); the run ends with a
Prefect markdown artifact and a self-contained HTML report logged to MLflow.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.pipeline_config import (
    PipelineConfig,
    StageConfigs,
    build_config,
    cache_overrides,
    flow_overrides,
    validate_stage_configs,
)
from snapgen_model.artifacts import student as student_files
from tasks import mlflow_model, registry, tracking
from tasks.lineage import lineage_tags
from tasks.cache import local_folder
from tasks.pipeline import (
    list_files,
    lookup_stage,
    record_stage,
    stage_key,
    storage,
    teacher_facts,
    write_summary,
)
from tasks.settings import get_settings

STAGES = ("teacher", "curate", "cache_teacher", "train_decoder", "pretrain", "distill_steps", "evaluate", "export",
          "register", "promote")


class _Stages:
    """Runs stages with their records; remembers keys, timings and results for the report."""

    def __init__(self, force: bool, logger: Any) -> None:
        self.force, self.logger = force, logger
        self.keys: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    def run(self, stage: str, config: Any, upstream: list[str], fn: Callable[[], dict[str, Any]],
            outputs: Callable[[dict[str, Any]], list[str]] = lambda r: []) -> dict[str, Any]:
        key = stage_key(stage, config, [self.keys[u] for u in upstream])
        self.keys[stage] = key
        record = None if self.force else lookup_stage(stage, key)
        if record is not None:
            self.logger.info("stage %s: finished before with the same inputs (key %s), skipped", stage, key[:12])
            self.rows.append({"name": stage, "seconds": 0.0, "status": "cached", "cache_hit": True,
                              "mlflow_run_id": record["result"].get("mlflow_run_id"),
                              "producer_flow_run_id": record.get("flow_run_id") or None,
                              "detail": f"key {key[:12]}; took {record.get('seconds', 0):.1f} s when it ran"})
            self.results[stage] = record["result"]
            return record["result"]
        self.logger.info("stage %s: running (key %s)", stage, key[:12])
        started = time.monotonic()
        try:
            result = fn()
        except BaseException:
            self.rows.append({"name": stage, "seconds": round(time.monotonic() - started, 1), "status": "failed",
                              "cache_hit": False, "mlflow_run_id": None, "detail": f"key {key[:12]}"})
            raise
        seconds = time.monotonic() - started
        record_stage(stage, key, result, outputs(result), seconds, str(flow_run.get_id() or ""))
        self.rows.append({"name": stage, "seconds": round(seconds, 1), "status": "completed",
                          "cache_hit": bool(result.get("cache_hit")), "mlflow_run_id": result.get("mlflow_run_id"),
                          "detail": f"key {key[:12]}"})
        self.results[stage] = result
        return result

    def skip(self, stage: str, why: str) -> None:
        self.keys[stage] = "skipped"
        self.rows.append({"name": stage, "seconds": 0.0, "status": "skipped", "cache_hit": False,
                          "mlflow_run_id": None, "detail": why})


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------- stage bodies

def _teacher(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.teacher.bundle_uri:
        facts = teacher_facts(cfg.teacher.bundle_uri)
        return {"bundle_uri": cfg.teacher.bundle_uri, "bundle_id": facts["bundle_id"], "bootstrapped": False}
    from flows.bootstrap import bootstrap_teacher_flow, register_teacher_release_flow

    if cfg.teacher.release:
        result = register_teacher_release_flow(cfg.teacher.release)
    else:
        result = bootstrap_teacher_flow(cfg.teacher.bootstrap_preset, cfg.teacher.bootstrap_overrides)
    return _json_safe({"bundle_uri": result["bundle_uri"], "bundle_id": result["config_hash"],
                       "bootstrapped": not cfg.teacher.release, "release": cfg.teacher.release,
                       "cache_hit": result["cache_hit"], "mlflow_run_id": result.get("mlflow_run_id"),
                       "model_version": result.get("model_version"), "metrics": result.get("metrics", {})})


def _curate(cfg: PipelineConfig, teacher: dict[str, Any]) -> dict[str, Any]:
    from flows.curate import CurateParams, curate_flow

    store = storage()
    sources = list(cfg.curate.sources)
    if not sources:
        facts = teacher_facts(teacher["bundle_uri"])
        world = facts["world"]
        sources = [{"kind": "shapes", "count": cfg.curate.scenes, "name": "shapes",
                    "resolution": facts["resolution"] or 64, **({"world": json.dumps(world)} if world else {})}]
    name = "pipeline-" + stage_key("dataset", [sources, cfg.curate.overrides], [])[:12]
    out = store.join(get_settings().storage_root, "datasets", name)
    manifest = curate_flow(CurateParams(sources=sources, out=out, overrides=cfg.curate.overrides))
    return _json_safe({"dataset_uri": out, "dataset_hash": manifest["dataset_hash"], "counts": manifest["counts"],
                       "cache_hit": manifest.get("cache_hit", False), "mlflow_run_id": manifest.get("mlflow_run_id")})


def _cache(cfg: PipelineConfig, teacher: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    from flows.cache import TOY_ENCODERS, CacheParams, cache_teacher_flow

    manifest = cache_teacher_flow(CacheParams(dataset_uri=data["dataset_uri"], bundle_uri=teacher["bundle_uri"],
                                              encoders=cfg.cache.encoders or list(TOY_ENCODERS),
                                              feature_layers=cfg.cache.feature_layers, overrides=cache_overrides(cfg)))
    return _json_safe({"cache_uri": manifest["uri"], "key": manifest["key"], "samples": manifest["samples"],
                       "cache_hit": manifest.get("cache_hit", False), "mlflow_run_id": manifest.get("mlflow_run_id")})


def _decoder(cfg: PipelineConfig, typed: StageConfigs, teacher: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    from flows.decoder import DecoderParams, train_decoder_flow

    result = train_decoder_flow(DecoderParams(cache_uri=cache["cache_uri"], bundle_uri=teacher["bundle_uri"],
                                              preset=cfg.pretrain.preset, overrides=cfg.pretrain.overrides,
                                              train_overrides=typed.decoder))
    return _json_safe({"checkpoint": result["checkpoint"], "report": result["report"],
                       "cache_hit": result.get("cache_hit", False), "mlflow_run_id": result.get("mlflow_run_id")})


def _pretrain(cfg: PipelineConfig, typed: StageConfigs, cache: dict[str, Any]) -> dict[str, Any]:
    from flows.pretrain import PretrainParams, pretrain_flow

    result = pretrain_flow(PretrainParams(cache_uri=cache["cache_uri"], preset=cfg.pretrain.preset,
                                          overrides=cfg.pretrain.overrides, pretrain=typed.pretrain))
    return _json_safe({k: result.get(k) for k in ("key", "step", "mlflow_run_id", "checkpoints", "student",
                                                  "student_uri", "nonfinite_total", "init") if k != "init" or result.get(k)})


def _distill(typed: StageConfigs, teacher: dict[str, Any], cache: dict[str, Any], student: dict[str, Any]) -> dict:
    from flows.distill import DistillParams, distill_steps_flow

    result = distill_steps_flow(DistillParams(cache_uri=cache["cache_uri"], student_uri=student["student_uri"],
                                              bundle_uri=teacher["bundle_uri"], distill=typed.distill))
    return _json_safe({k: result.get(k) for k in ("key", "step", "mlflow_run_id", "checkpoints", "student",
                                                  "student_uri", "sampler", "nonfinite_total")})


def _evaluate(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str) -> dict[str, Any]:
    from flows.evaluate import EvaluateParams, evaluate_flow

    out: dict[str, Any] = {}
    for i, (name, ref) in enumerate(refs.items()):
        options = dict(cfg.evaluate.options) | {"reference_rows": i == 0}
        result = evaluate_flow(EvaluateParams(model=ref, benchmarks=cfg.evaluate.benchmarks,
                                              parent_run_id=parent_run_id, **options))
        out[name] = _json_safe({k: result[k] for k in ("model", "generation", "benchmarks", "reference_rows",
                                                       "timings", "folders", "mlflow_run_id", "results_path",
                                                       "grids", "scale") if result.get(k) is not None})
    return {"models": out, "mlflow_run_id": next((r.get("mlflow_run_id") for r in out.values()), None)}


def _export(cfg: PipelineConfig, typed: StageConfigs, teacher: dict[str, Any], final: dict[str, Any],
            decoder: dict | None) -> dict:
    from flows.export import ExportParams, export_flow

    facts = teacher_facts(teacher["bundle_uri"])
    parts = [p for p in cfg.export.parts if not (p == "decoder" and decoder is None)
             and not (p == "text_encoder" and facts["text_encoder"] is None)]
    store = storage()
    report = export_flow(ExportParams(model=store.join(final["student_uri"], student_files.UNET),
                                      formats=list(cfg.export.formats), parts=parts,
                                      decoder=decoder["checkpoint"] if decoder else None,
                                      text_encoder=facts["text_encoder"] if "text_encoder" in parts else None,
                                      export_overrides=typed.export,
                                      out=store.join(final["student_uri"], "export")))
    return _json_safe({"uri": report["uri"], "parts": report.get("parts", {}), "seconds": report.get("seconds"),
                       "parity_passed": _parity_passed(report), "cache_hit": report.get("cache_hit", False),
                       "mlflow_run_id": report.get("mlflow_run_id"), "formats": report.get("formats")})


def _parity_passed(report: dict[str, Any]) -> bool:
    """Every parity check that ran passed (export raises on a failed gate; this is the record of it)."""
    checks = []
    for part in report.get("parts", {}).values():
        checks += [art.get("parity", {}).get("passed") for art in part.get("onnx", {}).values()]
        cm = part.get("coreml") or {}
        checks += [cm.get("swap_parity", {}).get("passed")] if cm.get("swap_parity") else []
    checks = [c for c in checks if c is not None]
    return bool(checks) and all(checks)


def _register(cfg: PipelineConfig, run: Any, stages: _Stages, final: dict[str, Any]) -> dict[str, Any]:
    from snapgen_model.evaluation.suite import flatten_metrics

    ev = stages.results.get("evaluate", {}).get("models", {})
    model_eval = ev.get("distilled") or ev.get("pretrained") or {}
    metrics = flatten_metrics(model_eval) if model_eval else {}
    export = stages.results.get("export") or {}
    files = list_files(final["student_uri"], [*student_files.WEIGHTS, student_files.CARD])
    if export.get("uri"):
        files |= {f"export/{k}": v for k, v in list_files(export["uri"]).items()}
    run.log_dict({"config": cfg.model_dump(), "stage_keys": stages.keys}, "model/pipeline_config.json")
    run.log_dict(model_eval, "model/eval_results.json")
    run.log_dict({"export": export, "files": files}, "model/export_and_files.json")
    teacher, data = stages.results["teacher"], stages.results["curate"]
    lineage = lineage_tags(dataset_hash=data["dataset_hash"], teacher_id=teacher["bundle_id"],
                                    config_hash=stages.keys["register"],
                                    parent_runs=[r["mlflow_run_id"] for r in stages.rows if r.get("mlflow_run_id")])
    source = f"runs:/{run.run_id}/model"
    if cfg.promotion.pyfunc:  # the version loads with mlflow.pyfunc.load_model and turns prompts into images
        from flows.sampling import local_path

        tiny = (stages.results.get("train_decoder") or {}).get("checkpoint")  # predict(params={"decoder": "tiny"})
        source = mlflow_model.log_pyfunc(run, local_folder(final["student_uri"]), local_folder(teacher["bundle_uri"]),
                                         decoder=local_path(tiny) if tiny else None)
    out = registry.register_candidate(cfg.promotion.model_name, source, run_id=run.run_id,
                                      folder_uri=final["student_uri"], files=files, metrics=metrics,
                                      export_uri=export.get("uri"), parity_passed=export.get("parity_passed"),
                                      lineage=lineage | {"snapgen.preset": cfg.preset,
                                                         "snapgen.stage": stages.results.get("distill_steps") and
                                                         "distill_steps" or "pretrain"},
                                      description=f"snapgen pipeline {cfg.preset}: {final['student_uri']}")
    return out | {"metrics": metrics, "mlflow_run_id": run.run_id}


def _promote(cfg: PipelineConfig, registered: dict[str, Any]) -> dict[str, Any]:
    p = cfg.promotion
    decision = registry.promote(f"models:/{registered['name']}/{registered['version']}",
                                [g.model_dump() for g in p.gates], p.tolerance, p.require_export_parity,
                                p.demo_thresholds)
    return _json_safe(decision)


# ----------------------------------------------------------------------------- the flow

@flow(name="snapgen-pipeline", log_prints=True)
def snapgen_pipeline(preset: str = "toy", overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """The whole pipeline for `preset` with `--set` style `overrides`; returns the run summary."""
    from flows.pipeline_report import finish_report, headline_metrics

    logger = get_run_logger()
    cfg = build_config(preset, list(overrides or []))
    typed = validate_stage_configs(cfg)  # every stage config parsed once; the flows receive the typed ones
    settings = get_settings()
    if cfg.experiment is None:  # one experiment for pipelines and stand-alone stage runs alike
        cfg = cfg.model_copy(update={"experiment": settings.experiment_name})
    started = time.monotonic()
    stages = _Stages(force, logger)
    with tracking.start_run(settings, f"pipeline {preset}", experiment=cfg.experiment,
                            tags={"snapgen.stage": "pipeline", "snapgen.preset": preset,
                                  "snapgen.prefect_flow_run": str(flow_run.get_id() or "")},
                            system_metrics=True) as run, \
            tracking.pipeline_scope(cast(str, cfg.experiment), run.run_id):  # set above when None
        run.log_params({"preset": preset, "overrides": list(overrides or []), "config": cfg.model_dump()})
        teacher = stages.run("teacher", cfg.teacher.model_dump(), [], lambda: _teacher(cfg))
        data = stages.run("curate", cfg.curate.model_dump(), ["teacher"], lambda: _curate(cfg, teacher),
                          outputs=lambda r: [storage().join(r["dataset_uri"], "manifest.json")])
        derived = flow_overrides(cfg)  # in the key only where it adds something (older keys stay valid)
        cache = stages.run("cache_teacher", [cfg.cache.model_dump(), derived] if derived else cfg.cache.model_dump(),
                           ["teacher", "curate"],
                           lambda: _cache(cfg, teacher, data),
                           outputs=lambda r: [storage().join(r["cache_uri"], "manifest.json")])
        decoder = None
        if cfg.decoder.enabled:
            decoder = stages.run("train_decoder", [cfg.decoder.model_dump(), cfg.pretrain.preset, cfg.pretrain.overrides],
                                 ["cache_teacher"], lambda: _decoder(cfg, typed, teacher, cache),
                                 outputs=lambda r: [r["checkpoint"]])
        else:
            stages.skip("train_decoder", "decoder.enabled=false")
        student = stages.run("pretrain", cfg.pretrain.model_dump(), ["cache_teacher"], lambda: _pretrain(cfg, typed, cache),
                             outputs=lambda r: [storage().join(r["student_uri"], student_files.CARD)])
        final = student
        if cfg.distill.enabled:
            final = stages.run("distill_steps", cfg.distill.model_dump(), ["pretrain"],
                               lambda: _distill(typed, teacher, cache, student),
                               outputs=lambda r: [storage().join(r["student_uri"], student_files.CARD)])
        else:
            stages.skip("distill_steps", "distill.enabled=false")
        refs = {"teacher": teacher["bundle_uri"], "pretrained": student["student_uri"],
                "distilled": final["student_uri"] if cfg.distill.enabled else None}
        refs = {k: v for k, v in refs.items() if v and k in cfg.evaluate.models}
        if cfg.scale == "full":
            refs.pop("teacher", None)  # a full SD3 teacher is not sampled by the evaluation stage
        evaluated = stages.run("evaluate", cfg.evaluate.model_dump(), ["teacher", "pretrain", "distill_steps"],
                               lambda: _evaluate(cfg, refs, run.run_id),
                               outputs=lambda r: [m["results_path"] for m in r["models"].values()
                                                  if m.get("results_path") and "://" in m["results_path"]])
        run.log_metrics(headline_metrics(evaluated.get("models") or {}))  # cached or not: the run shows them
        if cfg.export.enabled:
            stages.run("export", cfg.export.model_dump(), ["distill_steps", "train_decoder"],
                       lambda: _export(cfg, typed, teacher, final, decoder),
                       outputs=lambda r: [storage().join(r["uri"], "manifest.json")])
        else:
            stages.skip("export", "export.enabled=false")
        registered = stages.run("register", cfg.promotion.model_name, ["evaluate", "export"],
                                lambda: _register(cfg, run, stages, final))
        if cfg.promotion.enabled:
            stages.run("promote", cfg.promotion.model_dump(), ["register"], lambda: _promote(cfg, registered))
        else:
            stages.skip("promote", "promotion.enabled=false")
        summary = {"preset": preset, "config": cfg.model_dump(), "stages": stages.rows, "keys": stages.keys,
                   "results": _json_safe(stages.results), "mlflow_run_id": run.run_id,
                   "flow_run_id": str(flow_run.get_id() or ""), "seconds": round(time.monotonic() - started, 1),
                   "aliases": registry.aliases(cfg.promotion.model_name)}
        report = finish_report(summary, run)
        summary["report"] = report
        run.log_metrics({"pipeline_seconds": summary["seconds"]})
        summary_uri = storage().join(settings.storage_root, "pipelines", "runs", f"{run.run_id}.json")
        summary["summary_uri"] = write_summary(_json_safe(summary), summary_uri)
        create_markdown_artifact(report["markdown"], key=f"pipeline-{preset}", description=f"snapgen pipeline {preset}")
    logger.info("pipeline %s finished in %.0f s", preset, summary["seconds"])
    return summary
