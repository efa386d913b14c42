"""`snapgen run`, `snapgen demo`, `snapgen promote`, `snapgen rollback`, `snapgen ui` (registered in flows/cli.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from flows.cli_checks import preset_option

console = Console() if sys.stdout.isatty() else Console(width=120)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=120)
PIPELINE_PRESET_HELP = ("pipeline preset: toy-smoke (tests, under a minute), toy (the CPU demo), toy-student-release "
                        "(the shipped student's recipe, about 80 min of pretraining on 2 cores), toy-gpu (one GPU), "
                        "snapgen-1024 (the paper's configuration, GPU nodes)")


def _fail(message: str, code: int = 2) -> None:
    from flows.cli_checks import fail

    fail(message, code)


def _prepare() -> Any:
    from flows.cli_checks import settings_or_fail
    from tasks.defaults import prefect_env_defaults

    settings = settings_or_fail()
    prefect_env_defaults(settings)
    return settings


def _print_summary(summary: dict[str, Any]) -> None:
    from flows.pipeline_report import cpu_note, promotion_line, stage_table, summary_table

    console.print(stage_table(summary))
    console.print(summary_table(summary))
    from flows.pipeline_report import export_rows

    rows = export_rows(summary)
    if rows:
        console.print("exports: " + ", ".join(f"{r['part']} {r['format']} {r['bytes'] / 1e6:.2f} MB" for r in rows))
    console.print(promotion_line(summary))
    note = cpu_note(summary)
    if note:
        console.print(f"[yellow]{note}[/]")
    console.print(f"run report: [bold]{summary['report']['html']}[/] (also in MLflow run {summary['mlflow_run_id']})")


def _run_pipeline(preset: str, overrides: list[str], force: bool) -> dict[str, Any]:
    from flows.pipeline import snapgen_pipeline
    from flows.pipeline_config import PipelineConfigError, build_config, validate_stage_configs
    from flows.progress import bar

    try:
        validate_stage_configs(build_config(preset, overrides))
    except PipelineConfigError as exc:
        _fail(str(exc))
    with bar():
        return snapgen_pipeline(preset=preset, overrides=overrides, force=force)


def _print_resolved(preset: str, overrides: list[str], as_json: bool) -> None:
    """`run --dry-run`: the pipeline config, then each stage's library config as the stage will build it."""
    from flows.pipeline_config import PipelineConfigError, build_config, resolved_stage_configs

    try:
        cfg = build_config(preset, overrides)
        resolved = {"preset": preset, "overrides": overrides, "pipeline": cfg.model_dump(mode="json"),
                    "stages": resolved_stage_configs(cfg)}
    except PipelineConfigError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(resolved, indent=2, default=str) + "\n")
        return
    console.rule(f"[bold]snapgen run --preset {preset}: resolved config (nothing runs)")
    for name, stage in resolved["stages"].items():
        console.print(f"[bold]{name}[/]")
        console.print_json(json.dumps(stage, default=str))
    console.print(f"pipeline stages: {', '.join(k for k, v in resolved['pipeline'].items() if isinstance(v, dict))}; "
                  "`--json` prints everything, the pipeline's own fields included")


def run(preset: str = preset_option("toy", "pipeline", PIPELINE_PRESET_HELP),
        set_: list[str] = typer.Option([], "--set", help="override stage.field=value (repeatable), e.g. "
                                                           "--set pretrain.train.steps=300"),
        force: bool = typer.Option(False, "--force", help="rerun every stage even if its record says it is done"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config of every stage (typed, "
                                                              "validated, defaults filled) and run nothing"),
        as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """The end-to-end pipeline: teacher, curate, cache, decoder, pretrain, distill, evaluate, export, register, promote."""
    if dry_run:
        _print_resolved(preset, list(set_), as_json)
        return
    _prepare()
    summary = _run_pipeline(preset, list(set_), force)
    if as_json:
        sys.stdout.write(json.dumps(run_json(summary), indent=2, default=str) + "\n")
        return
    _print_summary(summary)


def run_json(summary: dict[str, Any]) -> dict[str, Any]:
    """What `snapgen run --json` prints: the stage rows, aliases, MLflow run, report, and the URIs of the students
    the run trained (`students.pretrain`, `students.distill_steps`: what `release-student` or `eval` takes next)."""
    results = summary.get("results") or {}
    students = {stage: (results.get(stage) or {}).get("student_uri") for stage in ("pretrain", "distill_steps")}
    return ({k: summary[k] for k in ("preset", "stages", "aliases", "mlflow_run_id", "seconds", "summary_uri")}
            | {"report": summary["report"]["html"], "students": {k: v for k, v in students.items() if v}})


def demo(preset: str = preset_option("toy", "pipeline", PIPELINE_PRESET_HELP),
         set_: list[str] = typer.Option([], "--set", help="override stage.field=value (repeatable)")) -> None:
    """The whole toy pipeline on embedded defaults (no servers to start), then how to open the dashboards."""
    from flows.cli_checks import gpu_warning

    started = time.perf_counter()
    settings = _prepare()
    warning = gpu_warning(preset)
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}")
    console.rule(f"[bold]snapgen demo: the `{preset}` pipeline on this machine")
    console.print(settings.render_table())
    console.print(f"stages: {_teacher_stage(preset, list(set_))} -> curate -> cache teacher -> tiny decoder -> "
                  f"{_student_stage(preset, list(set_))} -> 4-step adversarial distillation -> GenEval/DPG/FID -> ONNX + Core ML -> "
                  "registry + promotion gate")
    summary = _run_pipeline(preset, list(set_), False)
    _print_summary(summary)
    console.print(f"dashboards: [bold]snapgen ui[/] starts the Prefect UI (flow runs of this demo) and the MLflow UI "
                  f"(experiment `{summary['config']['experiment']}`, registered model "
                  f"`{summary['config']['promotion']['model_name']}`) on 127.0.0.1 and prints their URLs")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")


def _teacher_stage(preset: str, overrides: list[str]) -> str:
    """How this run gets its teacher, in the words of the stages line."""
    teacher = _pipeline_config(preset, overrides).teacher
    if teacher.bundle_uri is not None:
        return f"teacher (the bundle at {teacher.bundle_uri})"
    if teacher.release:
        return f"teacher (the shipped release {teacher.release}, checksums verified)"
    return "teacher bootstrap (trained once, then reused)"


def _student_stage(preset: str, overrides: list[str]) -> str:
    """How this run pretrains its student, in the words of the stages line."""
    init = _typed(preset, overrides).pretrain.init
    if not init:
        return "KD pretraining"
    shipped = init.removeprefix("release://")
    return (f"KD pretraining (continuing the shipped student {shipped})" if init.startswith("release://")
            else f"KD pretraining (starting from {init})")


def _typed(preset: str, overrides: list[str]) -> Any:
    from flows.pipeline_config import PipelineConfigError, typed_stage_configs

    try:
        return typed_stage_configs(_pipeline_config(preset, overrides))
    except PipelineConfigError as exc:
        _fail(str(exc))


def _pipeline_config(preset: str, overrides: list[str]) -> Any:
    """The pipeline config of `preset` with `overrides`; a bad one ends the command with its message."""
    from flows.pipeline_config import PipelineConfigError, build_config

    try:
        return build_config(preset, overrides)
    except PipelineConfigError as exc:
        _fail(str(exc))


def _gates(preset: str, overrides: list[str]):
    return _pipeline_config(preset, overrides).promotion


def promote(model: str = typer.Option(..., "--model", "-m", help="models:/NAME/VERSION or models:/NAME@ALIAS"),
            preset: str = preset_option("toy", "pipeline", "pipeline preset whose gates apply"),
            set_: list[str] = typer.Option([], "--set", help="gate overrides, e.g. --set promotion.tolerance=0.05"),
            dry_run: bool = typer.Option(False, "--dry-run", help="print the decision, move nothing"),
            as_json: bool = typer.Option(False, "--json", help="print the decision (checks, verdict) as JSON")) -> None:
    """Move `champion` to MODEL if the gates pass (thresholds, not worse than the champion, parity, checksums)."""
    _prepare()
    from tasks import registry

    gates = _gates(preset, list(set_))
    try:
        args = ([g.model_dump() for g in gates.gates], gates.tolerance, gates.require_export_parity, gates.demo_thresholds)
        decision = registry.check_promotion(model, *args) if dry_run else registry.promote(model, *args)
    except (registry.PromotionError, ValueError, LookupError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(decision, indent=2, default=str) + "\n")
    else:
        for c in decision["checks"]:
            console.print(f"  {'[green]pass[/]' if c['passed'] else '[red]FAIL[/]'}  {c['check']}: {c['detail']}")
        verdict = ("would pass" if decision["passed"] else "would fail") if dry_run else (
            "promoted to champion" if decision.get("promoted") else decision.get("note") or "not promoted")
        console.print(f"{decision['name']} v{decision['version']}: [bold]{verdict}[/]")
    if not decision["passed"]:
        raise typer.Exit(1)


def rollback(name: str = typer.Option("snapgen", "--name", help="registered model"),
             as_json: bool = typer.Option(False, "--json", help="print the champion before/after as JSON")) -> None:
    """Restore the previous champion."""
    _prepare()
    from tasks import registry

    try:
        result = registry.rollback(name)
    except (registry.PromotionError, LookupError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        console.print(f"{name}: champion is v{result['champion']} again (v{result['rolled_back']} rolled back)")


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _wait_http(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URL built here
                if resp.status < 500:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def ui(host: str = typer.Option("127.0.0.1", "--host", help="bind address (loopback by default)"),
       prefect_port: int = typer.Option(4200, "--prefect-port"),
       mlflow_port: int = typer.Option(5000, "--mlflow-port"),
       check: bool = typer.Option(False, "--check", help="start both, wait until they answer, print the URLs, stop")) -> None:
    """Start the Prefect UI and the MLflow UI on the embedded stores (<home>) and print their URLs."""
    from flows.cli_checks import check_port

    check_port("--prefect-port", prefect_port)
    check_port("--mlflow-port", mlflow_port)
    if prefect_port == mlflow_port:
        _fail(f"--prefect-port and --mlflow-port are both {prefect_port}: pick two ports")
    settings = _prepare()
    for port in (prefect_port, mlflow_port):
        if not _free(host, port):
            _fail(f"port {port} on {host} is in use (pass --prefect-port / --mlflow-port)")
    bindir = Path(sys.executable).parent
    env = dict(os.environ) | {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                              "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api"}
    env.pop("PREFECT_API_URL", None)
    artifacts = str(Path(settings.home) / "mlartifacts")
    commands = {
        "prefect": [str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        "mlflow": [str(bindir / "mlflow"), "server", "--backend-store-uri", settings.mlflow_tracking_uri,
                   "--default-artifact-root", artifacts, "--host", host, "--port", str(mlflow_port), "--workers", "1"],
    }
    for name, cmd in commands.items():
        if not Path(cmd[0]).exists() and shutil.which(Path(cmd[0]).name) is None:
            _fail(f"{name} executable not found next to {sys.executable}")
    logs = Path(settings.home) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = {n: subprocess.Popen(c, env=env, stdout=open(logs / f"{n}-ui.log", "ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True) for n, c in commands.items()}
    urls = {"prefect": f"http://{host}:{prefect_port}", "mlflow": f"http://{host}:{mlflow_port}"}
    health = {"prefect": urls["prefect"] + "/api/health", "mlflow": urls["mlflow"] + "/health"}
    try:
        for name in procs:
            if not _wait_http(health[name], 120):
                _fail(f"{name} did not answer at {health[name]} within 120 s (log: {logs / f'{name}-ui.log'})", 1)
        console.print(f"Prefect UI: [bold]{urls['prefect']}[/]   (flow runs; PREFECT_HOME {os.environ['PREFECT_HOME']})")
        console.print(f"MLflow UI:  [bold]{urls['mlflow']}[/]   (experiments, registered models; {settings.mlflow_tracking_uri})")
        if check:
            return
        console.print("Ctrl-C stops both.")
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
