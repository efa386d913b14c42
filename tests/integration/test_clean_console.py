"""A new user's first run: `snapgen run --preset toy-smoke` in a fresh home, as a subprocess writing to a
pipe (a log), with `PREFECT_API_URL` exported empty as a Makefile or a shell profile may leave it, and the
Core ML export of the `toy` demo turned on.

It prints no ERROR line and no traceback, none of the known third-party notices (they go to
<home>/logs/console.log), progress as plain lines while it runs, and Prefect's database holds a task run
for every task the console reported (an empty API URL read by Prefect at import stopped its events worker:
hundreds of ERROR lines, and the subflows' task runs were never recorded)."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SNAPGEN = Path(sys.executable).parent / "snapgen"
NOISE = ("`accelerate` was not found", "pip install accelerate", "Tip:", "litlogger", "module(s) in eval mode",
         "system_metrics", "Loading weights", "Downloading artifacts", "requires_grad=True to a scalar",
         "Writing model shards", "LeafSpec", "Creating initial MLflow database tables",
         # Core ML conversion (the `toy` demo exports it): coremltools' tqdm bars and its graph-output note,
         # and transformers' loss_type note when the text encoder is loaded for export
         "MIL Ops", "Running MIL", "Tuple detected", "loss_type")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    home = tmp_path_factory.mktemp("console") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPGEN_", "MLFLOW_", "PREFECT_"))}
    env |= {"SNAPGEN_HOME": str(home), "PREFECT_API_URL": "", "OMP_NUM_THREADS": "1"}
    # with the Core ML export the demo runs (toy-smoke exports ONNX only)
    proc = subprocess.run([str(SNAPGEN), "run", "--preset", "toy-smoke", "--set", 'export.formats=["onnx","coreml"]'],
                          cwd=home.parent, env=env,
                          capture_output=True, text=True, timeout=1200)
    return proc, home


def test_a_successful_run_prints_no_error_and_no_noise(first_run) -> None:
    proc, home = first_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert errors == [] and "Traceback" not in output, "\n".join(errors[:5]) or output[-4000:]
    for notice in NOISE:
        assert notice not in output, notice
    log = (home / "logs" / "console.log").read_text()
    assert "accelerate" in log  # moved, not lost
    # progress in a log: plain lines as work happens (a shard line comes before the next stage starts)
    lines = output.splitlines()
    shards = next(i for i, line in enumerate(lines) if re.search(r"writing shards: \d+/\d+", line))
    assert shards < next(i for i, line in enumerate(lines) if "stage cache_teacher: running" in line)


def test_prefect_records_a_task_run_for_every_task_that_ran(first_run) -> None:
    """Prefect's "Finished in state Completed()" lines go to the console log (moved, not lost): every task
    they name has its task run in Prefect's database, and the console keeps the stage lines."""
    proc, home = first_run
    console = proc.stdout + proc.stderr
    assert "Finished in state Completed()" not in console and "Beginning subflow run" not in console
    assert "stage pretrain: running" in console
    output = (home / "logs" / "console.log").read_text()
    # one "Finished" line per task run; Prefect names a task run after its task plus three random hex digits,
    # so two runs of one task can share a name: count them as a multiset, not a set
    finished = Counter(re.findall(r"Task run '([^']+)' - Finished in state", output))
    subflows = re.findall(r"Beginning subflow run '([^']+)'", output)
    assert finished.total() > 60 and len(subflows) >= 8, output[-3000:]
    db = sqlite3.connect(home / "prefect" / "prefect.db")
    names = Counter(row[0] for row in db.execute("select name from task_run"))
    subflow_flow_runs = db.execute("select count(*) from flow_run where parent_task_run_id is not null").fetchone()[0]
    assert not finished - names, sorted(finished - names)[:10]
    assert names.total() == finished.total() + len(subflows) and subflow_flow_runs == len(subflows)
    # each subflow's graph has its tasks
    empty = db.execute("select f.name from flow_run f left join task_run t on t.flow_run_id = f.id "
                       "group by f.id having count(t.id) = 0").fetchall()
    assert empty == []
