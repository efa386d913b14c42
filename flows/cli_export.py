"""`snapgen export`: the export flow from the command line, with the report as a rich table.

Registered in flows/cli.py as a sub-command, e.g. ``app.command()(export)``:

    snapgen export --model runs/toy/unet.safetensors --formats onnx,coreml --palettize 6
    snapgen export --model s3://bucket/models/m1/unet.safetensors --set export.onnx_fp16=true --json

``--set`` keys starting with ``export.`` go to ExportConfig (e.g. ``export.text_length=77``); all
other keys override the preset (e.g. ``image_size=256``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_checks import preset_option
from snapgen_model.config_base import ConfigError

console = Console() if sys.stdout.isatty() else Console(width=140)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)

EXPORT_PREFIX = "export."


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(preset overrides, ExportConfig overrides) from `--set` values."""
    preset: list[str] = []
    export: list[str] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        (export if item.startswith(EXPORT_PREFIX) else preset).append(
            item[len(EXPORT_PREFIX):] if item.startswith(EXPORT_PREFIX) else item)
    return preset, export


def export_table(report: dict[str, Any]) -> Table:
    """Rich table of an export report: one row per artifact, with parity and CPU latency."""
    from snapgen_model.export.report import parity_rows

    caption = f"export key {report.get('export_key', '')[:16]}"
    gen = report.get("generation")
    if gen:
        caption += (f"; ORT {gen['steps']}-step generation PSNR {gen['image_psnr']:.1f} dB "
                    f"(>= {gen['min_psnr']:.0f}: {'pass' if gen['passed'] else 'FAIL'})")
    for name, why in report.get("skipped_parts", {}).items():
        caption += f"; {name} skipped ({why})"
    if report.get("cache_hit"):
        caption += "; cache hit: nothing exported again"
    table = Table(title=f"export of {report.get('preset', '?')} ({report.get('resolution', '?')})", caption=caption)
    for col, just in (("part", "left"), ("artifact", "left"), ("size", "right"), ("parity", "left"),
                      ("CPU latency", "right")):
        table.add_column(col, justify=just)
    for row in parity_rows(report):
        table.add_row(row["part"], row["artifact"], row["size"], row["parity"], row["latency"])
    return table


def budget_table(report: dict[str, Any]) -> Table | None:
    """The paper's mobile budget beside our counts."""
    budget = report.get("paper_budget")
    if not budget:
        return None
    paper, ours = budget["paper"], budget["ours"]
    table = Table(title=f"paper budget: {paper['device']}, {paper['resolution']}px", caption=budget["note"])
    for col in ("part", "paper params", "paper latency", "our params", "our MACs", "projected"):
        table.add_column(col, justify="left" if col == "part" else "right")
    latencies = (("unet", f"{paper['unet_ms_per_step']:.0f} ms/step"), ("decoder", f"{paper['decoder_ms']:.0f} ms"))
    for name, latency in latencies:
        o = ours.get(name)
        if o:
            table.add_row(name, f"{paper[name + '_params'] / 1e6:.2f}M", latency, f"{o['params'] / 1e6:.3f}M",
                          f"{o['macs'] / 1e9:.3f}G", f"{o['projected_phone_ms']:.3g} ms")
    return table


def export(
    model: str = typer.Option(..., "--model", "-m",
                              help="UNet checkpoint file or folder: a path, file:// or s3:// URI "
                                   "(models:/ refs need the registry)"),
    formats: str = typer.Option("onnx", "--formats", "-f", help="comma-separated: onnx, coreml"),
    preset: Optional[str] = preset_option(None, "model", "model preset (default: the one stored with the checkpoint)"),
    set_: list[str] = typer.Option([], "--set", help="override key=value; export.* keys go to ExportConfig"),
    palettize: Optional[int] = typer.Option(None, "--palettize", help="Core ML weight palettization bits: 4, 6 or 8"),
    parts: str = typer.Option("unet,decoder,text_encoder", "--parts", help="comma-separated parts to export"),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="tiny decoder checkpoint (default: fresh init)"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="CLIPTextModelWithProjection folder"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="destination URI (default: <model folder>/export)"),
    force: bool = typer.Option(False, "--force", help="export again even if the destination is up to date"),
    track: bool = typer.Option(True, "--track/--no-track", help="log the report and files to MLflow"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Export the UNet, tiny decoder and text encoder to ONNX / Core ML, gated on numeric parity."""
    from pydantic import ValidationError

    from flows.export import ExportParams, export_flow
    from snapgen_model.export import ParityError
    from tasks.defaults import prefect_env_defaults
    from flows.cli_checks import (check_checkpoint, check_model, check_storage_access, check_storage_uri,
                                  describe_params_error, settings_or_fail)

    try:
        preset_overrides, export_overrides = split_overrides(set_)
        params = ExportParams(model=model, formats=_csv(formats), parts=_csv(parts), preset=preset,
                              overrides=preset_overrides, export_overrides=export_overrides, palettize=palettize,
                              decoder=decoder, text_encoder=text_encoder, out=out, force=force, track=track)
    except ConfigError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(describe_params_error(exc))
    # checked before Prefect starts: settings, the destination, the model and the given parts
    settings = settings_or_fail()
    if out:
        check_storage_access("--out", check_storage_uri("--out", out), settings)
    check_model("--model", model, settings)
    for option, value in (("--decoder", decoder), ("--text-encoder", text_encoder)):
        if value and "://" not in value:
            check_checkpoint(option, Path(value))
    env = prefect_env_defaults(settings)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # the ephemeral API's SQLite lives there
    try:
        report = export_flow(params)
    except (ParityError, LookupError, ConfigError, FileNotFoundError) as exc:  # LookupError: an unknown models:/ ref
        _fail(str(exc), code=1 if isinstance(exc, ParityError) else 2)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    console.print(export_table(report))
    budget = budget_table(report)
    if budget is not None:
        console.print(budget)
    console.print(f"export at [bold]{report['uri']}[/]" + (f", MLflow run {report['mlflow_run_id']}"
                                                        if report.get("mlflow_run_id") else ""))


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _fail(message: str, code: int = 2) -> None:
    from flows.cli_checks import fail

    fail(message, code)
