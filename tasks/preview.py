"""Preview grids of a training stage (student beside teacher, fixed prompts and seeds) into its MLflow
run: builds `snapgen_model.training.preview.PreviewCallback` from the teacher bundle of the cache."""
from __future__ import annotations

from typing import Any

from snapgen_model.training.preview import PreviewCallback, PreviewRenderer
from tasks.cache import local_folder

GENERIC_PROMPTS = ["a red apple on a wooden table", "a lighthouse at sunset", "a cat wearing sunglasses",
                   "two blue cups on a shelf", "a city street in the rain", "a bowl of ramen, top view",
                   "a green bicycle leaning on a wall", "a snowy mountain under a clear sky"]


def _prompts(bundle: str, count: int) -> list[str]:
    """Toy bundles: prompts of the bundle's own world (one per GenEval task, held-out ones included)."""
    from snapgen_model.data.shapes import ShapesWorldConfig
    from snapgen_model.artifacts.teacher_bundle import bundle_world
    from snapgen_model.evaluation.toy_reference import toy_prompts

    world = bundle_world(bundle)
    if not world:
        return GENERIC_PROMPTS[:count]
    records = toy_prompts(ShapesWorldConfig(**world), "all", 2)
    by_task: dict[str, list[str]] = {}
    for r in records:
        by_task.setdefault(r["tag"], []).append(r["prompt"])
    picked = [p for ps in zip(*by_task.values()) for p in ps]
    return picked[:count]


def preview_callback(cache_manifest: dict[str, Any], preset: Any, run: Any, every: int,
                     count: int = 8, seed: int = 1234) -> PreviewCallback | None:
    """The callback for a stage run, or None when the cache names no teacher bundle."""
    from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec
    from snapgen_model.distill.vae import VAEAdapter, VAEConfig
    from snapgen_model.artifacts.teacher_bundle import is_toy_teacher_bundle
    from snapgen_model.evaluation.bundle_generators import BundleTeacherGenerator, _VAEDecode

    bundle_uri = cache_manifest.get("bundle_uri")
    if not bundle_uri:
        return None
    bundle = str(local_folder(bundle_uri))
    encoders = {}
    for spec in cache_manifest.get("encoders") or []:
        spec = TextEncoderSpec.from_dict(dict(spec) | {"path": bundle})
        encoders[spec.name] = TextEncoderAdapter.from_pretrained(spec)
    decoder = _VAEDecode(VAEAdapter.from_pretrained(VAEConfig(path=bundle, subfolder="vae"))).eval()
    prompts = _prompts(bundle, count)
    seeds = [seed + i for i in range(len(prompts))]
    teacher = BundleTeacherGenerator(bundle)(prompts, seeds) if is_toy_teacher_bundle(bundle) else None
    render = PreviewRenderer(preset, prompts, seeds, lambda p: {n: e(list(p)) for n, e in encoders.items()}, decoder,
                             teacher)

    def log(grid, step: int) -> None:
        run.log_image(grid, f"previews/step-{step:07d}.png")
        run.log_text("\n".join(f"{i}: {p} (seed {s})" for i, (p, s) in enumerate(zip(prompts, seeds))),
                     "previews/prompts.txt")

    return PreviewCallback(render, log, every)
