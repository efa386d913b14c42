"""The toy teacher bundle: a pipeline-style folder, loaded through the production adapters.

Layout (the same as a diffusers SD3 pipeline folder, so the full-scale loading code reads it)::

    <folder>/vae/                AutoencoderKL (scaling/shift factors in its config)
    <folder>/transformer/        SD3Transformer2DModel
    <folder>/text_encoder/       CLIPTextModelWithProjection + its word-level tokenizer
    <folder>/bundle.json         config, world, metrics, loss curves, config hash, file checksums

`bundle.json` is written last (DESIGN.md "Stages: contracts"): a folder without it is unfinished.
Sampling is Euler + classifier-free guidance (SNAPGEN_SPEC.md section 4) with the empty caption,
encoded by the same text encoder, as the null condition (the caption dropout of training).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from snapgen_model.data.shapes import ShapesWorldConfig, enumerate_prompts
from snapgen_model.diffusion.generate import latents_to_images, seeded_noise
from snapgen_model.diffusion.samplers import make_timesteps, sample_euler
from snapgen_model.distill.teacher import LoadError, SD3Teacher, TeacherConfig
from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec, sd3_teacher_condition
from snapgen_model.distill.vae import VAEAdapter, VAEConfig
from snapgen_model.evaluation.scene_parser import parse_scene
from snapgen_model.artifacts.teacher_recipe import ToyBootstrapConfig

BUNDLE_FORMAT = "snapgen-toy-teacher/1"
BUNDLE_FILE = "bundle.json"
SUBFOLDERS = ("vae", "transformer", "text_encoder")
DETECTION_THRESHOLD = 0.3  # GenEval's detection score threshold, for the diagnostics


@dataclasses.dataclass
class TeacherBundle:
    """A loaded toy teacher: the three production adapters and the bundle record."""

    teacher: SD3Teacher  # frozen SD3 transformer (velocity + features)
    vae: VAEAdapter  # frozen AE with its latent normalisation
    text: TextEncoderAdapter  # frozen tiny CLIP + tokenizer
    config: ToyBootstrapConfig  # the config that trained it
    record: dict[str, Any]  # bundle.json

    def condition(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """SD3's conditioning layout for `prompts`: {context (B, L, joint_dim), pooled (B, P)}."""
        encoded = {"clip": self.text(list(prompts))}
        return sd3_teacher_condition(encoded, ["clip"], self.config.joint_dim)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(folder: str | Path, cfg: ToyBootstrapConfig, vae: torch.nn.Module, transformer: torch.nn.Module,
                text_model: torch.nn.Module, tokenizer: Any, metrics: Mapping[str, Any],
                curves: Mapping[str, Any]) -> Path:
    """Write the models with `save_pretrained`, then `bundle.json` last (atomically). Returns the folder."""
    from snapgen_model.distill.toy_text import save_text_encoder

    folder = Path(folder)
    (folder / BUNDLE_FILE).unlink(missing_ok=True)  # an overwritten folder is unfinished until the end
    vae.save_pretrained(folder / "vae")
    transformer.save_pretrained(folder / "transformer")
    save_text_encoder(text_model, tokenizer, folder / "text_encoder")
    files = {p.relative_to(folder).as_posix(): _sha256(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != BUNDLE_FILE}
    record = {"format": BUNDLE_FORMAT, "preset": cfg.name, "config": cfg.to_dict(),
              "config_hash": cfg.content_hash(), "world": dataclasses.asdict(cfg.world()),
              "metrics": dict(metrics), "curves": dict(curves), "files": files}
    _write_record(folder, record)
    return folder


def _write_record(folder: Path, record: Mapping[str, Any]) -> None:
    """Write bundle.json atomically (temp file + rename)."""
    tmp = folder / f".{BUNDLE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    os.replace(tmp, folder / BUNDLE_FILE)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def update_bundle_record(folder: str | Path, **fields: Any) -> dict[str, Any]:
    """Add or replace top-level fields of a finished bundle's `bundle.json` (atomically)."""
    record = read_bundle_record(folder) | fields
    _write_record(Path(folder), record)
    return record


def read_bundle_record(folder: str | Path) -> dict[str, Any]:
    """`bundle.json` of a finished bundle; `LoadError` naming the folder if it is missing or foreign."""
    path = Path(folder) / BUNDLE_FILE
    if not path.is_file():
        raise LoadError(f"{folder}: no {BUNDLE_FILE}, so not a finished toy teacher bundle")
    record = json.loads(path.read_text())
    if record.get("format") != BUNDLE_FORMAT:
        raise LoadError(f"{path}: format {record.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    return record


def is_bundle_folder(folder: str | Path) -> bool:
    """A folder with a `bundle.json` (finished; toy or not)."""
    return Path(folder).is_dir() and (Path(folder) / BUNDLE_FILE).is_file()


def is_toy_teacher_bundle(folder: str | Path) -> bool:
    """A bundle written by the toy bootstrap (`bundle.json` of this format): samplable as a teacher."""
    path = Path(folder) / BUNDLE_FILE
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == BUNDLE_FORMAT
    except json.JSONDecodeError:
        return False


def bundle_image_size(folder: str | Path) -> int:
    """The image side (pixels) a toy teacher bundle was trained at."""
    return int(read_bundle_record(folder)["config"]["resolution"])


def bundle_world(folder: str | Path) -> dict[str, Any]:
    """The shapes-world settings a toy teacher bundle was trained on (held-out pairs included), for toy
    scoring; {} for other bundles (a full SD3 snapshot, a test bundle)."""
    if not is_toy_teacher_bundle(folder):
        return {}
    return dict(json.loads((Path(folder) / BUNDLE_FILE).read_text()).get("world") or {})


def load_bundle(folder: str | Path, device: str | torch.device = "cpu") -> TeacherBundle:
    """Load a bundle through the production classes (the code path the full SD3 teacher uses)."""
    record = read_bundle_record(folder)
    cfg = ToyBootstrapConfig.from_dict(record["config"])
    path = str(Path(folder).resolve())
    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=path, dtype="float32"), device)
    vae = VAEAdapter.from_pretrained(VAEConfig(path=path, subfolder="vae"), device)
    spec = TextEncoderSpec(name="clip", kind="clip", path=path, subfolder="text_encoder",
                           max_length=cfg.text_max_length, hidden_layer=-1, dropout=cfg.cfg_dropout)
    text = TextEncoderAdapter.from_pretrained(spec, device)
    return TeacherBundle(teacher=teacher, vae=vae, text=text, config=cfg, record=record)


@torch.no_grad()
def sample_teacher(bundle: TeacherBundle, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                   guidance: float | None = None, batch: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 samples, one per (prompt, seed); image i depends only on (prompt_i, seed_i)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_teacher: {len(prompts)} prompts but {len(seeds)} seeds")
    cfg = bundle.config
    steps, guidance = steps or cfg.eval_steps, cfg.eval_guidance if guidance is None else guidance
    device = next(bundle.teacher.parameters()).device
    shape = (bundle.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    timesteps = make_timesteps(steps, 1.0, device)

    def velocity(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return bundle.teacher(x, t, context, pooled).velocity  # (B, C, h, w)

    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        noise = seeded_noise(seeds[start:start + batch], shape, device)  # (B, C, h, w)
        cond, uncond = bundle.condition(chunk), bundle.condition([""] * len(chunk))
        latents = sample_euler(velocity, noise, timesteps, cond=cond, uncond=uncond, guidance=guidance)
        out.append(latents_to_images(bundle.vae.decode(latents)))  # (B, H, W, 3)
    return np.concatenate(out) if out else np.zeros((0, cfg.resolution, cfg.resolution, 3), np.uint8)


def autoencoder_roundtrip(bundle: TeacherBundle, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, H, W, 3) uint8 images through the bundle's AE (the latent-model ceiling row)."""
    device = next(bundle.vae.parameters()).device
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        out.append(latents_to_images(bundle.vae.decode(bundle.vae.encode(x))))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- diagnostics

def _image_checks(image: np.ndarray, metadata: Mapping[str, Any], world: ShapesWorldConfig) -> dict[str, Any]:
    """Per image: named colours present, requested shapes present, confident object count vs expected."""
    found = [o for o in parse_scene(image, world) if o.confidence > DETECTION_THRESHOLD]
    include = metadata.get("include", [])
    colours = {r["color"] for r in include if r.get("color")}
    expected = sum(int(r["count"]) for r in include)
    return {"names_colour": bool(colours), "colours_present": colours <= {o.colour for o in found},
            "shapes_present": {r["class"] for r in include} <= {o.shape for o in found},
            "count_match": len(found) == expected, "objects": len(found), "expected": expected}


def teacher_diagnostics(images: np.ndarray | Sequence[np.ndarray], metadata: Sequence[Mapping[str, Any]],
                        world_cfg: ShapesWorldConfig, splits: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Scene-parser diagnostics of generated images (one GenEval metadata record per image).

    colour_present: images whose prompt names colours that show every named colour (TOY_CALIBRATION:
    66% after 12 CPU minutes); shaped_fraction: images showing every requested shape class;
    object_count_match: images with exactly the requested number of confident objects. With the
    evaluation module available, also toy-GenEval (official rules, its exact-object-count diagnostic,
    and the overall score per split of `splits`).
    """
    if len(images) != len(metadata):
        raise ValueError(f"teacher_diagnostics: {len(images)} images but {len(metadata)} metadata records")
    checks = [_image_checks(np.asarray(im), md, world_cfg) for im, md in zip(images, metadata)]
    coloured = [c for c in checks if c["names_colour"]]
    out: dict[str, Any] = {
        "images": len(checks),
        "colour_present": float(np.mean([c["colours_present"] for c in coloured])) if coloured else float("nan"),
        "shaped_fraction": float(np.mean([c["shapes_present"] for c in checks])),
        "object_count_match": float(np.mean([c["count_match"] for c in checks])),
        "objects_per_image": float(np.mean([c["objects"] for c in checks])),
        "expected_per_image": float(np.mean([c["expected"] for c in checks])),
    }
    try:
        from snapgen_model.evaluation.toy_reference import score_toy_images
    except ImportError:  # the evaluation suite is optional here
        return out
    scored = score_toy_images([np.asarray(im)[None] for im in images], list(metadata), world_cfg, splits,
                              with_dpg=False)["geneval"]
    out["geneval"] = {"overall": scored["overall"], "tasks": scored["tasks"],
                      "exact_count": scored["exact_count"]["overall"], "splits": scored.get("splits", {})}
    return out


def reference_rows(bundle: TeacherBundle, prompts: Sequence[Mapping[str, Any]], images_per_prompt: int = 1,
                   rows: tuple[str, ...] = ("clean", "floor", "noise")) -> dict[str, dict[str, float]]:
    """toy-GenEval of the reference rows (clean renders, AE reconstructions, prompt-blind floor, noise)
    on the same prompts, beside the teacher (DESIGN.md stage 5; TOY_CALIBRATION "Scorer sanity rows")."""
    try:
        from snapgen_model.evaluation.toy_reference import ToyReferenceConfig, score_reference_rows
    except ImportError:
        return {}
    world = bundle.config.world()
    cfg = ToyReferenceConfig(images_per_prompt=images_per_prompt, rows=rows, dpg=False, seed=bundle.config.eval_seed)
    scored = score_reference_rows(prompts, world, cfg, decode=lambda ims: autoencoder_roundtrip(bundle, ims))
    return {row: {"overall": s["geneval"]["overall"], "exact_count": s["geneval"]["exact_count"]["overall"],
                  "tasks": s["geneval"]["tasks"], **{f"split_{k}": v for k, v in s["geneval"].get("splits", {}).items()}}
            for row, s in scored.items()}


# ----------------------------------------------------------------------------- evaluation of a bundle

def evaluation_prompts(cfg: ToyBootstrapConfig) -> list[dict[str, Any]]:
    """GenEval records to sample: up to `eval_prompts_per_task` seen prompts per task and half as many
    held-out ones, a seeded subset in the world's order (fixed by the config)."""
    world, rng = cfg.world(), np.random.default_rng(cfg.eval_seed)
    splits = [("train", cfg.eval_prompts_per_task)]
    if world.held_out_pairs or world.held_out_prompts:
        splits.append(("heldout", max(1, cfg.eval_prompts_per_task // 2)))
    chosen: list[dict[str, Any]] = []
    for split, per_task in splits:
        records = enumerate_prompts(world, split)
        for tag in dict.fromkeys(r["tag"] for r in records):
            idx = [i for i, r in enumerate(records) if r["tag"] == tag]
            keep = idx if len(idx) <= per_task else sorted(rng.choice(idx, per_task, replace=False).tolist())
            chosen += [records[i] for i in keep]
    return chosen


def prompt_split_names(cfg: ToyBootstrapConfig) -> dict[str, str]:
    """prompt -> "seen" / "heldout" for every template prompt of the world."""
    held = {r["prompt"] for r in enumerate_prompts(cfg.world(), "heldout")} if cfg.held_out_pairs else set()
    return {r["prompt"]: "heldout" if r["prompt"] in held else "seen" for r in enumerate_prompts(cfg.world(), "all")}


def evaluate_bundle(bundle: TeacherBundle, reference: bool = True) -> dict[str, Any]:
    """Sample the evaluation prompts (fixed seeds), score them, and (`reference`) the reference rows beside them."""
    cfg = bundle.config
    prompts = evaluation_prompts(cfg)
    per = cfg.eval_images_per_prompt
    metadata = [p for p in prompts for _ in range(per)]
    seeds = [cfg.eval_seed + 1000 * i + j for i in range(len(prompts)) for j in range(per)]
    images = sample_teacher(bundle, [m["prompt"] for m in metadata], seeds)
    diagnostics = teacher_diagnostics(images, metadata, cfg.world(), prompt_split_names(cfg))
    return {"prompts": len(prompts), "images": len(images), "steps": cfg.eval_steps, "guidance": cfg.eval_guidance,
            "teacher": diagnostics} | ({"reference": reference_rows(bundle, prompts, per)} if reference else {})


def sample_grid(bundle: TeacherBundle, per_task: int = 2, scale: int = 3) -> tuple[np.ndarray, list[str], list[int]]:
    """Teacher samples for fixed prompts (the first `per_task` evaluation prompts of each task) and fixed
    seeds, upscaled `scale` x for viewing: ((N, H*s, W*s, 3) uint8, prompts, seeds)."""
    prompts: list[str] = []
    taken: dict[str, int] = {}
    for record in evaluation_prompts(bundle.config):
        if taken.get(record["tag"], 0) < per_task:
            prompts.append(record["prompt"])
            taken[record["tag"]] = taken.get(record["tag"], 0) + 1
    seeds = [bundle.config.eval_seed + i for i in range(len(prompts))]
    images = sample_teacher(bundle, prompts, seeds)
    return images.repeat(scale, axis=1).repeat(scale, axis=2), prompts, seeds
