"""2-process FSDP pretraining on CPU (torch FSDP2 over gloo) through the launch entry point: the student
really is sharded, the run does the same maths as DDP (same weights and optimiser state after the same
steps), and its single-file checkpoints resume under either strategy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def launch(folder: Path, cache: Path, strategy: str, steps: int) -> dict:
    """Run `python -m snapgen_model.training.launch` on 2 CPU processes; returns its result JSON."""
    spec = {"preset": "toy-smoke", "pretrain": {"steps": steps, "batch_size": 4, "strategy": strategy, "devices": 2,
                                                "accelerator": "cpu", "checkpoint_every": 2, "log_every": 1,
                                                "kd": {"feature_kd": False}},
            "cache": {"targets_per_sample": 1}, "cache_dir": str(cache), "encoders": ["clip"],
            "state_root": str(folder / "state"), "result_path": str(folder / "result.json"),
            "student_dir": str(folder / "student")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "snapgen_model.training.launch", str(folder / "spec.json")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "result.json").read_text())


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))[:5]
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step FSDP run and the same 4-step DDP run (checkpoints at 2 and 4, the student saved)."""
    from tests.fixtures.caches import synthetic_cache

    root = tmp_path_factory.mktemp("fsdp")
    synthetic_cache(root / "cache", n=8, targets=1, shards=1, pooled=24, t=0.5, key_width=0)
    return root, {s: launch(root / s, root / "cache", s, 4) for s in ("fsdp", "ddp")}


def test_fsdp_shards_the_student_and_matches_ddp(runs):
    root, results = runs
    assert results["fsdp"]["sharded"] is True and results["ddp"]["sharded"] is False
    assert results["fsdp"]["world_size"] == 2 and results["fsdp"]["step"] == 4
    for name in ("state/step-00000004/modules.safetensors", "state/step-00000004/optimizer.safetensors",
                 "student/unet_ema.safetensors", "student/unet_raw.safetensors", "student/conditioner.safetensors"):
        assert max_difference(root / "fsdp" / name, root / "ddp" / name) < 1e-6, name
    # the gathered student is a complete, loadable student (not one rank's shards)
    from snapgen_model.artifacts.student import load_student

    preset, unet, conditioner = load_student(root / "fsdp" / "student")
    assert preset.name == "toy-smoke" and sum(p.numel() for p in unet.parameters()) > 0


def test_fsdp_resumes_its_own_and_a_ddp_checkpoint(runs, tmp_path):
    """Resume to step 6: FSDP from its own step-4 state, FSDP from the DDP run's step-4 state, and DDP from
    its own; all three end with the same weights (the checkpoint format is the same for both strategies)."""
    root, _ = runs
    for name, source in (("fsdp_own", "fsdp"), ("fsdp_from_ddp", "ddp"), ("ddp_own", "ddp")):
        (tmp_path / name / "state").mkdir(parents=True)
        shutil.copytree(root / source / "state" / "step-00000004", tmp_path / name / "state" / "step-00000004")
    done = {name: launch(tmp_path / name, root / "cache", name.split("_")[0], 6)
            for name in ("fsdp_own", "fsdp_from_ddp", "ddp_own")}
    assert all(r["step"] == 6 and r["resumed_from"].endswith("step-00000004") for r in done.values()), done
    weights = "state/step-00000006/modules.safetensors"
    assert max_difference(tmp_path / "fsdp_own" / weights, tmp_path / "ddp_own" / weights) < 1e-6
    assert max_difference(tmp_path / "fsdp_from_ddp" / weights, tmp_path / "ddp_own" / weights) < 1e-6
