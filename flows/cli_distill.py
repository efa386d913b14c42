"""`snapgen distill`: adversarial step distillation of a pretrained student (register in flows/cli.py
with ``app.command("distill")(distill)``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

console = Console() if sys.stdout.isatty() else Console(width=120)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=120)


def as_uri(value: str) -> str:
    """Local paths become file:// URIs; URIs pass through."""
    return value if "://" in value else "file://" + str(Path(value).expanduser().resolve())


def distill(
    cache_uri: str = typer.Option(..., "--cache", help="teacher cache URI (snapgen cache output)"),
    student_uri: str = typer.Option(..., "--student", help="pretrained student folder (snapgen pretrain output: "
                                    "unet_ema.safetensors + conditioner.safetensors)"),
    bundle_uri: str = typer.Option(..., "--bundle", "-b", help="teacher bundle folder (diffusers layout)"),
    set_: list[str] = typer.Option([], "--set", help="StepDistillConfig override, e.g. --set sampler_steps=8 "
                                   "--set discriminator.loss=non_saturating"),
    resume: str = typer.Option("latest", "--resume", help="latest | none | a state folder"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Distill a pretrained student into a few-step student (adversarial + scaled KD; resumes the latest checkpoint)."""
    from snapgen_model.config_base import ConfigError
    from flows.distill import DistillParams, distill_steps_flow
    from tasks.defaults import prefect_env_defaults
    from tasks.settings import get_settings

    prefect_env_defaults(get_settings())
    try:
        params = DistillParams(cache_uri=as_uri(cache_uri), student_uri=as_uri(student_uri),
                               bundle_uri=as_uri(bundle_uri), distill=set_, resume=resume)
        params.config()  # a bad --set is named here, before a flow run starts (no Prefect traceback)
        result = distill_steps_flow(params)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        console.print(f"distilled a {result['sampler']['steps']}-step student to step {result['step']}: "
                      f"{result['student']['unet']}; MLflow run {result['mlflow_run_id']}")
