"""`snapgen eval --sampler` / `EvaluateParams.sampler`: an undistilled student sampled the way a distilled
one is (the few-step sampler), so the few-step comparison differs in training only, not in sampling."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.tiny_student import build_tiny_student

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


def test_few_step_override_changes_the_sampler_identity_and_images(tmp_path, tiny_bundle):
    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator

    student = build_tiny_student(tmp_path / "student", tiny_bundle)
    euler = BundleStudentGenerator(student, tiny_bundle, steps=2)
    few = BundleStudentGenerator(student, tiny_bundle, steps=2, kind="few_step")
    assert euler.preset.sampler.kind == "euler" and few.preset.sampler.kind == "few_step"
    assert euler.identity != few.identity  # a separate sample folder: nothing reused across samplers
    a, b = euler(PROMPTS, [0, 1]), few(PROMPTS, [0, 1])
    assert a.shape == b.shape and not np.array_equal(a, b)
    again = BundleStudentGenerator(student, tiny_bundle, steps=2, kind="few_step")(PROMPTS, [0, 1])
    assert np.array_equal(b, again)
    default = BundleStudentGenerator(student, tiny_bundle, steps=2, kind=None)
    assert default.identity == euler.identity  # no override: the checkpoint's own sampler


def test_teacher_refuses_the_few_step_sampler(tiny_bundle):
    from snapgen_model.evaluation.bundle_generators import BundleTeacherGenerator

    with pytest.raises(ValueError, match="Euler only"):
        BundleTeacherGenerator(tiny_bundle, kind="few_step")


def test_cli_names_a_bad_sampler_in_one_line(tmp_path):
    snapgen = Path(sys.executable).parent / "snapgen"
    proc = subprocess.run([str(snapgen), "eval", "--model", str(tmp_path / "m"), "--sampler", "ddim"],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "SNAPGEN_HOME": str(tmp_path / "home"),
                               "HOME": str(tmp_path)})
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "--sampler 'ddim'" in lines[0] and "euler" in lines[0] and "few_step" in lines[0]
