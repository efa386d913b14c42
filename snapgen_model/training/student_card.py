"""The model card of a shipped student (`snapgen release-student`): plain PyTorch / PIL, no services.

The release command scores the student with the product's evaluation (toy-GenEval, every toy prompt x N
images per guidance) and hands the scores here; this module turns them into `MODEL_CARD.md`, the
per-task sample grid (from the evaluation's own sample folder, the caption under each image) and the
training curve (from the loss history the command gathered from MLflow).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from snapgen_model.evaluation.geneval import prompt_folder, sample_path
from snapgen_model.imaging import make_grid
from snapgen_model.training.release_card import TASK_ORDER, curve_picture

REFERENCE_NAMES = {"clean": "clean renders (scorer ceiling)", "ae": "AE reconstructions (latent ceiling)",
                   "floor": "prompt-blind floor", "noise": "uniform noise"}


def best_guidance(sweep: Mapping[float, Mapping[str, Any]]) -> float:
    """The guidance with the highest overall toy-GenEval (the lowest guidance among ties)."""
    if not sweep:
        raise ValueError("best_guidance: the guidance sweep is empty")
    return min(sweep, key=lambda g: (-float(sweep[g]["overall"]), g))


def folder_task_grid(folder: str | Path, per_task: int = 6, scale: int = 3) -> Image.Image:
    """One row per GenEval task of an evaluation sample folder: its first `per_task` prompts, the first
    image of each, the caption under it. `ValueError` naming the folder when it holds no samples."""
    folder = Path(folder)
    rows: dict[str, list[tuple[str, Path]]] = {}
    i = 0
    while (prompt_folder(folder, i) / "metadata.jsonl").is_file():
        meta = json.loads((prompt_folder(folder, i) / "metadata.jsonl").read_text())
        row = rows.setdefault(str(meta.get("tag", "prompts")), [])
        if len(row) < per_task and sample_path(folder, i, 0).is_file():
            row.append((str(meta.get("prompt", "")), sample_path(folder, i, 0)))
        i += 1
    ordered = [rows[t] for t in TASK_ORDER if t in rows] + [r for t, r in rows.items() if t not in TASK_ORDER]
    cells = [c for row in ordered for c in row]
    if not cells:
        raise ValueError(f"{folder}: no evaluation samples (<index>/metadata.jsonl and samples/0000.png)")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for _, p in cells])
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = max(len(r) for r in ordered)
    captions: list[str] = []
    tiles: list[np.ndarray] = []
    blank = np.full_like(images[0], 255)
    k = 0
    for row in ordered:  # pad short rows so every task starts a new row
        for j in range(cols):
            if j < len(row):
                tiles.append(images[k])
                captions.append(row[j][0].removeprefix("a photo of "))
                k += 1
            else:
                tiles.append(blank)
                captions.append("")
    return make_grid(np.stack(tiles), cols=cols, captions=captions, caption_height=24)


def loss_curve(points: Sequence[Mapping[str, float]], path: str | Path, window: int = 10) -> Path | None:
    """The pretraining loss curve (log scale, mean of `window` logged points, so the trend shows through
    the per-batch noise) drawn to `path`; None when there are fewer than 2 points."""
    if len(points) < 2:
        return None
    window = max(1, min(window, len(points) // 2))
    smooth = [{"step": points[i + window - 1]["step"],
               "loss": float(np.mean([p["loss"] for p in points[i:i + window]]))}
              for i in range(0, len(points) - window + 1, window)]
    return curve_picture({f"pretraining (mean of {window} logged steps)": smooth}, path, size=(640, 320))


def _row(name: str, scores: Mapping[str, Any]) -> str:
    tasks = scores.get("tasks") or {}
    cells = [f"{tasks[t]:.3f}" if t in tasks else "-" for t in TASK_ORDER]
    exact = scores.get("exact_count")
    exact = exact.get("overall") if isinstance(exact, Mapping) else exact
    return (f"| {name} | {scores['overall']:.3f} | {'-' if exact is None else f'{exact:.3f}'} | "
            + " | ".join(cells) + " |")


def card_markdown(name: str, *, student: Mapping[str, Any], training: Mapping[str, Any], teacher: str,
                  sweep: Mapping[float, Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]],
                  images: int, base_seed: int, prompts: int, rebuild: str, pictures: Mapping[str, str],
                  note: str = "") -> str:
    """MODEL_CARD.md of student release `name`. `student`: its card (student.json); `training`: the
    pretraining config as logged (steps, batch_size, lr, kd...) and its parameter count; `sweep`: guidance ->
    toy-GenEval scores (overall, exact_count, splits, tasks); `references`: the evaluation's reference rows."""
    best = best_guidance(sweep)
    head = best_scores = sweep[best]
    kd = training.get("kd") or {}
    lines = [
        f"# {name}: a KD-pretrained toy SnapGen student", "",
        f"The toy SnapGen UNet ({training.get('parameters', '?'):,} parameters with its text conditioner), pretrained "
        f"by this project's pretraining stage from the teacher `{teacher}`. Shipped so that a run can start from a "
        "student that already follows prompts (`pretrain.init=release://" + name + "`) instead of spending hours of "
        "CPU on pretraining: the demo continues it and distils it to 4 steps.", "",
        "## Recipe", "",
        f"- pretraining: {training.get('steps', '?')} steps x batch {training.get('batch_size', '?')}, AdamW lr "
        f"{training.get('lr', '?')} (warm-up {training.get('warmup_steps', '?')}, cosine to "
        f"{training.get('min_lr_ratio', '?')} x lr), {training.get('precision', '?')}, EMA (saved), teacher "
        f"{training.get('mode', '?')}",
        f"- distillation terms: kd.combine={kd.get('combine', '?')} (output KD {kd.get('output_kd', '?')}, feature KD "
        f"{kd.get('feature_kd', '?')}, student feature {kd.get('student_feature', '?')}), plus the task loss",
        f"- lineage: pretraining run `{student.get('key')}`, dataset `{str(student.get('dataset_hash', '?'))[:16]}`, "
        f"teacher bundle `{student.get('bundle_id')}`",
        f"- rebuild: `{rebuild}`",
        f"- weights: fp16 safetensors (EMA UNet and EMA conditioner), upcast to float32 when loaded; the preset in the "
        f"UNet's metadata samples with Euler at guidance {best:g} (its best below)", "",
        "## Scores", "",
        f"toy-GenEval, every toy prompt ({prompts} prompts, held-out ones included) x {images} images (base seed "
        f"{base_seed}), exact scene parser, GenEval's official rules; \"exact count\" also requires no extra objects.", "",
        "| guidance | overall | exact count | seen | held-out |", "|---|---|---|---|---|",
    ]
    for g in sorted(sweep):
        s = sweep[g]
        splits = s.get("splits") or {}
        exact = s.get("exact_count")
        exact = exact.get("overall") if isinstance(exact, Mapping) else exact
        mark = "**" if g == best else ""
        lines.append(f"| {g:g} | {mark}{s['overall']:.3f}{mark} | {'-' if exact is None else f'{exact:.3f}'} | "
                     f"{splits.get('seen', float('nan')):.3f} | {splits.get('heldout', float('nan')):.3f} |")
    lines += ["", f"Per task at guidance {best:g}, beside the reference rows of the same evaluation:", "",
              "| row | overall | exact count | " + " | ".join(TASK_ORDER) + " |", "|" + "---|" * (3 + len(TASK_ORDER)),
              _row(f"{name} (guidance {best:g})", best_scores)]
    for ref in ("clean", "ae", "floor", "noise"):
        if ref in references:
            lines.append(_row(REFERENCE_NAMES[ref], references[ref]["geneval"] if "geneval" in references[ref]
                              else references[ref]))
    if "curve" in pictures:
        lines += ["", "## Training", "", f"![pretraining loss]({pictures['curve']})"]
    if "grid" in pictures:
        lines += ["", f"## Samples (guidance {best:g}; one row per task, the caption under each image)", "",
                  f"![samples per task]({pictures['grid']})"]
    lines += ["", "## Use", "",
              f"- start a pretraining run from it: `snapgen run --set pretrain.train.init=release://{name}` "
              "(or `init=release://...` in any PretrainConfig)",
              f"- evaluate or sample it: `snapgen eval --model release://{name}`",
              f"- load it in Python: `snapgen_model.artifacts.student.load_student(release.release_folder("
              f"\"release://{name}\"))` (every sha256 is verified first)", "",
              "## Limits", "",
              "- a toy: 64 x 64 images of the shapes world, 16 x 16 x 16 latents; it says nothing about image quality at "
              "1024 px.",
              f"- held-out prompts (the (colour, shape) pair never seen in training) score "
              f"{(head.get('splits') or {}).get('heldout', float('nan')):.3f}; the teacher's own held-out score bounds it."]
    if note:
        lines += ["", note.strip()]
    return "\n".join(lines) + "\n"
