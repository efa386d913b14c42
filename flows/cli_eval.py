"""`snapgen eval`: evaluate a model on GenEval, DPG-Bench, FID/KID and CLIP score (registered in flows/cli.py)."""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console() if sys.stdout.isatty() else Console(width=120)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=120)


def parse_benchmarks(text: str) -> list[str]:
    """`geneval,dpg` -> ["geneval", "dpg"], checked against the known benchmarks."""
    from snapgen_model.evaluation.suite import BENCHMARKS

    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BENCHMARKS]
    if bad or not names:
        raise ValueError(f"--benchmarks {text!r}: unknown {bad}; choose from {','.join(BENCHMARKS)}")
    return names


def results_table(results: dict[str, Any]) -> Table:
    """The results table for the terminal."""
    from snapgen_model.evaluation.suite import table_rows

    model = results["model"]
    table = Table(title=f"evaluation of {model['ref']} ({model['preset']}, {results['scale']} scale)")
    for column in ("benchmark", "metric", "value"):
        table.add_column(column)
    for row in table_rows(results):
        table.add_row(*row)
    return table


def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="checkpoint path/URI (UNet .safetensors or a folder with "
                              "unet.safetensors [+ decoder.safetensors]) or models:/name@alias, models:/name/N"),
    benchmarks: str = typer.Option("geneval,dpg,fid,clip", "--benchmarks", help="comma-separated subset"),
    steps: Optional[int] = typer.Option(None, "--steps", help="sampler steps (default: the checkpoint's)"),
    reuse_images: bool = typer.Option(False, "--reuse-images", help="score saved samples only (never generate)"),
    images_per_prompt: int = typer.Option(4, "--images-per-prompt", help="samples per prompt"),
    seed: int = typer.Option(0, "--seed", min=0,
                             help="base seed: image j of prompt i uses hash(seed, i, j); another seed draws other "
                                  "images, the same seed reproduces them"),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=1.0,
                                             help="classifier-free guidance scale (default: the checkpoint's)"),
    sampler: Optional[str] = typer.Option(None, "--sampler",
                                          help="euler or few_step (default: the checkpoint's); few_step samples an "
                                               "undistilled student the way a distilled one is"),
    max_prompts_per_task: int = typer.Option(0, "--max-prompts-per-task",
                                             help="toy: prompts per GenEval task (0 = all)"),
    max_prompts: int = typer.Option(0, "--max-prompts", help="full scale: first N prompts per benchmark (0 = all)"),
    clip_model: Optional[str] = typer.Option(None, "--clip-model",
                                             help="local CLIP folder (CLIP score, GenEval colours)"),
    detector_model: Optional[str] = typer.Option(None, "--detector-model",
                                                 help="local Mask2Former folder (full GenEval)"),
    vqa_model: Optional[str] = typer.Option(None, "--vqa-model", help="local BLIP VQA folder (full DPG-Bench)"),
    dpg_csv: Optional[str] = typer.Option(None, "--dpg-csv", help="dpg_bench.csv (full DPG-Bench)"),
    fid_reference: Optional[str] = typer.Option(None, "--fid-reference", help="FID reference statistics .npz (full)"),
    fid_images: int = typer.Option(128, "--fid-images",
                                   help="generated images in FID/KID (0 = all; ~0.5 s each on CPU)"),
    track: bool = typer.Option(True, "--track/--no-track", help="log the results to MLflow"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Evaluate a model: generate (or reuse) samples with fixed seeds, score the benchmarks, log the table."""
    from pydantic import ValidationError

    from flows.evaluate import EvaluateParams, evaluate_flow
    from flows.progress import bar
    from flows.cli_checks import check_model, describe_params_error, settings_or_fail
    from tasks.defaults import prefect_env_defaults

    settings = settings_or_fail()
    try:
        params = EvaluateParams(model=model, benchmarks=parse_benchmarks(benchmarks), steps=steps,
                                reuse_images=reuse_images, images_per_prompt=images_per_prompt,
                                base_seed=seed, guidance=guidance, sampler=sampler,
                                max_prompts_per_task=max_prompts_per_task, max_prompts=max_prompts,
                                clip_model=clip_model, detector_model=detector_model, vqa_model=vqa_model,
                                dpg_csv=dpg_csv, fid_reference=fid_reference, fid_images=fid_images,
                                track=track)
    except ValidationError as exc:
        _fail(describe_params_error(exc))
    except ValueError as exc:
        _fail(str(exc))
    check_model("--model", model, settings)  # before Prefect starts: a registry ref that exists, a whole checkpoint
    prefect_env_defaults(settings)
    try:
        with bar():
            results = evaluate_flow(params)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2, default=str) + "\n")
        return
    console.print(results_table(results))
    console.print(f"samples: {', '.join(results['folders'].values())}; results: {results['results_path']}"
                  + (f"; MLflow run {results['mlflow_run_id']}" if results.get("mlflow_run_id") else ""))


def _fail(message: str, code: int = 2) -> None:
    from flows.cli_checks import fail

    fail(message, code)
