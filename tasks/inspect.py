"""Tasks of the inspect flow: build a preset's architecture report, log it to MLflow."""
from __future__ import annotations

from typing import Any

from prefect import task

from snapgen_model.inspect import inspect_config
from snapgen_model.presets import get_preset
from tasks.defaults import compute_task_options, io_task_options
from tasks.settings import get_settings
from tasks.lineage import lineage_tags
from tasks.tracking import start_run


@task(name="inspect-preset", **compute_task_options())
def inspect_preset(preset: str, overrides: list[str]) -> dict[str, Any]:
    """Per-stage parameter/MAC table and the resolved config of a preset."""
    cfg = get_preset(preset, overrides)
    return {"config": cfg.to_dict(), "config_hash": cfg.content_hash(), "report": inspect_config(cfg).to_dict()}


@task(name="log-inspect-report", **io_task_options())
def log_inspect_report(result: dict[str, Any], table_markdown: str) -> str:
    """One MLflow run with the config as params, totals as metrics, table and config as artifacts."""
    settings = get_settings()
    report = result["report"]
    tags = lineage_tags(config_hash=result["config_hash"]) | {"snapgen.stage": "inspect"}
    with start_run(settings, f"inspect {report['preset']}", tags=tags) as run:
        run.log_params(result["config"])
        run.log_metrics({
            "unet_params": report["unet_params"], "unet_gmacs": report["unet_macs"] / 1e9,
            "decoder_params": report["decoder_params"], "decoder_gmacs": report["decoder_macs"] / 1e9,
        })
        run.log_dict(result["config"], "config.json")
        run.log_dict(report, "inspect_report.json")
        run.log_text(table_markdown, "inspect_table.md")
        return run.run_id
