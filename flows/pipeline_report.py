"""The end of a pipeline run: the summary table (terminal and markdown), and the self-contained HTML
run report (loss curves, per-category eval bars, sample grids, export sizes, lineage) logged to MLflow.
Orchestration only: numbers come from the stage results and MLflow; drawing is snapgen_model.report_html."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from tasks import tracking
from tasks.settings import get_settings

MODEL_LABELS = {"teacher": "teacher (toy SD3)", "pretrained": "student, KD-pretrained", "distilled": "student, few-step"}
REFERENCE_LABELS = {"clean": "ref: clean renders", "ae": "ref: AE ceiling", "floor": "ref: prompt-blind floor",
                    "noise": "ref: noise", "blank": "ref: blank"}
COLUMNS = ["model", "steps", "GenEval", "exact count", "seen", "held-out", "DPG", "FID"]
CPU_NOTE = ("What this CPU demo shows: every stage runs, losses fall, tables, exports and the registry work, and the "
            "teacher (the shipped release toy-teacher/v1, trained once) follows prompts above the prompt-blind floor. "
            "What it does not show: students trained for minutes on 2 cores do not reach the floor yet; see "
            "bench/RESULTS.md for the figures and `snapgen run --preset toy-gpu` for a GPU run.")


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
        rows.append([MODEL_LABELS.get(name, name), steps, _num(g.get("overall")),
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
    if summary["config"]["scale"] == "toy" and summary["preset"] != "toy-gpu":
        lines += ["", CPU_NOTE]
    return "\n".join(lines)


def _curves(summary: dict[str, Any]) -> dict[str, dict[str, list[list[float]]]]:
    settings = get_settings()
    panels = {}
    for stage, prefixes in (("pretrain", ("loss",)), ("distill_steps", ("loss", "d/")),
                            ("train_decoder", ("decoder.",))):
        run_id = (summary["results"].get(stage) or {}).get("mlflow_run_id")
        if not run_id:
            continue
        hist = tracking.metric_histories(settings, run_id, prefixes)
        series = {k: [[s, v] for s, v in pts] for k, pts in hist.items() if len(pts) > 1}
        if series:
            panels[stage] = series
    return panels


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
        "notes": [CPU_NOTE] if summary["config"]["scale"] == "toy" and summary["preset"] != "toy-gpu" else [],
        "summary": {"columns": COLUMNS, "rows": summary_rows(summary)},
        "stages": summary["stages"], "key_metrics": {"pipeline seconds": summary["seconds"]},
        "curves": curves, "eval_bars": _eval_bars(summary), "images": _images(summary),
        "exports": export_rows(summary),
        "lineage": {"dataset hash": data.get("dataset_hash"), "teacher": teacher.get("bundle_id"),
                    "teacher bundle": teacher.get("bundle_uri"), "git commit": tracking.git_commit(),
                    "code version": tracking.code_version(), **{f"stage key: {k}": v for k, v in summary["keys"].items()}},
        "links": {"MLflow tracking": tracking.redact_uri(settings.mlflow_tracking_uri)},
        "missing": missing,
    }


def finish_report(summary: dict[str, Any], run: Any) -> dict[str, Any]:
    """Markdown + HTML report; the HTML and the summary are logged to the pipeline's MLflow run."""
    from snapgen_model.report_html import write_run_report

    md = markdown(summary)
    out_dir = Path(get_settings().home) / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = write_run_report(report_data(summary), out_dir / f"pipeline-{summary['mlflow_run_id']}.html")
    run.log_artifact(str(html_path), "report")
    run.log_text(md, "report/summary.md")
    return {"markdown": md, "html": str(html_path)}
