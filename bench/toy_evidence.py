"""Toy-world evidence run: the teacher bootstrap at `toy-gpu` size on a GPU (the quality run) or at
`toy` size on a CPU (the mechanics run), through the same flow the product uses, and its table
written to bench/RESULTS.md. The pretraining (KD ablation) and step-distillation stages extend this
script with their comparisons; today it covers the teacher.

    python bench/toy_evidence.py                    # toy-gpu on CUDA, toy on CPU
    python bench/toy_evidence.py --preset toy-smoke # seconds: check the script itself
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command_line, device_name, now_utc, replace_section, resolve_device  # noqa: E402

HEADING = "## Toy evidence: teacher bootstrap (bench/toy_evidence.py)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="auto", help="auto (toy-gpu on CUDA, else toy), toy-smoke, toy, toy-gpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="bootstrap config override k=v")
    p.add_argument("--home", default=None, help="SNAPGEN_HOME for the run (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="results file (section replaced)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device("auto")
    preset = args.preset if args.preset != "auto" else ("toy-gpu" if device.type == "cuda" else "toy")
    home = args.home or tempfile.mkdtemp(prefix="snapgen-evidence-")
    os.environ.setdefault("SNAPGEN_HOME", home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.bootstrap import bootstrap_teacher_flow, summary_markdown
    from tasks.defaults import prefect_env_defaults
    from tasks.settings import get_settings

    prefect_env_defaults(get_settings())
    start = time.perf_counter()
    result = bootstrap_teacher_flow(preset, args.overrides, force=True)
    wall = time.perf_counter() - start
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("phase_seconds", {}).items())
    body = "\n".join([
        f"Measured {now_utc()} with `{command_line()}` on {device_name(device)}; preset `{preset}`; "
        f"wall time {wall:.0f} s ({phases}).", "",
        summary_markdown(result), "",
        "Reference rows (clean renders, AE ceiling, prompt-blind floor, noise) and the exact-object-count "
        "diagnostic are part of the figures above when the evaluation module provides them. On CPU this run "
        "proves the mechanics (losses fall, every stage runs); quality needs the toy-gpu run on a GPU "
        "(TOY_CALIBRATION.md).",
    ])
    replace_section(Path(args.out), HEADING, body)
    print(body)


if __name__ == "__main__":
    main()
