"""2-process DDP pretraining on CPU (gloo) through the launch entry point Lightning re-executes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def write_cache(folder: Path, n: int = 8) -> None:
    """A cache folder in the caching stage's format, from synthetic tensors (one shard, one pair at t = 0.5)."""
    from tests.fixtures.caches import synthetic_cache

    synthetic_cache(folder, n=n, targets=1, shards=1, pooled=24, t=0.5, key_width=0)


@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_process_ddp_run(tmp_path, launcher):
    """`lightning`: the launch module re-executed per rank by Lightning (as `snapgen pretrain --set devices=2`);
    `torchrun`: the multi-node launch (docs/training.md, infra/k8s) on one node, which fails if any rank fails."""
    write_cache(tmp_path / "cache")
    spec = {"preset": "toy-smoke", "pretrain": {"steps": 4, "batch_size": 4, "strategy": "ddp", "devices": 2,
                                                "accelerator": "cpu", "checkpoint_every": 2, "log_every": 1,
                                                "kd": {"feature_kd": False}},
            "cache": {"targets_per_sample": 1}, "cache_dir": str(tmp_path / "cache"), "encoders": ["clip"],
            "state_root": str(tmp_path / "state"), "result_path": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    module = ["-m", "snapgen_model.training.launch", str(tmp_path / "spec.json")]
    rdzv = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0"]
    command = [sys.executable, *(rdzv if launcher == "torchrun" else []), *module]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 4
    assert sorted(p.name for p in (tmp_path / "state").glob("step-*")) == ["step-00000002", "step-00000004"]
