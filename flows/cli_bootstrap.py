"""`snapgen bootstrap-teacher`: train (or fetch from the cache) the toy world's teacher bundle.

Registered in flows/cli.py as ``app.command("bootstrap-teacher")(bootstrap)``. Training progress
shows as per-phase log lines (every ~10 s: step, elapsed/budget seconds, loss terms); the figures
are printed as a table at the end (or as JSON with --json).
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_checks import preset_option

console = Console() if sys.stdout.isatty() else Console(width=110)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=110)

PRESET_HELP = ("toy teacher size: toy-smoke (seconds), toy (CPU demo, ~7-9 min), toy-gpu (one GPU, <= 5 min of "
               "training), toy-release (the shipped release's recipe, hours on a CPU)")
SET_HELP = "config override key=value (repeatable), e.g. --set teacher_time_budget_s=120"


def result_table(result: dict[str, Any]) -> Table:
    """The bootstrap's figures for the terminal."""
    title = (f"toy teacher {result['config_hash']} ({result['preset']})"
             f"{' - cache hit' if result['cache_hit'] else ''}")
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for phase, seconds in result.get("phase_seconds", {}).items():
        table.add_row(f"{phase} seconds", f"{seconds:.1f}")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def bootstrap(
    preset: str = preset_option("toy", "bootstrap", PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="retrain even if storage holds a bundle of this config"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Train the toy AE and SD3 teacher (+ text encoder) on the shapes world, publish and register the bundle."""
    from snapgen_model.config_base import ConfigError
    from snapgen_model.artifacts.teacher_recipe import get_bootstrap_config

    try:  # validate before importing Prefect (a bad --set fails in a second)
        cfg = get_bootstrap_config(preset, set_)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    from tasks.defaults import prefect_env_defaults
    from tasks.settings import get_settings

    prefect_env_defaults(get_settings())
    from flows.bootstrap import bootstrap_teacher_flow
    if not as_json:
        err.print(f"bootstrap-teacher {preset} (config {cfg.content_hash()}): AE budget "
                  f"{cfg.ae_time_budget_s:.0f} s / {cfg.ae_steps} steps, teacher budget "
                  f"{cfg.teacher_time_budget_s:.0f} s / {cfg.teacher_steps} steps; progress below")
    from flows.console import verbosity

    if verbosity() != "quiet":  # the per-phase progress lines are Prefect INFO logs
        logging.getLogger("prefect").setLevel(logging.INFO)
    try:
        result = bootstrap_teacher_flow(preset=preset, overrides=list(set_), force=force)
    except (ValueError, OSError, FloatingPointError) as exc:  # bad storage root, a diverged loss, a broken bundle
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return
    console.print(result_table(result))
    console.print(f"bundle: {result['bundle_uri']}; MLflow run {result['mlflow_run_id']}, "
                  f"model snapgen-toy-teacher v{result['model_version']}")
