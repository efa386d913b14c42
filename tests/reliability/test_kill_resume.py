"""kill -9 during training, then resume in a new process: at most one checkpoint interval is lost
and the resumed run ends bitwise at the weights of an uninterrupted run (CPU, fixed seeds).

The killed and the resuming runs are real subprocesses (``tests.reliability.train_child``, the
product's ``fit`` / ``fit_distill``); the uninterrupted reference runs in this process meanwhile.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snapgen_model.training.state import latest_state
from tests.reliability.train_child import run as run_in_process
from tests.reliability.train_child import write_cache

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = {"pretrain": 14, "distill": 10}, {"pretrain": 3, "distill": 2}


def child(spec: dict, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.train_child", str(folder / "spec.json")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "stderr.log", "wb"))


def checkpoint_step(root: Path) -> int:
    found = latest_state(root)
    return int(found.name.split("-")[1]) if found else 0


def progress(path: Path) -> int:
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
    return int(lines[-1]) if lines else 0


def kill_at_step(proc: subprocess.Popen, progress_path: Path, root: Path, k: int, jitter_s: float,
                 timeout: float = 240) -> float:
    """SIGKILL ``proc`` ``jitter_s`` after it finished step k (a checkpoint exists by then, k > every):
    the kill lands between steps or inside one. Returns the kill time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before step {k}")
        if progress(progress_path) >= k and checkpoint_step(root) > 0:
            time.sleep(jitter_s)
            proc.send_signal(signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"step {k} not reached after {timeout}s")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_sigkill_then_resume_matches_uninterrupted_run(stage, tmp_path, record):
    steps, every = STEPS[stage], EVERY[stage]
    cache = write_cache(tmp_path / "cache")
    rng = random.SystemRandom()
    k, jitter = rng.randint(every + 1, steps - 2 * every), rng.uniform(0.0, 0.15)  # the kill point (in messages)
    base = {"stage": stage, "cache_dir": str(cache), "steps": steps, "checkpoint_every": every, "throttle_s": 0.15}
    killed_root = tmp_path / "killed" / "state"
    spec = base | {"state_root": str(killed_root), "progress_path": str(tmp_path / "killed" / "progress")}
    proc = child(spec, tmp_path / "killed")
    killer: dict[str, float] = {}
    watcher = threading.Thread(target=lambda: killer.update(
        t=kill_at_step(proc, tmp_path / "killed" / "progress", killed_root, k, jitter)))
    watcher.start()
    reference = run_in_process(base | {"state_root": str(tmp_path / "full" / "state"), "throttle_s": 0.0})
    watcher.join()
    assert proc.wait(30) == -signal.SIGKILL, (tmp_path / "killed" / "stderr.log").read_text()[-3000:]
    assert "t" in killer, f"kill at k={k} failed"
    reached, saved = progress(tmp_path / "killed" / "progress"), checkpoint_step(killed_root)
    assert k <= reached < steps and 0 < saved <= reached, (k, reached, saved)
    lost = reached - saved
    assert 0 <= lost < every, f"k={k}: step {reached} reached, last checkpoint {saved}: more than one interval lost"

    resume_started = time.monotonic()
    proc = child(base | {"state_root": str(killed_root), "result_path": str(tmp_path / "resumed.json"),
                         "throttle_s": 0.0}, tmp_path / "resumed")
    assert proc.wait(300) == 0, (tmp_path / "resumed" / "stderr.log").read_text()[-3000:]
    resume_s = time.monotonic() - resume_started
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert result["resumed_from"].endswith(f"step-{saved:08d}") and result["step"] == steps
    assert reference["step"] == steps

    final_a, final_b = latest_state(tmp_path / "full" / "state"), latest_state(killed_root)
    assert final_a.name == final_b.name == f"step-{steps:08d}"
    for name in ("modules.safetensors", "optimizer.safetensors"):
        a, b = tensors(final_a / name), tensors(final_b / name)
        differ = [key for key in a if key not in b or not torch.equal(a[key], b[key])]
        assert a.keys() == b.keys() and not differ, f"{name}: {differ[:5]} differ (k={k}, resumed at {saved})"
        assert (final_a / name).read_bytes() == (final_b / name).read_bytes(), name
    record(stage=stage, kill_after_step=k, killed_at_step=reached, resumed_from=saved, steps_lost=lost,
           checkpoint_every=every, resume_process_s=resume_s, result="bitwise identical final weights")
