"""SIGTERM during pretraining (a stopped container, a cancelled flow run, a pod eviction), through the CLI: the
run saves its training state and stops with the shell's exit code for SIGTERM (143), naming the saved state;
no later stage runs on the half-trained student. The same command then resumes from the saved step and
finishes.

Before the fix the pretraining task returned after the SIGTERM as if training had finished: the pipeline
saved the student of step ~150 of 400, distilled, evaluated and registered it, and exited 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SNAPGEN = Path(sys.executable).parent / "snapgen"
STEPS = 400
COMMAND = [str(SNAPGEN), "run", "--preset", "toy-smoke", "--set", f"pretrain.train.steps={STEPS}"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPGEN_", "MLFLOW_", "PREFECT_"))}
    return env | {"SNAPGEN_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigterm_in_pretraining_stops_the_run_and_the_same_command_resumes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    log = tmp_path / "stopped.log"
    with log.open("w") as out:
        proc = subprocess.Popen(COMMAND, cwd=tmp_path, env=_env(home), stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 900
        try:
            while not re.search(r"\[pretrain\] step \d+/", log.read_text()):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "pretraining never reported a step"
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)  # the CLI process only, as `docker stop` signals PID 1
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 143, text[-3000:]
    stopped = re.search(r"pretrain: stopped by SIGTERM at step (\d+) of 400; its state is saved at (\S+):", text)
    assert stopped, text[-3000:]
    step, state = int(stopped.group(1)), Path(stopped.group(2))
    assert 0 < step < STEPS and (state / "state.json").is_file() and state.name == f"step-{step:08d}"
    assert not re.search(r"stage (distill_steps|evaluate|export|register): running", text)  # nothing ran on it
    assert not list(home.glob("storage/runs/pretrain-*/student/*"))  # and no student was saved

    again = subprocess.run(COMMAND, cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=1200)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert f"resuming at step {step}/{STEPS} from the saved training state" in output
    assert f"step {STEPS}/{STEPS} (100%)" in output and "stage evaluate: running" in output
