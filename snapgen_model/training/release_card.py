"""Evaluation, pictures and model card of a toy teacher release (plain PyTorch + PIL).

`release_report` scores a finished bundle the way issue 14 asks: a guidance sweep, then every toy
prompt (seen and held-out) x N images at the chosen guidance with the exact parser and GenEval's
official rules, the exact-object-count diagnostic, per-task scores beside the reference rows (clean
renders, AE reconstructions, the prompt-blind floor, noise), and raw against EMA weights when a
training checkpoint is at hand. `bundle_from_checkpoint` turns a (possibly half-trained) teacher
checkpoint into a bundle folder, so progress can be judged while training runs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from snapgen_model.imaging import make_grid
from snapgen_model.training import bootstrap as bs
from snapgen_model.artifacts.teacher_bundle import TeacherBundle, evaluate_bundle, evaluation_prompts, sample_teacher

TASK_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
REFERENCE_ORDER = ("clean", "ae", "floor", "noise")


def bundle_from_checkpoint(cfg: bs.ToyBootstrapConfig, vae_folder: str | Path, state_path: str | Path,
                           out: str | Path, weights: str = "ema", base_metrics: Mapping[str, Any] | None = None,
                           base_curves: Mapping[str, Any] | None = None) -> Path:
    """Write a bundle folder from a teacher checkpoint (`bootstrap.TEACHER_STATE`) and the AE beside it:
    the `weights` ("ema" or "raw") transformer and text encoder, the run's curve so far. `base_metrics`
    (the finished bundle's record metrics: AE figures, sizes) and `base_curves` (its AE curve) are kept
    beside the checkpoint's."""
    from diffusers import AutoencoderKL

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state["config_hash"] != cfg.content_hash():
        raise ValueError(f"{state_path}: checkpoint of config {state['config_hash']}, not {cfg.content_hash()}")
    pool = bs.render_pool(cfg)
    tokenizer, text_model = bs.build_text_encoder(cfg, bs.world_vocabulary(cfg, pool.captions))
    transformer = bs.build_teacher(cfg)
    src = state["ema"] if weights == "ema" else state
    if weights == "ema" and not src:
        raise ValueError(f"{state_path}: the run kept no EMA (teacher_ema=false); use weights='raw'")
    transformer.load_state_dict(src["transformer"])
    text_model.load_state_dict(src["text_model"])
    vae = AutoencoderKL.from_pretrained(str(vae_folder))
    metrics = dict(base_metrics or {}) | {"teacher_steps": int(state["step"]),
                                          "teacher_seconds": round(float(state["elapsed_s"]), 2),
                                          "teacher_weights": weights}
    curves = {k: v for k, v in (base_curves or {}).items() if k != "teacher"} | {"teacher": list(state["curve"])}
    return bs.save_bundle(out, cfg, vae, transformer.eval(), text_model.eval(), tokenizer, metrics, curves)


def with_eval(bundle: TeacherBundle, **fields: Any) -> TeacherBundle:
    """The same bundle with other evaluation settings (eval_guidance, eval_images_per_prompt, ...)."""
    return dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, **fields))


def headline(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """overall, exact count, seen/held-out and per-task toy-GenEval of one `evaluate_bundle` result."""
    g = evaluation["teacher"]["geneval"]
    return {"overall": g["overall"], "exact_count": g["exact_count"], "splits": g.get("splits", {}),
            "tasks": g["tasks"], "images": evaluation["images"], "guidance": evaluation["guidance"],
            "colour_present": evaluation["teacher"]["colour_present"],
            "objects_per_image": evaluation["teacher"]["objects_per_image"]}


def guidance_sweep(bundle: TeacherBundle, guidances: Sequence[float], images_per_prompt: int = 1,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Every evaluation prompt x `images_per_prompt` at each guidance (no reference rows): headline scores."""
    out = {}
    for g in guidances:
        started = time.monotonic()
        b = with_eval(bundle, eval_guidance=float(g), eval_images_per_prompt=images_per_prompt)
        evaluation = evaluate_bundle_without_reference(b)
        out[f"{g:g}"] = headline(evaluation) | {"seconds": round(time.monotonic() - started, 1)}
        log(f"guidance {g:g}: toy-GenEval {out[f'{g:g}']['overall']:.3f}, exact count "
            f"{out[f'{g:g}']['exact_count']:.3f} ({out[f'{g:g}']['seconds']:.0f} s)")
    return out


def evaluate_bundle_without_reference(bundle: TeacherBundle) -> dict[str, Any]:
    """`evaluate_bundle` minus the reference rows (they do not depend on the model)."""
    return evaluate_bundle(bundle, reference=False)


def task_grid(bundle: TeacherBundle, per_task: int = 8, scale: int = 2) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One row per GenEval task: the first `per_task` evaluation prompts of the task (seen, then held-out),
    one sample each at the bundle's guidance, the caption under each image."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    for record in evaluation_prompts(bundle.config):
        chosen.setdefault(record["tag"], [])
        if len(chosen[record["tag"]]) < per_task:
            chosen[record["tag"]].append(record)
    rows = [chosen[t] for t in TASK_ORDER if t in chosen]
    records = [r for row in rows for r in row]
    seeds = [bundle.config.eval_seed + i for i in range(len(records))]
    images = sample_teacher(bundle, [r["prompt"] for r in records], seeds)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    captions = [r["prompt"].removeprefix("a photo of ") for r in records]
    return make_grid(images, cols=per_task, captions=captions, caption_height=24), records


def curve_picture(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                  size: tuple[int, int] = (900, 320)) -> Path:
    """Loss curves of the training phases side by side (log-scale y), drawn with PIL."""
    phases = [(name, pts) for name, pts in curves.items() if pts]
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    panel = w // max(1, len(phases))
    for k, (name, pts) in enumerate(phases):
        x0, y0, x1, y1 = k * panel + 50, 25, (k + 1) * panel - 15, h - 35
        steps = np.array([p["step"] for p in pts], float)
        loss = np.log10(np.maximum([p["loss"] for p in pts], 1e-6))
        lo, hi = float(loss.min()), float(loss.max()) + 1e-9
        draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
        xs = x0 + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (x1 - x0)
        ys = y1 - (loss - lo) / (hi - lo) * (y1 - y0)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 90, 200), width=2)
        draw.text((x0, 5), f"{name} loss (log10 scale)", fill="black")
        draw.text((x0 - 45, y0), f"{10 ** hi:.3g}", fill="black")
        draw.text((x0 - 45, y1 - 10), f"{10 ** lo:.3g}", fill="black")
        draw.text((x0, y1 + 8), f"step {int(steps.min())}", fill="black")
        draw.text((x1 - 70, y1 + 8), f"step {int(steps.max())}", fill="black")
    img.save(path)
    return Path(path)


def task_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per model/reference (overall, exact count, per task)."""
    head = "| row | overall | exact count | " + " | ".join(TASK_ORDER) + " |"
    lines = [head, "|" + "---|" * (3 + len(TASK_ORDER))]
    for name, r in rows.items():
        tasks = r.get("tasks", {})
        cells = [f"{tasks[t]:.3f}" if t in tasks else "-" for t in TASK_ORDER]
        lines.append(f"| {name} | {r['overall']:.3f} | {r['exact_count']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def weights_of(record: Mapping[str, Any]) -> str:
    """Which weights of its run a bundle holds: "ema" (the default of a bootstrap) or "raw"."""
    return str((record.get("metrics") or {}).get("teacher_weights") or "ema")


WEIGHT_LABELS = {"ema": "EMA", "raw": "raw weights"}


def release_report(bundle: TeacherBundle, *, guidances: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 5.0),
                   images_per_prompt: int = 4, sweep_images: int = 1, other_bundle: TeacherBundle | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sweep guidance (every prompt x `sweep_images`), then score every toy prompt x `images_per_prompt`
    at the best guidance with the reference rows, and the run's other weights (raw beside EMA, or EMA
    beside raw) when given."""
    started = time.monotonic()
    sweep = guidance_sweep(bundle, guidances, sweep_images, log)
    best = max(sweep, key=lambda g: (sweep[g]["overall"], sweep[g]["exact_count"]))
    chosen = with_eval(bundle, eval_guidance=float(best), eval_images_per_prompt=images_per_prompt)
    log(f"best guidance {best}: scoring every prompt x {images_per_prompt} images with the reference rows")
    full = evaluate_bundle(chosen)
    out: dict[str, Any] = {"guidance": float(best), "sweep": sweep, "evaluation": full, "headline": headline(full),
                           "reference": {k: full["reference"][k] for k in REFERENCE_ORDER if k in full["reference"]}}
    if other_bundle is not None:
        other = evaluate_bundle_without_reference(with_eval(other_bundle, eval_guidance=float(best),
                                                            eval_images_per_prompt=images_per_prompt))
        w, shipped = weights_of(other_bundle.record), weights_of(bundle.record)
        out["other"] = headline(other) | {"weights": w}
        log(f"{WEIGHT_LABELS.get(w, w)} at guidance {best}: toy-GenEval {out['other']['overall']:.3f} "
            f"({WEIGHT_LABELS.get(shipped, shipped)} {out['headline']['overall']:.3f})")
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def copy_bundle(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def dump(obj: Any, path: str | Path) -> Path:
    Path(path).write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    return Path(path)


def precision_line(cfg: Mapping[str, Any]) -> str:
    """The card's sentence on the arithmetic of training."""
    if cfg.get("mixed_precision") == "bf16":
        return ("bf16 autocast of transformer and text encoder, fp32 master weights and optimiser state "
                "(bench/RESULTS.md \"Teacher step on CPU\": within the fp32 run-to-run spread).")
    return "fp32 throughout."


def card_markdown(name: str, record: Mapping[str, Any], report: Mapping[str, Any], rebuild: str,
                  world_note: str = "") -> str:
    """MODEL_CARD.md of a release: what it is, how to load it, how it was trained, how it scores."""
    m, h = record.get("metrics", {}), report["headline"]
    cfg = record["config"]
    shipped = weights_of(record)
    rows = {f"teacher ({WEIGHT_LABELS.get(shipped, shipped)}, shipped, guidance {report['guidance']:g})": h}
    if "other" in report:
        w = report["other"]["weights"]
        rows[f"teacher ({WEIGHT_LABELS.get(w, w)} of the same run, guidance {report['guidance']:g})"] = report["other"]
    labels = {"clean": "clean renders (scorer ceiling)", "ae": "AE reconstructions (latent ceiling)",
              "floor": "prompt-blind floor", "noise": "uniform noise"}
    rows |= {labels.get(k, k): v for k, v in report["reference"].items()}
    sweep = "\n".join(f"| {g} | {s['overall']:.3f} | {s['exact_count']:.3f} | {s['splits'].get('seen', float('nan')):.3f} | "
                      f"{s['splits'].get('heldout', float('nan')):.3f} |" for g, s in report["sweep"].items())
    splits = h.get("splits", {})
    where = ("on one GPU (the session that made it was lent an NVIDIA H200: scripts/gpu_teacher_sweep.py, the same "
             "training code); the rebuild command runs the same recipe on 2 CPU cores"
             if record.get("trained_on") == "cuda" else "on 2 CPU cores")
    return f"""# Toy teacher release `{name}`

A text-to-image teacher for snapgen's toy world (64x64 shapes scenes): a diffusers `AutoencoderKL`
(f=4, 16 latent channels), a diffusers `SD3Transformer2DModel` ({cfg['teacher_layers']} joint blocks,
{cfg['teacher_heads']} x {cfg['teacher_head_dim']} heads, patch {cfg['patch_size']}) and a tiny
`CLIPTextModelWithProjection` with a word-level tokenizer, trained jointly from scratch {where}.
Weights are fp16 safetensors; the adapters upcast them to float32 on CPU. The demo and the `toy`
pipeline load this folder through the production `from_pretrained` path instead of training a teacher.

- recipe (training config) hash: `{record['config_hash']}` (preset `{record.get('preset')}`, recipe version {cfg['recipe_version']})
- rebuild: `{rebuild}`
- load: `snapgen_model.training.release.load_release("{name}")` (verifies every sha256 first)
- sample with: {cfg['eval_steps']} Euler steps, classifier-free guidance {report['guidance']:g} against the empty caption

## Training

| figure | value |
|---|---|
| AE steps / seconds | {m.get('ae_steps')} / {m.get('ae_seconds')} |
| AE held-out PSNR (dB) | {m.get('ae_psnr_heldout')} |
| teacher steps / seconds | {m.get('teacher_steps')} / {m.get('teacher_seconds')} |
| teacher batch, peak lr, warm-up | {cfg['teacher_batch']}, {cfg['teacher_lr']}, {cfg['teacher_warmup_steps']} |
| teacher images/s (last session) | {m.get('teacher_images_per_s')} |
| final flow-matching loss | {m.get('teacher_loss')} |
| EMA decay (transformer + text encoder) | {m.get('teacher_ema_decay')} |
| parameters: transformer / text encoder / AE | {m.get('teacher_params')} / {m.get('text_encoder_params')} / {m.get('ae_params')} |

Init: adaLN-Zero (every adaLN modulation, norm_out and proj_out start at zero). Caption dropout
{cfg['cfg_dropout']} to the empty caption (the CFG null). Logit-normal timesteps ({cfg['logit_mean']}, {cfg['logit_std']}).
Fresh (t, noise) every step over a pool of {cfg['pool_size']} train-split scenes.
{precision_line(cfg)}

![loss curves](card/loss_curves.png)

## Scores

Every toy prompt ({h['images'] // max(1, cfg['eval_images_per_prompt'])} prompts, held-out ones included) x
{cfg['eval_images_per_prompt']} images, exact scene parser, GenEval's official rules; "exact count"
additionally requires no extra objects. Seen prompts {splits.get('seen', float('nan')):.3f}, held-out
prompts (the never-seen pair {', '.join(' '.join(p) for p in cfg['held_out_pairs'])}) {splits.get('heldout', float('nan')):.3f}.

{task_table(rows)}

Guidance sweep (every prompt x {report.get('sweep_images', 1)} image):

| guidance | overall | exact count | seen | held-out |
|---|---|---|---|---|
{sweep}

![samples per task](card/samples_per_task.png)

Rows of the picture: single object, two objects, counting, colours, position, colour attribution
(the caption under each image; one sample per prompt at the release guidance).
{world_note}
"""
