"""The end of a pipeline run: the summary table (terminal and markdown), and the self-contained HTML
run report (loss curves, per-category eval bars, sample grids, export sizes, lineage) logged to MLflow.
Orchestration only: numbers come from the stage results and MLflow; drawing is reporting.html."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from tasks import lineage, registry, tracking
from tasks.settings import get_settings

MODEL_LABELS = {"teacher": "teacher (toy SD3)", "pretrained": "student, KD-pretrained", "distilled": "student, few-step"}
REFERENCE_LABELS = {"clean": "ref: clean renders", "ae": "ref: AE ceiling", "floor": "ref: prompt-blind floor",
                    "noise": "ref: noise", "blank": "ref: blank"}
COLUMNS = ["model", "steps", "GenEval", "exact count", "seen", "held-out", "DPG", "FID"]
CPU_MECHANICS = ("What this CPU run shows: every stage runs, losses fall, tables, exports and the registry work. "
                 "Quality needs hours of training: see bench/RESULTS.md for the figures and `snapgen run --preset "
                 "toy-gpu` for a GPU run.")


def model_label(summary: dict[str, Any], name: str) -> str:
    """The table's name of an evaluated model; a pretrained student that started from another student
    (`pretrain.init`, e.g. the shipped release) says so, with the steps this run trained."""
    label = MODEL_LABELS.get(name, name)
    pre = summary["results"].get("pretrain") or {}
    if name == "pretrained" and pre.get("init"):
        return f"{label} (from {str(pre['init']).removeprefix('release://')}, +{pre.get('step')} steps here)"
    return label


def init_note(summary: dict[str, Any]) -> str:
    """A sentence on where the pretrained student started, when it did not start from random weights."""
    pre = summary["results"].get("pretrain") or {}
    if not pre.get("init"):
        return ""
    source = str(pre["init"])
    shipped = (f"the shipped student {source.removeprefix('release://')} (pretrained once, for hours)"
               if source.startswith("release://") else source)
    return (f" The KD-pretrained student started from {shipped} and this run trained it "
            f"{pre.get('step')} more steps on its own data; the few-step student was distilled from it here. "
            "`--set pretrain.train.init=` pretrains from random weights instead.")


def cpu_note(summary: dict[str, Any]) -> str | None:
    """The closing note of a toy run on the CPU presets (None for toy-gpu and full scale): what it shows,
    with each model's GenEval against the prompt-blind floor read from this run's own table, never a
    claim the table does not back (a toy-smoke teacher trained for seconds does not follow prompts)."""
    if summary["config"]["scale"] != "toy" or summary["preset"] == "toy-gpu":
        return None
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    floor = next((_num(_dig(res.get("reference_rows") or {}, "floor", "geneval", "overall"))
                  for res in models.values() if (res.get("reference_rows") or {}).get("floor")), None)
    if floor is None:
        return CPU_MECHANICS + init_note(summary)
    scores = {name: _num(_dig(res.get("benchmarks") or {}, "geneval", "overall")) for name, res in models.items()}
    parts = [f"{MODEL_LABELS.get(n, n)} {v:.3f} ({'above' if v > floor else 'not above'} it)"
             for n, v in scores.items() if v is not None]
    return (f"{CPU_MECHANICS} GenEval against the prompt-blind floor {floor:.3f}: " + ", ".join(parts) + "."
            + init_note(summary) if parts else CPU_MECHANICS + init_note(summary))


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _split(geneval: dict[str, Any], *names: str) -> float | None:
    splits = geneval.get("splits") or {}
    return next((_num(splits[n]) for n in names if n in splits), None)


HEADLINE = {"geneval/overall": ("geneval", "overall"), "geneval/exact_count": ("geneval", "exact_count", "overall"),
            "dpg/overall": ("dpg", "overall"), "fid": ("fid", "fid"), "clip_score": ("clip", "value")}


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def headline_metrics(models: dict[str, Any]) -> dict[str, float]:
    """`<model>/<metric>` for each evaluated model (teacher, pretrained, distilled) and `reference/<row>/...`
    for the reference rows: the numbers the pipeline's MLflow run carries, comparable across runs."""
    out: dict[str, float] = {}
    for name, res in models.items():
        for metric, path in HEADLINE.items():
            value = _num(_dig(res.get("benchmarks") or {}, *path))
            if value is not None:
                out[f"{name}/{metric}"] = value
        for row, scores in (res.get("reference_rows") or {}).items():
            for bench in ("geneval", "dpg"):
                value = _num(_dig(scores, bench, "overall"))
                if value is not None:
                    out[f"reference/{row}/{bench}"] = value
    return out


def summary_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """Rows of the final table: each evaluated model, then the reference rows."""
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    rows: list[list[Any]] = []
    reference: dict[str, Any] = {}
    for name, res in models.items():
        bench = res.get("benchmarks") or {}
        g, d, f = bench.get("geneval") or {}, bench.get("dpg") or {}, bench.get("fid") or {}
        steps = ((res.get("generation") or {}).get("sampler") or {}).get("steps")
        rows.append([model_label(summary, name), steps, _num(g.get("overall")),
                     _num((g.get("exact_count") or {}).get("overall")), _split(g, "seen", "train"),
                     _split(g, "heldout", "held-out"), _num(d.get("overall")), _num(f.get("fid"))])
        reference = reference or (res.get("reference_rows") or {})
    for row, scores in reference.items():
        g = scores.get("geneval") or {}
        rows.append([REFERENCE_LABELS.get(row, f"ref: {row}"), None, _num(g.get("overall")),
                     _num((g.get("exact_count") or {}).get("overall")), _split(g, "seen", "train"),
                     _split(g, "heldout", "held-out"), _num((scores.get("dpg") or {}).get("overall")), None])
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"snapgen pipeline `{summary['preset']}`: models and reference rows")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "model" else "right")
    for row in summary_rows(summary):
        table.add_row(*[_fmt(v) for v in row])
    return table


def stage_table(summary: dict[str, Any]) -> Table:
    table = Table(title="stages")
    for c in ("stage", "status", "seconds", "MLflow run"):
        table.add_column(c)
    for r in summary["stages"]:
        table.add_row(r["name"], r["status"], f"{r['seconds']:.1f}", (r.get("mlflow_run_id") or "-")[:12])
    return table


def export_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    export = summary["results"].get("export") or {}
    rows = []
    for part, info in (export.get("parts") or {}).items():
        for variant, art in (info.get("onnx") or {}).items():
            parity = art.get("parity") or {}
            rows.append({"part": part, "format": f"onnx ({variant})", "bytes": art.get("bytes"),
                         "params": info.get("params"), "parity": _num(parity.get("max_abs")),
                         "passed": parity.get("passed"), "path": art.get("path")})
        cm = info.get("coreml") or {}
        if cm.get("bytes"):
            parity = cm.get("swap_parity") or {}
            rows.append({"part": part, "format": "coreml (mlpackage)", "bytes": cm.get("bytes"),
                         "params": info.get("params"), "parity": _num(parity.get("max_abs")),
                         "passed": parity.get("passed"), "path": cm.get("path")})
    return rows


def promotion_line(summary: dict[str, Any]) -> str:
    p = summary["results"].get("promote")
    reg = summary["results"].get("register") or {}
    aliases = summary.get("aliases") or {}
    head = (f"registered {reg.get('name', '?')} v{reg.get('version', '?')} (alias candidate); "
            f"champion: v{aliases.get('champion', '-')}")
    if not p:
        return head + "; promotion not run"
    verdict = "promoted to champion" if p.get("promoted") else ("already champion" if p.get("note") else "NOT promoted")
    demo = " (demo thresholds: the CPU demo's gates are set to pass mechanics, not quality)" \
        if summary["config"]["promotion"]["demo_thresholds"] else ""
    reasons = "; ".join(p.get("reasons") or [])
    return f"{head}; v{p.get('version')} {verdict}{demo}" + (f": {reasons}" if reasons else "")


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"## snapgen pipeline `{summary['preset']}`: {summary['seconds']:.0f} s", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in summary_rows(summary)]
    lines += ["", "| stage | status | seconds | MLflow run |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r.get('mlflow_run_id') or '-'} |"
              for r in summary["stages"]]
    ex = export_rows(summary)
    if ex:
        lines += ["", "| part | format | MB | parity max abs |", "|---|---|---|---|"]
        lines += [f"| {r['part']} | {r['format']} | {r['bytes'] / 1e6:.2f} | {_fmt(r['parity'])} |" for r in ex]
    lines += ["", promotion_line(summary)]
    note = cpu_note(summary)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def _curve_panels(stage: str, hist: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, list[list[float]]]]:
    """Panels of one stage's histories: the teacher's per training phase (autoencoder, denoiser), each
    distillation loss on its own axis (their scales differ by orders of magnitude), others together."""
    series = {k: [[s, v] for s, v in pts] for k, pts in hist.items() if len(pts) > 1}
    if stage == "teacher":
        groups: dict[str, dict[str, Any]] = {}
        for key, pts in series.items():
            phase = key.split("/", 1)[0]
            groups.setdefault("teacher: " + {"autoencoder": "AE", "teacher": "denoiser"}.get(phase, phase), {})[key] = pts
        return groups
    if stage == "distill_steps":
        panels = {f"distill: {k}": {k: v} for k, v in series.items() if not k.startswith("d/")}
        accuracy = {k: v for k, v in series.items() if k.startswith("d/")}
        return panels | ({"distill: discriminator accuracy": accuracy} if accuracy else {})
    return {stage: series} if series else {}


def _curves(summary: dict[str, Any]) -> dict[str, dict[str, list[list[float]]]]:
    settings = get_settings()
    panels: dict[str, dict[str, list[list[float]]]] = {}
    for stage, prefixes in (("teacher", ("autoencoder/", "teacher/", "text/")), ("pretrain", ("loss",)),
                            ("distill_steps", ("loss", "d/")), ("train_decoder", ("decoder.",))):
        run_id = (summary["results"].get(stage) or {}).get("mlflow_run_id")
        if run_id:
            panels |= _curve_panels(stage, tracking.metric_histories(settings, run_id, prefixes))
    return panels


# ----------------------------------------------------------------------------- dashboard parts

CARD_METRICS = (("GenEval", ("geneval", "overall"), True), ("GenEval exact count", ("geneval", "exact_count", "overall"), True),
                ("DPG", ("dpg", "overall"), True), ("FID", ("fid", "fid"), False))


def model_cards(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One card per evaluated model: its headline metrics against the prompt-blind floor and the AE
    ceiling (clean renders when there is no AE row) of the reference rows."""
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    reference: dict[str, Any] = next((r.get("reference_rows") for r in models.values() if r.get("reference_rows")), {}) or {}
    floor = reference.get("floor") or {}
    ceiling_name = "ae" if "ae" in reference else "clean"
    ceiling = reference.get(ceiling_name) or {}
    cards = []
    for name, res in models.items():
        bench = res.get("benchmarks") or {}
        steps = ((res.get("generation") or {}).get("sampler") or {}).get("steps")
        metrics = [{"name": label, "value": _num(_dig(bench, *path)), "higher_is_better": higher,
                    "floor": _num(_dig(floor, *path)) if higher else None,
                    "ceiling": _num(_dig(ceiling, *path)) if higher else None}
                   for label, path, higher in CARD_METRICS]
        cards.append({"model": model_label(summary, name),
                      "subtitle": f"{steps} sampler steps; floor: prompt-blind, ceiling: "
                                  f"{REFERENCE_LABELS.get(ceiling_name, ceiling_name)[5:]}" if steps else None,
                      "metrics": [m for m in metrics if m["value"] is not None]})
    return cards


def gallery(summary: dict[str, Any], per_model: int = 8) -> list[dict[str, Any]]:
    """Per model, the same prompts' first samples with their GenEval verdict from results.jsonl."""
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    chosen: list[str] = []
    out = []
    for name, res in models.items():
        rows: list[dict[str, Any]] = []
        for folder in (res.get("folders") or {}).values():
            path = Path(folder) / "results.jsonl"
            if path.is_file():
                rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        first: dict[str, dict[str, Any]] = {}
        for row in sorted(rows, key=lambda r: str(r.get("filename"))):
            first.setdefault(str(row.get("prompt")), row)
        if not chosen:  # one prompt per task first, then the rest, in file order
            by_tag: dict[str, list[str]] = {}
            for prompt, row in first.items():
                by_tag.setdefault(str(row.get("tag")), []).append(prompt)
            rounds = [p for i in range(max(map(len, by_tag.values()), default=0))
                      for group in by_tag.values() if i < len(group) for p in [group[i]]]
            chosen = rounds[:per_model]
        items = [{"path": first[p].get("filename"), "prompt": p, "passed": bool(first[p].get("correct")),
                  "reason": first[p].get("reason") or "", "detail": first[p].get("tag")} for p in chosen if p in first]
        if items:
            out.append({"model": model_label(summary, name), "items": items,
                        "caption": "first sample per prompt; verdict by the GenEval rules (results.jsonl)"})
    return out


def prefect_ui_url() -> str:
    """The Prefect UI for flow-run links: PREFECT_UI_URL, else the API's host, else `snapgen ui`'s."""
    import os

    ui = os.environ.get("PREFECT_UI_URL", "").strip()
    api = os.environ.get("PREFECT_API_URL", "").strip()
    if not ui and api.startswith(("http://", "https://")):
        ui = api[: -len("/api")] if api.rstrip("/").endswith("/api") else api
    return (ui or "http://127.0.0.1:4200").rstrip("/")


def _subflow_runs(flow_run_id: str) -> list[dict[str, Any]]:
    """Child flow runs of the pipeline's flow run: [{"flow", "id", "start"}] (empty when Prefect cannot say)."""
    if not flow_run_id:
        return []
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            names = {fid: client.read_flow(fid).name for fid in {r.flow_id for r in runs}}
        return sorted(({"flow": names[r.flow_id], "id": str(r.id), "start": str(r.start_time or r.expected_start_time)}
                       for r in runs), key=lambda r: r["start"])
    except Exception as exc:  # noqa: BLE001 - the report shows MLflow links alone
        import warnings

        warnings.warn(f"Prefect subflow runs of {flow_run_id}: {type(exc).__name__}: {str(exc)[:160]}", stacklevel=2)
        return []


FLOW_STAGES = {"bootstrap-teacher": "teacher", "register-teacher-release": "teacher", "curate": "curate",
               "cache-teacher": "cache_teacher", "train-decoder": "train_decoder", "pretrain": "pretrain",
               "distill-steps": "distill_steps", "evaluate": "evaluate", "export": "export"}


def run_links(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """What ran, with its MLflow run and its Prefect flow run, linked into their UIs."""
    settings = get_settings()
    prefect = prefect_ui_url()
    subflows: dict[str, list[str]] = {}
    for r in _subflow_runs(summary.get("flow_run_id") or ""):
        subflows.setdefault(FLOW_STAGES.get(r["flow"], r["flow"]), []).append(r["id"])
    rows = [{"name": f"pipeline {summary['preset']}", "mlflow_run_id": summary["mlflow_run_id"],
             "flow_run_id": summary.get("flow_run_id")}]
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    for stage in summary["stages"]:
        name = stage["name"]
        if name == "evaluate" and models:
            flows = subflows.get("evaluate", [])
            for i, (model, res) in enumerate(models.items()):
                ran = flows[i] if stage["status"] == "completed" and i < len(flows) else None
                rows.append({"name": f"evaluate {MODEL_LABELS.get(model, model)}", "mlflow_run_id": res.get("mlflow_run_id"),
                             "flow_run_id": ran or stage.get("producer_flow_run_id")})
            continue
        flows = subflows.get(name, []) if stage["status"] == "completed" else []
        if stage["status"] == "cached" and stage.get("producer_flow_run_id"):
            flows = [stage["producer_flow_run_id"]]  # the pipeline run that ran it: its Prefect page has the graph
        if stage.get("mlflow_run_id") or flows:
            rows.append({"name": f"{name} ({stage['status']})", "mlflow_run_id": stage.get("mlflow_run_id"),
                         "flow_run_id": flows[0] if flows else None})
    experiments = tracking.run_experiment_ids(settings, [r["mlflow_run_id"] for r in rows if r.get("mlflow_run_id")])
    base = tracking.ui_base_url(settings)
    for r in rows:
        run_id = r.get("mlflow_run_id")
        r["mlflow"] = f"{base}/#/experiments/{experiments[run_id]}/runs/{run_id}" if run_id in experiments else None
        r["prefect"] = f"{prefect}/runs/flow-run/{r['flow_run_id']}" if r.get("flow_run_id") else None
    return rows


def champion_comparison(summary: dict[str, Any]) -> dict[str, Any] | None:
    """This run's registered version beside the champion it was judged against (the previous one)."""
    reg = summary["results"].get("register") or {}
    if not reg.get("version"):
        return None
    decision = summary["results"].get("promote") or {}
    before = decision.get("champion_before") if decision else (summary.get("aliases") or {}).get("champion")
    if before == reg["version"]:
        before = None
    champion: dict[str, float] = {}
    if before:
        try:
            champion = registry.version_metrics(registry.version_tags(f"models:/{reg['name']}/{before}"))
        except Exception as exc:  # noqa: BLE001 - shown as a note
            champion = {}
            before_note = f"champion v{before} could not be read: {type(exc).__name__}"
        else:
            before_note = ""
    candidate = reg.get("metrics") or {}
    higher = {g["metric"]: g.get("higher_is_better", True) for g in summary["config"]["promotion"]["gates"]}
    keys = [k for k in ("geneval/overall", "geneval/exact_count", "dpg/overall", "fid", "kid", "clip_score")
            if k in candidate or k in champion]
    rows = [{"metric": k, "candidate": candidate.get(k), "champion": champion.get(k),
             "higher_is_better": higher.get(k, k not in ("fid", "kid"))} for k in keys]
    verdict = ("promoted to champion" if decision.get("promoted") else "already champion" if decision.get("note")
               else "not promoted" if decision else "promotion not run")
    note = ("no previous champion: this version is the first one judged" if not before
            else before_note or f"v{reg['version']} was judged against champion v{before}")
    if summary["config"]["promotion"].get("demo_thresholds"):
        note += "; demo thresholds (the CPU demo's gates pass mechanics, not quality)"
    return {"candidate": f"v{reg['version']}", "champion": f"v{before}" if before else None, "verdict": verdict,
            "passed": decision.get("passed") if decision else None, "reasons": decision.get("reasons") or [],
            "rows": rows, "note": note}


def _eval_bars(summary: dict[str, Any]) -> dict[str, Any]:
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    bars: dict[str, Any] = {}
    for bench, key in (("GenEval per task", "geneval"), ("DPG per category", "dpg")):
        cats: list[str] = []
        per: dict[str, dict[str, float]] = {}
        for name, res in models.items():
            b = (res.get("benchmarks") or {}).get(key) or {}
            values = b.get("tasks") if key == "geneval" else b.get("categories")
            if not values:
                continue
            per[MODEL_LABELS.get(name, name)] = values
            cats += [c for c in values if c not in cats]
        if per:
            bars[bench] = {"categories": cats, "series": {m: [_num(v.get(c)) for c in cats] for m, v in per.items()}}
    return bars


def _images(summary: dict[str, Any]) -> list[dict[str, Any]]:
    models = (summary["results"].get("evaluate") or {}).get("models", {})
    images = []
    out = Path(get_settings().home) / "reports" / "previews" / summary["mlflow_run_id"]
    for stage, label in (("pretrain", "KD pretraining"), ("distill_steps", "step distillation")):
        run_id = (summary["results"].get(stage) or {}).get("mlflow_run_id")
        path = tracking.latest_artifact(get_settings(), run_id, "previews", out / stage) if run_id else None
        if path is not None:
            images.append({"title": f"{label}: teacher (top) beside the student (bottom)", "path": str(path),
                           "caption": f"fixed prompts and seeds, end of {stage} ({path.stem})"})
    for name, res in models.items():
        for tag, path in sorted((res.get("grids") or {}).items())[:3]:
            images.append({"title": f"{MODEL_LABELS.get(name, name)}: {tag}", "path": path,
                           "caption": f"fixed prompts and seeds; {name}"})
    return images


def report_data(summary: dict[str, Any]) -> dict[str, Any]:
    settings = get_settings()
    teacher = summary["results"].get("teacher") or {}
    data = summary["results"].get("curate") or {}
    missing = {}
    curves = _curves(summary)
    if not curves:
        missing["curves"] = "no metric histories (training stages were cached or MLflow was unreachable)"
    return {
        "title": f"snapgen pipeline: {summary['preset']}", "subtitle": promotion_line(summary),
        "preset": summary["preset"], "run_id": summary["mlflow_run_id"], "flow_run_id": summary["flow_run_id"],
        "notes": [note] if (note := cpu_note(summary)) else [],
        "summary": {"columns": COLUMNS, "rows": summary_rows(summary)},
        "stages": summary["stages"], "key_metrics": {"pipeline seconds": summary["seconds"]},
        "curves": curves, "curves_log_y": [p for p in curves if p.startswith("teacher: AE")],
        "eval_bars": _eval_bars(summary), "images": _images(summary),
        "model_cards": model_cards(summary), "gallery": gallery(summary), "run_links": run_links(summary),
        "champion": champion_comparison(summary),
        "exports": export_rows(summary),
        "lineage": {"dataset hash": data.get("dataset_hash"), "teacher": teacher.get("bundle_id"),
                    "teacher bundle": teacher.get("bundle_uri"), "git commit": lineage.git_commit(),
                    "code version": lineage.code_version(), **{f"stage key: {k}": v for k, v in summary["keys"].items()}},
        "links": {"MLflow UI (experiment runs)": tracking.ui_base_url(settings), "Prefect UI (flow runs)": prefect_ui_url(),
                  "MLflow tracking": tracking.mask_uri(settings.mlflow_tracking_uri)},
        "missing": missing,
    }


def finish_report(summary: dict[str, Any], run: Any) -> dict[str, Any]:
    """Markdown + HTML report; the HTML and the summary are logged to the pipeline's MLflow run."""
    from reporting.html import write_run_report

    md = markdown(summary)
    out_dir = Path(get_settings().home) / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = write_run_report(report_data(summary), out_dir / f"pipeline-{summary['mlflow_run_id']}.html")
    run.log_artifact(str(html_path), "report")
    run.log_text(md, "report/summary.md")
    return {"markdown": md, "html": str(html_path)}
