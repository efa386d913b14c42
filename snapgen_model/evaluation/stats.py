"""Confidence intervals for GenEval-style scores: a two-level (prompts, then images) bootstrap.

GenEval's overall score is the mean over tasks of each task's mean over images. Its uncertainty has
two sources: which prompts were drawn (a task has a few dozen) and which seeds (images per prompt).
`geneval_ci` resamples both, stratified by task: for each bootstrap replicate and task, draw the
task's prompts with replacement, then for each drawn prompt its images with replacement, and
recompute the statistic exactly as `geneval.summarize` does. The 95% interval is the 2.5th and 97.5th
percentile of the replicates (percentile bootstrap).

`paired_difference_ci` compares two models scored on the same prompts and seeds (the evaluation runner
gives image j of a prompt the same seed for every model): each replicate applies the *same* prompt
and image draws to both, so the interval of the difference is much narrower than two separate
intervals would suggest, and "the interval excludes zero" is the test of "A beats B".

Rows are `results.jsonl` rows (`geneval.score_pil`): `tag`, `prompt`, `correct`, and `filename`
ending in `<image index>.png`. The exact-count diagnostic uses `geneval.exact_count`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Row = Mapping[str, Any]
Verdict = Callable[[Row], bool]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval."""

    value: float  # the statistic on the data itself
    lo: float  # lower bound
    hi: float  # upper bound
    level: float  # coverage, e.g. 0.95
    replicates: int  # bootstrap replicates drawn

    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "level": self.level,
                "replicates": self.replicates}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _image_index(row: Row, fallback: int) -> int:
    """Image index of a row: the number in its file name (`.../samples/0003.png` -> 3), else `fallback`."""
    match = re.search(r"(\d+)\.png$", str(row.get("filename", "")))
    return int(match.group(1)) if match else fallback


def _correct(row: Row) -> bool:
    return bool(row["correct"])


def task_matrices(rows: Sequence[Row], verdict: Verdict = _correct) -> dict[str, tuple[list[str], np.ndarray]]:
    """task -> (prompts in sorted order, (prompts, images) 0/1 matrix); image j of every prompt in column j.

    Every prompt of a task must have the same number of images (as the evaluation runner makes them);
    a ragged set is refused with the prompt that differs."""
    by_task: dict[str, dict[str, dict[int, float]]] = {}
    for i, row in enumerate(rows):
        images = by_task.setdefault(str(row["tag"]), {}).setdefault(str(row["prompt"]), {})
        j = _image_index(row, len(images))
        if j in images:
            raise ValueError(f"GenEval CI: prompt {row['prompt']!r} has image {j} twice (row {i})")
        images[j] = float(verdict(row))
    out = {}
    for task, prompts in sorted(by_task.items()):
        names = sorted(prompts)
        counts = {len(prompts[p]) for p in names}
        if len(counts) != 1:
            worst = min(names, key=lambda p: len(prompts[p]))
            raise ValueError(f"GenEval CI: task {task!r} has prompts with {sorted(counts)} images; "
                             f"{worst!r} has {len(prompts[worst])} (every prompt needs the same count)")
        out[task] = (names, np.array([[prompts[p][j] for j in sorted(prompts[p])] for p in names]))
    return out


def _replicates(mats: Mapping[str, np.ndarray], others: Sequence[Mapping[str, np.ndarray]], replicates: int,
                rng: np.random.Generator) -> list[np.ndarray]:
    """(replicates,) overall statistic (mean over tasks of the task mean) for `mats` and each of `others`,
    all resampled with the same prompt and image draws."""
    totals = [np.zeros(replicates) for _ in range(1 + len(others))]
    for task, m in mats.items():
        p, s = m.shape
        prompts = rng.integers(p, size=(replicates, p))  # (R, P)
        images = rng.integers(s, size=(replicates, p, s))  # (R, P, S)
        for k, mat in enumerate([m, *[o[task] for o in others]]):
            totals[k] += mat[prompts[:, :, None], images].mean(axis=(1, 2))
    return [t / len(mats) for t in totals]


def _interval(value: float, draws: np.ndarray, level: float) -> Interval:
    bounds = np.asarray(np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf"))
    return Interval(float(value), float(bounds[0]), float(bounds[1]), level, int(draws.size))


def _check(level: float, replicates: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if replicates < 100:
        raise ValueError(f"bootstrap replicates must be >= 100, got {replicates}")


def geneval_ci(rows: Sequence[Row], *, verdict: Verdict = _correct, level: float = 0.95, replicates: int = 4000,
               seed: int = 0) -> Interval:
    """The GenEval overall score of `rows` (mean of task means of `verdict`) with its two-level
    bootstrap interval over prompts and images (module docstring)."""
    _check(level, replicates)
    if not rows:
        raise ValueError("GenEval CI: no scored images")
    mats = {t: m for t, (_, m) in task_matrices(rows, verdict).items()}
    value = float(np.mean([m.mean() for m in mats.values()]))
    (draws,) = _replicates(mats, [], replicates, np.random.default_rng(seed))
    return _interval(value, draws, level)


def paired_difference_ci(rows_a: Sequence[Row], rows_b: Sequence[Row], *, verdict: Verdict = _correct,
                         level: float = 0.95, replicates: int = 4000, seed: int = 0) -> Interval:
    """Score(A) - score(B) on the same prompts and image indices, with a paired bootstrap interval
    (the same prompt and image draws for both in every replicate)."""
    _check(level, replicates)
    a, b = task_matrices(rows_a, verdict), task_matrices(rows_b, verdict)
    if set(a) != set(b):
        raise ValueError(f"paired CI: the two row sets cover different tasks ({sorted(a)} vs {sorted(b)})")
    for task in a:
        if a[task][0] != b[task][0] or a[task][1].shape != b[task][1].shape:
            raise ValueError(f"paired CI: task {task!r} differs in prompts or images per prompt between the two "
                             f"models ({a[task][1].shape} vs {b[task][1].shape}); score both on the same prompts "
                             "and seeds")
    ma, mb = {t: m for t, (_, m) in a.items()}, {t: m for t, (_, m) in b.items()}
    value = float(np.mean([ma[t].mean() for t in ma]) - np.mean([mb[t].mean() for t in mb]))
    da, db = _replicates(ma, [mb], replicates, np.random.default_rng(seed))
    return _interval(value, da - db, level)


def split_rows(rows: Sequence[Row], splits: Mapping[str, str]) -> dict[str, list[Row]]:
    """Rows grouped by the split of their prompt (prompt -> split name; unknown prompts: "unknown")."""
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(splits.get(str(row["prompt"]), "unknown"), []).append(row)
    return out
