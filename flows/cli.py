"""The `snapgen` command line (typer + rich). Every command has --help; most have --json."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from flows.console import quiet_environment

quiet_environment()  # before anything imports tqdm (building the commands below imports torch)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from flows.cli_checks import (SnapgenGroup, check_storage_access, check_storage_uri, preset_option,
                              settings_or_fail)
from snapgen_model.config_base import ConfigError

app = typer.Typer(cls=SnapgenGroup, add_completion=False, no_args_is_help=True,
                  help="snapgen: SnapGen-style mobile text-to-image models, trained and shipped by one pipeline.")
console = Console() if sys.stdout.isatty() else Console(width=110)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=110)

PRESET_HELP = "preset name: snapgen-1024, snapgen-in1k-256, toy-smoke, toy, toy-gpu"
MODEL_PRESET_HELP = "model preset (architecture, resolution, sampler)"
SET_HELP = "config override key=value (repeatable), e.g. --set unet.ffn_ratio=4"


def _fail(message: str, code: int = 2) -> None:
    from flows.cli_checks import fail

    fail(message, code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("snapgen")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"snapgen {_version()}\n")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only warnings, errors and the result"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs, and third-party notices on the console"),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """snapgen: SnapGen-style mobile text-to-image models, trained and shipped by one pipeline."""
    from flows.console import configure_console, exit_on_sigterm

    if quiet and verbose:
        _fail("--quiet and --verbose: choose one")
    configure_console("quiet" if quiet else "verbose" if verbose else "normal")
    # a stopped command unwinds: the flow records the stop, Prefect's server goes with it
    ctx.call_on_close(exit_on_sigterm())


def _as_uri(value: str) -> str:
    """A storage URI: URIs pass through, local paths become absolute file:// URIs."""
    return value if "://" in value else "file://" + str(Path(value).expanduser().resolve())


def _emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
def inspect(
    preset: str = preset_option("toy", "model", MODEL_PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    track: bool = typer.Option(False, "--track", help="also run inspect_flow: log the table and config to MLflow"),
) -> None:
    """Per-stage table of a preset: parameters, MACs at the preset's resolution, attention types."""
    from flows.report import inspect_table
    from snapgen_model.inspect import inspect_config
    from snapgen_model.presets import get_preset

    try:
        cfg = get_preset(preset, set_)
    except ConfigError as exc:
        _fail(str(exc))
    report = inspect_config(cfg).to_dict()
    if track:
        report["mlflow_run_id"] = _run_inspect_flow(preset, set_)
    if as_json:
        _emit_json(report)
        return
    console.print(inspect_table(report))
    if track:
        console.print(f"logged to MLflow run [bold]{report['mlflow_run_id']}[/]")


def _run_inspect_flow(preset: str, overrides: list[str]) -> str:
    from flows.inspect import InspectParams, inspect_flow
    from tasks.defaults import prefect_env_defaults

    prefect_env_defaults(settings_or_fail())
    return inspect_flow(InspectParams(preset=preset, overrides=overrides))["mlflow_run_id"]


@app.command()
def sample(
    preset: str = typer.Option("toy", "--preset", "-p", help=PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="student folder (or its unet_ema.safetensors), "
                                        "teacher bundle, UNet checkpoint, or models:/NAME@ALIAS | models:/NAME/N"),
    prompt: list[str] = typer.Option([], "--prompt", help="text prompt (repeatable; needs --model)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="UNet safetensors checkpoint sampled with "
                                              "the null condition (default: fresh init; use --model for prompts)"),
    seeds: str = typer.Option("0,1,2,3", "--seeds", help="comma-separated per-image seeds"),
    steps: Optional[int] = typer.Option(None, "--steps", help="sampler steps (default: the model's or preset's)"),
    out: Path = typer.Option(Path(".snapgen/samples/sample.png"), "--out", "-o", help="output PNG (a grid: one "
                             "row per prompt, one column per seed; each image also in <out stem>/)"),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="with --model: vae (default: the decoder "
                                          "evaluation scores with), tiny (the one a registered version carries) or "
                                          "a tiny decoder checkpoint, e.g. the pipeline's tiny_decoder.safetensors"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary (model, decoder, images with prompt, "
                                 "seed and path)"),
) -> None:
    """Generate images: `--model M --prompt "a red circle left of a blue square"` samples what the prompt says
    with the model's own conditioner and decoder; without --model, a preset's fresh UNet shows the sampler run."""
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds: expected comma-separated integers, got {seeds!r}")
    if not seed_list:
        _fail(f"--seeds: expected at least one integer seed, got {seeds!r}")
    if steps is not None and steps < 1:
        _fail(f"--steps: must be >= 1, got {steps}")
    if model is not None:
        _sample_model(model, prompt, checkpoint, seed_list, steps, out, as_json, decoder)
        return
    if decoder is not None:
        _fail("--decoder needs --model (without it, sample draws a preset's fresh UNet and decoder)")
    if prompt:
        _fail("--prompt needs --model (a student folder, a teacher bundle or models:/NAME@ALIAS): a preset's fresh "
              "UNet has no text conditioner")
    from snapgen_model.presets import get_preset
    from snapgen_model.sample_model import sample_grid

    try:
        cfg = get_preset(preset, set_)
    except (ConfigError, ValueError) as exc:
        _fail(f"--preset/--set: {exc}")
    if cfg.image_size > 256 and checkpoint is None:
        _fail(f"preset {preset!r} samples at {cfg.image_size}px: too large for a fresh-init demo on CPU; "
              "use a toy preset or pass --checkpoint")
    start = time.perf_counter()
    summary = sample_grid(cfg, seed_list, out, checkpoint=checkpoint, steps=steps)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if as_json:
        _emit_json(summary)
    else:
        console.print(f"wrote {summary['images']} samples ({summary['size']}px, {summary['steps']} steps, "
                      f"{summary['unet']}) to [bold]{out}[/] in {summary['seconds']} s")


def _sample_model(model: str, prompts: list[str], checkpoint: Optional[Path], seeds: list[int], steps: Optional[int],
                  out: Path, as_json: bool, decoder: Optional[str] = None) -> None:
    """`sample --model`: the model's own generator (conditioner, text encoders, decoder) on the prompts."""
    from flows.sampling import model_generator
    from snapgen_model.sample_model import sample_prompts

    if checkpoint is not None:
        _fail("--model and --checkpoint: give one (--model takes checkpoints too)")
    if any(not p.strip() for p in prompts):
        _fail("--prompt: every prompt must be a non-empty string")
    start = time.perf_counter()
    try:
        loaded = model_generator(model, steps=steps, decoder=decoder)
    except (OSError, ValueError, LookupError, RuntimeError) as exc:
        _fail(str(exc) if str(exc).startswith(("--model", "--decoder")) else f"--model {model}: {exc}")
    if loaded.takes_prompts and not prompts:
        _fail(f"--prompt: {model} is a text-to-image model; say what to draw, e.g. "
              "--prompt \"a red circle left of a blue square\"")
    if prompts and not loaded.takes_prompts:
        _fail(f"--prompt: {model} is a bare UNet checkpoint with no text encoders or conditioner beside it; pass its "
              "student folder (student.json) or a models:/ ref")
    summary = sample_prompts(loaded.generator, prompts or ["(null condition)"], seeds, out)
    describe = loaded.generator.describe() if hasattr(loaded.generator, "describe") else {}
    summary |= {"model": model, "kind": loaded.kind, "source": loaded.source, "decoder": loaded.decoder,
                "steps": (describe.get("sampler") or {}).get("steps"), "conditioning": describe.get("conditioning"),
                "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        _emit_json(summary)
    else:
        console.print(f"wrote {summary['images']} samples ({summary['size']}px, {summary['steps']} steps, "
                      f"{loaded.kind} {loaded.source}, decoder: {loaded.decoder}) to [bold]{out}[/] "
                      f"in {summary['seconds']} s")


def parse_source(text: str) -> dict:
    """`kind:location` -> source spec dict; `shapes:COUNT[:SPLIT]` for the shapes world."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"--source {text!r}: expected KIND:LOCATION, e.g. folder:/data/pairs, "
                         "manifest:s3://bucket/list.jsonl, webdataset:s3://bucket/shards/, imagefolder:/imagenet/train, "
                         "shapes:2000")
    if kind == "shapes":
        count, _, split = rest.partition(":")
        if not count.isdigit():
            raise ValueError(f"--source {text!r}: shapes needs a count, e.g. shapes:2000")
        return {"kind": "shapes", "count": int(count), "split": split or "train"}
    if kind not in ("folder", "manifest", "webdataset", "imagefolder"):
        raise ValueError(f"--source {text!r}: unknown kind {kind!r}; choose folder, manifest, webdataset, "
                         "imagefolder or shapes")
    if "://" not in rest:
        rest = "file://" + str(Path(rest).expanduser().resolve())
    return {"kind": kind, "uri": rest}


@app.command()
def curate(
    source: list[str] = typer.Option(..., "--source", "-s", help="KIND:LOCATION (repeatable): folder, manifest, "
                                     "webdataset, imagefolder (file path or s3:// URI), or shapes:COUNT"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output dataset URI (default: <storage root>/datasets/curated)"),
    set_: list[str] = typer.Option([], "--set", help="curation config override, e.g. --set samples_per_shard=500"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the output holds this dataset"),
    track: bool = typer.Option(True, "--track/--no-track", help="log the summary to MLflow"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Curate image-caption sources into WebDataset shards + manifest + quarantine.jsonl."""
    from flows.curate import CurateParams, curate_flow
    from flows.progress import bar
    from flows.report import curation_table
    from tasks.defaults import prefect_env_defaults

    try:
        specs = [parse_source(s) for s in source]
    except ValueError as exc:
        _fail(str(exc))
    settings_ = settings_or_fail()
    label = "--out" if out else "storage root (SNAPGEN_STORAGE_ROOT)"
    out = check_storage_uri("--out", out) if out else settings_.storage_root.rstrip("/") + "/datasets/curated"
    check_storage_access(label, out, settings_)
    prefect_env_defaults(settings_)
    try:
        with bar():
            manifest = curate_flow(CurateParams(sources=specs, out=out, overrides=set_, force=force, track=track))
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(manifest)
        return
    console.print(curation_table(manifest))
    console.print(f"dataset [bold]{manifest['dataset_hash'][:16]}[/] at {out}"
                  + (" (cache hit: nothing rebuilt)" if manifest.get("cache_hit") else ""))


@app.command()
def cache(
    dataset: str = typer.Option(..., "--dataset", "-d", help="curated dataset URI (file://, s3:// or a path)"),
    bundle: str = typer.Option(..., "--bundle", "-b", help="teacher bundle folder: vae/, transformer/, text_encoder/"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="cache URI (default: <dataset>/cache/<key>)"),
    set_: list[str] = typer.Option([], "--set", help="cache config override, e.g. --set targets_per_sample=4"),
    runner: str = typer.Option("local", "--runner", help="task runner: local (threads) or dask (local cluster)"),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="existing Dask scheduler address"),
    track: bool = typer.Option(True, "--track/--no-track", help="log to MLflow"),
    as_json: bool = typer.Option(False, "--json", help="print the cache manifest as JSON"),
) -> None:
    """Cache VAE latents, text-encoder states and teacher targets for a curated dataset."""
    from flows.cache import CacheParams, run_cache
    from flows.progress import bar
    from tasks.defaults import prefect_env_defaults

    settings_ = settings_or_fail()
    if out:
        out = check_storage_uri("--out", out)
        check_storage_access("--out", out, settings_)
    prefect_env_defaults(settings_)
    try:
        with bar():
            manifest = run_cache(CacheParams(dataset_uri=_as_uri(dataset), bundle_uri=_as_uri(bundle),
                                             out_uri=_as_uri(out) if out else None, overrides=set_, track=track),
                                 task_runner=runner, address=dask_address)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(manifest)
        return
    from flows.cache import _summary
    from rich.markdown import Markdown
    console.print(Markdown(_summary(manifest)))
    console.print(f"cache at [bold]{manifest['uri']}[/]" + (" (cache hit)" if manifest.get("cache_hit") else ""))


@app.command("train-decoder")
def train_decoder(
    cache_uri: str = typer.Option(..., "--cache", help="teacher cache URI"),
    bundle: str = typer.Option(..., "--bundle", "-b", help="teacher bundle folder (reference VAE decoder)"),
    preset: str = preset_option("toy", "model", MODEL_PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help="training override, e.g. --set steps=300"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Train the SnapGen tiny decoder on cached latents; report PSNR/SSIM/latency against the VAE decoder."""
    from flows.decoder import DecoderParams, train_decoder_flow
    from tasks.defaults import prefect_env_defaults

    prefect_env_defaults(settings_or_fail())
    try:
        result = train_decoder_flow(DecoderParams(cache_uri=_as_uri(cache_uri), bundle_uri=_as_uri(bundle),
                                                  preset=preset, train_overrides=set_))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(result)
    else:
        r = result["report"]
        console.print(f"tiny decoder: {r['params']:,} params, PSNR {r['psnr_vs_images']:.2f} dB vs images "
                      f"(VAE decoder {r['vae_psnr_vs_images']:.2f} dB), {r['latency_ms']:.1f} ms vs "
                      f"{r['vae_latency_ms']:.1f} ms per batch of {r['batch']}; checkpoint {result['checkpoint']}")


@app.command()
def pretrain(
    cache_uri: str = typer.Option(..., "--cache", help="teacher cache URI (snapgen cache output)"),
    preset: str = preset_option("toy", "model", MODEL_PRESET_HELP),
    set_: list[str] = typer.Option([], "--set", help="PretrainConfig override, e.g. --set steps=300 --set kd.combine=weighted"),
    preset_set: list[str] = typer.Option([], "--preset-set", help="preset override, e.g. unet.ffn_ratio=4"),
    resume: str = typer.Option("latest", "--resume", help="latest | none | a state folder"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Pretrain the student with multi-level KD from cached teacher targets (resumes the latest checkpoint)."""
    from flows.pretrain import PretrainParams, pretrain_flow
    from tasks.defaults import prefect_env_defaults

    prefect_env_defaults(settings_or_fail())
    try:
        params = PretrainParams(cache_uri=_as_uri(cache_uri), preset=preset, overrides=preset_set, pretrain=set_,
                                resume=resume)
        params.config()  # a bad --set is named here, before a flow run starts (no Prefect traceback)
        result = pretrain_flow(params)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(result)
    else:
        console.print(f"pretrained to step {result['step']}; checkpoints {result['checkpoints']}; "
                      f"MLflow run {result['mlflow_run_id']}")


@app.command()
def settings(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Print the resolved settings (env SNAPGEN_*, then the config file), secrets masked."""
    s = settings_or_fail()
    if as_json:
        _emit_json(s.masked_dict())
    else:
        console.print(s.render_table())


def _register_stage_commands() -> None:
    """Stage commands that live in their own modules (kept out of this file to keep it short)."""
    from flows.cli_eval import eval_command
    from flows.cli_export import export as export_command

    from flows.cli_distill import distill as distill_command

    from flows.cli_pipeline import demo, promote, rollback, run, ui

    app.command("run")(run)
    app.command("demo")(demo)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("ui")(ui)
    app.command("distill")(distill_command)
    app.command("eval")(eval_command)
    app.command("export")(export_command)
    try:
        from flows.cli_bootstrap import bootstrap
    except ImportError:  # pragma: no cover - the bootstrap stage is optional in a partial install
        return
    app.command("bootstrap-teacher")(bootstrap)
    from flows.cli_release import release_card, release_teacher

    app.command("release-teacher")(release_teacher)
    app.command("release-card")(release_card)
    from flows.cli_release_student import release_student

    app.command("release-student")(release_student)


_register_stage_commands()


def main() -> None:  # pragma: no cover
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
