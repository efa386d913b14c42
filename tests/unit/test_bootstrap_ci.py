"""Bootstrap confidence intervals of GenEval scores (snapgen_model/evaluation/stats.py), checked
against intervals worked out by hand from the exact bootstrap distribution."""
from __future__ import annotations

import pytest

from snapgen_model.evaluation.stats import geneval_ci, paired_difference_ci, split_rows, task_matrices


def rows(task: str, verdicts: list[list[int]], prefix: str = "p") -> list[dict]:
    """results.jsonl-like rows: prompt i of `task` has images j with correct = verdicts[i][j]."""
    return [{"tag": task, "prompt": f"{prefix}{i}", "correct": bool(v), "filename": f"{i:05d}/samples/{j:04d}.png"}
            for i, vs in enumerate(verdicts) for j, v in enumerate(vs)]


def test_prompt_resampling_matches_the_hand_worked_interval():
    # 4 prompts, 1 image each, one correct. A replicate's mean is Binomial(4, 1/4) / 4:
    # P(0) = .316, P(.25) = .422, P(.5) = .211, P(.75) = .047, P(1) = .004, so the 2.5th percentile
    # is 0 and the 97.5th is .75 (P(mean <= .5) = .949 < .975 <= P(mean <= .75) = .996).
    ci = geneval_ci(rows("single_object", [[0], [0], [0], [1]]), replicates=20_000)
    assert ci.value == pytest.approx(0.25)
    assert (ci.lo, ci.hi) == (0.0, 0.75)
    assert not ci.excludes_zero()


def test_images_are_resampled_within_a_prompt():
    # one prompt, images [0, 1]: a replicate's mean is 0, .5 or 1 with P .25 / .5 / .25 -> [0, 1].
    ci = geneval_ci(rows("colors", [[0, 1]]), replicates=20_000)
    assert (ci.value, ci.lo, ci.hi) == (0.5, 0.0, 1.0)


def test_overall_is_the_mean_of_task_means_with_tasks_resampled_separately():
    # task A always right (2 prompts x 2 images), task B as in the first test: overall (1 + .25) / 2,
    # interval (1 + [0, .75]) / 2 = [.5, .875]. A pooled mean over images would give 5/8 too, but a
    # different interval; the per-task structure is what GenEval reports.
    data = rows("single_object", [[1, 1], [1, 1]], "a") + rows("counting", [[0], [0], [0], [1]], "b")
    ci = geneval_ci(data, replicates=20_000)
    assert ci.value == pytest.approx(0.625)
    assert (ci.lo, ci.hi) == (0.5, 0.875)


def test_paired_difference_uses_the_same_draws_for_both_models():
    b = rows("counting", [[0], [0], [0], [1]])
    same = paired_difference_ci(b, b, replicates=2000)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    a = rows("counting", [[1], [1], [1], [1]])
    diff = paired_difference_ci(a, b, replicates=20_000)  # 1 - mean(B): [1 - .75, 1 - 0]
    assert diff.value == pytest.approx(0.75)
    assert (diff.lo, diff.hi) == (0.25, 1.0)
    assert diff.excludes_zero()


def test_paired_difference_is_narrower_than_unpaired_when_models_agree_on_hard_prompts():
    # A and B fail and pass the same prompts, A passes one more: the paired interval is tight.
    b = rows("colors", [[0, 0], [1, 1], [0, 0], [1, 1], [0, 0], [1, 0]])
    a = rows("colors", [[0, 0], [1, 1], [0, 0], [1, 1], [0, 0], [1, 1]])
    diff = paired_difference_ci(a, b, replicates=4000)
    ci_a, ci_b = geneval_ci(a, replicates=4000), geneval_ci(b, replicates=4000)
    assert diff.hi - diff.lo < (ci_a.hi - ci_a.lo)
    assert diff.value == pytest.approx(ci_a.value - ci_b.value)


def test_same_seed_same_interval_other_seed_other_draws():
    data = rows("position", [[0, 1], [1, 1], [0, 0], [1, 0], [0, 1]])
    assert geneval_ci(data, seed=3) == geneval_ci(data, seed=3)
    assert geneval_ci(data, seed=3, replicates=200) != geneval_ci(data, seed=4, replicates=200)


def test_custom_verdict_and_splits():
    data = rows("two_object", [[1], [0]])
    data[0]["exact"] = False
    data[1]["exact"] = True
    ci = geneval_ci(data, verdict=lambda r: r["exact"], replicates=1000)
    assert ci.value == 0.5
    parts = split_rows(data, {"p0": "seen"})
    assert [r["prompt"] for r in parts["seen"]] == ["p0"] and [r["prompt"] for r in parts["unknown"]] == ["p1"]


def test_bad_inputs_are_named():
    ragged = rows("counting", [[0, 1], [1]])
    with pytest.raises(ValueError, match="'p1' has 1"):
        geneval_ci(ragged)
    dup = rows("counting", [[0]]) * 2
    with pytest.raises(ValueError, match="image 0 twice"):
        task_matrices(dup)
    with pytest.raises(ValueError, match="different tasks"):
        paired_difference_ci(rows("colors", [[1]]), rows("counting", [[1]]))
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_difference_ci(rows("colors", [[1], [0]]), rows("colors", [[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="level"):
        geneval_ci(rows("colors", [[1]]), level=1.5)
    with pytest.raises(ValueError, match="no scored images"):
        geneval_ci([])
