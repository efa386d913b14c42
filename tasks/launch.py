"""Training on several processes or nodes, for every training stage: the task layer's half of
`python -m snapgen_model.training.launch` (the library's entry point, which Lightning re-executes per rank).

A stage task writes a spec (see the launcher's docstring) and calls `run_launched`; each rank builds
what the library cannot import through `launch_hooks`, which the spec names: the MLflow logger writing
into the stage's run (Lightning logs from rank 0), the uploader of finished checkpoints (rank 0 writes
them), and a progress callback. Rank 0 prints its progress lines marked on stderr; the parent passes
them to its Prefect run log as they arrive, so a several-device run is no quieter than one process,
and keeps the rest of the output for the error message of a failed run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from snapgen_model.training.progress import ProgressCallback
from tasks.progress import PROGRESS_EVERY_S
from tasks.settings import get_settings

PROGRESS_MARK = "snapgen-progress: "  # a launched rank's progress line on its stderr
TAIL_LINES = 200  # output lines of a launched run kept for its error message
HOOKS = "tasks.launch:launch_hooks"  # what a spec names as its "hooks" factory


def launch_hooks(spec: dict[str, Any]) -> dict[str, Any]:
    """What each launched rank trains with beyond the library: {"loggers", "upload", "callbacks"} as the
    spec asks (`mlflow_run_id`, `checkpoint_uri`, `progress`); the stage's step count is `spec[stage].steps`."""
    from tasks.pretrain import _uploader
    from tasks.storage import storage
    from tasks.metric_log import lightning_logger

    out: dict[str, Any] = {}
    if spec.get("mlflow_run_id"):
        out["loggers"] = [lightning_logger(get_settings(), spec["mlflow_run_id"])]
    if spec.get("checkpoint_uri"):
        out["upload"] = _uploader(storage(), spec["checkpoint_uri"],
                                  int(spec[spec.get("stage", "pretrain")]["keep_checkpoints"]))
    if spec.get("progress"):
        stage = spec.get("stage", "pretrain")

        def report(line: str) -> None:
            print(f"{PROGRESS_MARK}{line}", file=sys.stderr, flush=True)

        out["callbacks"] = [ProgressCallback(report, int(spec[stage]["steps"]), PROGRESS_EVERY_S)]
    return out


def forward_progress(lines: Iterable[str], report: Callable[[str], None], tail: int = TAIL_LINES) -> list[str]:
    """Pass each marked progress line of a launched run to `report` (without the mark) as it arrives;
    return the last `tail` other lines (the error message of a failed run)."""
    kept: deque[str] = deque(maxlen=tail)
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith(PROGRESS_MARK):
            report(line[len(PROGRESS_MARK):])
        else:
            kept.append(line)
    return list(kept)


def run_launched(spec: dict[str, Any], label: str) -> dict[str, Any]:
    """Run `spec` through the launcher (its ranks), logging rank 0's progress as "[label] ..." lines in the
    current Prefect run; rank 0's result. A failed run raises with the end of its output."""
    from prefect import get_run_logger

    logger = get_run_logger()
    with tempfile.TemporaryDirectory() as tmp:
        spec = spec | {"result_path": os.path.join(tmp, "result.json"), "progress": True, "hooks": HOOKS}
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        with subprocess.Popen([sys.executable, "-m", "snapgen_model.training.launch", os.path.join(tmp, "spec.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            if proc.stdout is None:
                raise RuntimeError(f"distributed {label}: no stdout pipe to read progress from (stdout=PIPE)")
            tail = forward_progress(proc.stdout, lambda line: logger.info("[%s] %s", label, line))
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"distributed {label} failed (exit {code}): {chr(10).join(tail)[-2000:]}")
        return json.loads(Path(tmp, "result.json").read_text())
