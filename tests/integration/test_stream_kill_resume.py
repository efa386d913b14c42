"""kill -9 during training on the streaming data path, then resume in a new process: at most one
checkpoint interval lost, and the final weights are bitwise those of an uninterrupted run (the
stream position, buffer included, travels in the checkpoint). Same protocol and child as
tests/reliability/test_kill_resume.py, with `data=stream` in the child's spec."""
from __future__ import annotations

import json
import random
import signal
import threading

import pytest

from snapgen_model.training.state import latest_state
from tests.reliability.test_kill_resume import EVERY, STEPS, checkpoint_step, child, kill_at_step, progress
from tests.reliability.train_child import run as run_in_process
from tests.unit.test_stream_data import corrupt_cache

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STREAM = {"data": "stream", "shuffle_buffer": 3}


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_stream_sigkill_then_resume_matches_uninterrupted_run(stage, tmp_path):
    steps, every = STEPS[stage], EVERY[stage]
    cache = corrupt_cache(tmp_path / "cache")
    rng = random.SystemRandom()
    k, jitter = rng.randint(every + 1, steps - 2 * every), rng.uniform(0.0, 0.15)
    base = {"stage": stage, "cache_dir": str(cache), "steps": steps, "checkpoint_every": every, "throttle_s": 0.15,
            "extra": STREAM}
    killed_root = tmp_path / "killed" / "state"
    proc = child(base | {"state_root": str(killed_root), "progress_path": str(tmp_path / "killed" / "progress")},
                 tmp_path / "killed")
    killer: dict[str, float] = {}
    watcher = threading.Thread(target=lambda: killer.update(
        t=kill_at_step(proc, tmp_path / "killed" / "progress", killed_root, k, jitter)))
    watcher.start()
    reference = run_in_process(base | {"state_root": str(tmp_path / "full" / "state"), "throttle_s": 0.0})
    watcher.join()
    assert proc.wait(30) == -signal.SIGKILL, (tmp_path / "killed" / "stderr.log").read_text()[-3000:]
    reached, saved = progress(tmp_path / "killed" / "progress"), checkpoint_step(killed_root)
    assert "t" in killer and k <= reached < steps and 0 < saved <= reached and reached - saved < every
    proc = child(base | {"state_root": str(killed_root), "result_path": str(tmp_path / "resumed.json"),
                         "throttle_s": 0.0}, tmp_path / "resumed")
    assert proc.wait(300) == 0, (tmp_path / "resumed" / "stderr.log").read_text()[-3000:]
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert result["resumed_from"].endswith(f"step-{saved:08d}") and result["step"] == steps == reference["step"]
    assert result["data_skipped"] == reference["data_skipped"] == {"bad_samples": 6, "bad_shards": 1}
    final_a, final_b = latest_state(tmp_path / "full" / "state"), latest_state(killed_root)
    for name in ("modules.safetensors", "optimizer.safetensors"):
        assert (final_a / name).read_bytes() == (final_b / name).read_bytes(), f"{name} (k={k}, resumed at {saved})"
    assert json.loads((final_b / "state.json").read_text())["data_position"]["ranks"][0]["stream"]["buffer"]
