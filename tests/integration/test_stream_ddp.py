"""2-process DDP pretraining on CPU (gloo) with streamed data: each rank's position is checkpointed,
the corrupt-data counters are summed over ranks, and a run resumed from a mid-run checkpoint ends
bitwise at the uninterrupted run's weights."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.unit.test_stream_data import corrupt_cache

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def launch(tmp_path: Path, name: str, cache: Path, state: Path) -> dict:
    spec = {"preset": "toy-smoke", "pretrain": {"steps": 4, "batch_size": 4, "strategy": "ddp", "devices": 2,
                                                "accelerator": "cpu", "checkpoint_every": 2, "log_every": 1,
                                                "kd": {"feature_kd": False}, "data": "stream", "shuffle_buffer": 3},
            "cache": {"targets_per_sample": 2}, "cache_dir": str(cache), "encoders": ["clip"],
            "state_root": str(state), "result_path": str(tmp_path / f"{name}.json")}
    (tmp_path / f"{name}-spec.json").write_text(json.dumps(spec))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "snapgen_model.training.launch", str(tmp_path / f"{name}-spec.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_two_process_stream_run_resumes_bitwise(tmp_path):
    cache = corrupt_cache(tmp_path / "cache")
    full = launch(tmp_path, "full", cache, tmp_path / "full")
    assert full["world_size"] == 2 and full["step"] == 4
    assert full["data_skipped"] == {"bad_samples": 6, "bad_shards": 1}  # summed over ranks, as load_cache_folder
    meta = json.loads((tmp_path / "full" / "step-00000002" / "state.json").read_text())
    ranks = meta["data_position"]["ranks"]
    assert meta["data_position"]["world"] == 2 and ranks[0] != ranks[1] and all(p["stream"]["emitted"] == 4 for p in ranks)
    shutil.copytree(tmp_path / "full" / "step-00000002", tmp_path / "part" / "step-00000002")
    resumed = launch(tmp_path, "resumed", cache, tmp_path / "part")
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["step"] == 4
    assert resumed["data_skipped"] == full["data_skipped"]
    for name in ("modules.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "full" / "step-00000004" / name))
        b = load_file(str(tmp_path / "part" / "step-00000004" / name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
