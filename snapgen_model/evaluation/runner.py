"""Generation bookkeeping for evaluation (DESIGN.md stage 5): seeds, saved samples, reuse.

* Seeds: image j of prompt i gets `image_seed(base_seed, i, j)`, a hash of the three numbers.
  Prompts are generated in fixed groups of `batch_prompts` consecutive indices (one generator call
  per group; work chunks are whole groups), so an image depends on neither the number of workers
  nor how prompts are chunked into tasks.
* Samples are written in GenEval's layout under one folder per (model, sampler settings, seeds,
  prompt set); `manifest.json` (the generation key and the prompt count) is written last, so a
  complete folder is recognised and re-scoring never regenerates. An interrupted run resumes:
  prompts whose metadata and samples are all present are skipped.
* A folder is claimed by one generation key (`generation_key` file) before its first sample, so
  samples of two models or seed sets never mix.
* `CheckpointGenerator` turns a UNet checkpoint (+ tiny decoder, + the text conditioner it was
  trained with) into an `ImageGenerator`; any callable with the same signature and an `identity`
  works too. Its unconditional branch is the conditioner's null condition, the one training's
  condition dropout used (as `BundleStudentGenerator`), never an all-zero condition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from snapgen_model.keys import content_key
from snapgen_model.config_base import ConfigBase, check
from snapgen_model.configs import SnapGenConfig
from snapgen_model.evaluation import atomic
from snapgen_model.diffusion.generate import conditioner_null, generate, null_condition
from snapgen_model.evaluation.fid import file_sha256
from snapgen_model.evaluation.geneval import prompt_folder, sample_path, write_metadata, write_samples
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.storage.checkpoint import load_model, read_preset

MANIFEST = "manifest.json"
UNET_FILE, DECODER_FILE = "unet.safetensors", "decoder.safetensors"  # a bare UNet checkpoint folder (students: artifacts.student)


class ImageGenerator(Protocol):
    """prompts, seeds (one per image) -> (N, H, W, 3) uint8; `identity` names what images depend on."""

    identity: str

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True, kw_only=True)
class GenerationConfig(ConfigBase):
    """How many images per prompt, from which seeds, in what work units."""

    images_per_prompt: int = 4  # samples per prompt (GenEval and DPG-Bench use 4)
    base_seed: int = 0  # image j of prompt i uses image_seed(base_seed, i, j)
    batch_prompts: int = 8  # prompts per generator call; groups are fixed by index (part of the key)
    chunk_size: int = 16  # prompts per generation task, rounded up to whole batches (fan-out, retry)

    def __post_init__(self) -> None:
        check(1 <= self.images_per_prompt <= 9999, "GenerationConfig.images_per_prompt",
              f"must be in 1..9999, got {self.images_per_prompt}")
        check(self.base_seed >= 0, "GenerationConfig.base_seed", f"must be >= 0, got {self.base_seed}")
        check(self.chunk_size >= 1, "GenerationConfig.chunk_size", f"must be >= 1, got {self.chunk_size}")
        check(self.batch_prompts >= 1, "GenerationConfig.batch_prompts", f"must be >= 1, got {self.batch_prompts}")


def image_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of one image: a hash of (base seed, prompt index, image index), in [0, 2**31)."""
    digest = hashlib.sha256(f"snapgen-eval:{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31)


def prompt_seeds(cfg: GenerationConfig, prompt_index: int) -> list[int]:
    return [image_seed(cfg.base_seed, prompt_index, j) for j in range(cfg.images_per_prompt)]


def prompts_hash(prompts: Sequence[Mapping[str, Any]]) -> str:
    """Content hash of a prompt set (the metadata records, in order)."""
    return content_key([dict(p) for p in prompts])


def generation_key(identity: str, prompts: Sequence[Mapping[str, Any]], cfg: GenerationConfig) -> str:
    """What a sample folder's content depends on: generator identity, prompts, count and seeds."""
    return content_key({"generator": identity, "prompts": prompts_hash(prompts), "images_per_prompt": cfg.images_per_prompt,
                 "base_seed": cfg.base_seed, "batch_prompts": cfg.batch_prompts})


def chunks(count: int, cfg: GenerationConfig) -> list[list[int]]:
    """Prompt indices per work unit: whole generation groups, about `chunk_size` prompts each."""
    step = -(-cfg.chunk_size // cfg.batch_prompts) * cfg.batch_prompts
    return [list(range(s, min(s + step, count))) for s in range(0, count, step)]


def prompt_groups(indices: Iterable[int], cfg: GenerationConfig) -> list[list[int]]:
    """`indices` split into their generation groups (index // batch_prompts), in order."""
    groups: dict[int, list[int]] = {}
    for i in sorted(set(indices)):
        groups.setdefault(i // cfg.batch_prompts, []).append(i)
    return list(groups.values())


# ----------------------------------------------------------------------------- folder state

def prompt_complete(folder: str | os.PathLike, index: int, metadata: Mapping[str, Any], images: int) -> bool:
    """Metadata matches and every sample PNG exists."""
    meta = prompt_folder(folder, index) / "metadata.jsonl"
    if not meta.is_file() or json.loads(meta.read_text()) != dict(metadata):
        return False
    return all(sample_path(folder, index, j).is_file() for j in range(images))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def folder_complete(folder: str | os.PathLike, prompts: Sequence[Mapping[str, Any]], cfg: GenerationConfig,
                    key: str | None = None) -> bool:
    """The manifest (with `key`, when given) exists and every prompt is complete."""
    manifest = read_manifest(folder)
    if manifest is None or (key is not None and manifest.get("generation_key") != key):
        return False
    return all(prompt_complete(folder, i, p, cfg.images_per_prompt) for i, p in enumerate(prompts))


def missing_prompts(folder: str | os.PathLike, prompts: Sequence[Mapping[str, Any]],
                    cfg: GenerationConfig) -> list[int]:
    return [i for i, p in enumerate(prompts) if not prompt_complete(folder, i, p, cfg.images_per_prompt)]


def write_manifest(folder: str | os.PathLike, key: str, prompts: Sequence[Mapping[str, Any]],
                   cfg: GenerationConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write `manifest.json` last, atomically: the folder is complete."""
    manifest = {"generation_key": key, "prompts": len(prompts), "prompts_hash": prompts_hash(prompts),
                "generation": cfg.to_dict(), **dict(extra or {})}
    atomic.write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def claim_folder(folder: str | os.PathLike, key: str) -> None:
    """Mark `folder` as holding the samples of generation `key` (before the first sample is written);
    refuse a folder claimed by another generation, so samples of two models never mix."""
    marker = Path(folder) / "generation_key"
    if marker.is_file() and marker.read_text().strip() != key:
        raise ValueError(f"{folder} holds samples of another generation (key {marker.read_text().strip()[:12]}, "
                         f"not {key[:12]}); use a new folder")
    atomic.write_text(marker, key)


# ----------------------------------------------------------------------------- generation

def generate_chunk(generator: ImageGenerator, folder: str | os.PathLike, prompts: Sequence[Mapping[str, Any]],
                   indices: Iterable[int], cfg: GenerationConfig) -> dict[str, int]:
    """Generate and save the prompts `indices` (whole groups); complete groups are skipped, and an
    incomplete group is redone whole, so its batch is always the same."""
    done = skipped = 0
    n = cfg.images_per_prompt
    for group in prompt_groups(indices, cfg):
        full = list(range(group[0] // cfg.batch_prompts * cfg.batch_prompts,
                          min((group[0] // cfg.batch_prompts + 1) * cfg.batch_prompts, len(prompts))))
        if all(prompt_complete(folder, i, prompts[i], n) for i in full):
            skipped += len(full)
            continue
        texts = [str(prompts[i]["prompt"]) for i in full for _ in range(n)]
        images = generator(texts, [s for i in full for s in prompt_seeds(cfg, i)])
        for k, i in enumerate(full):
            write_samples(folder, i, images[k * n:(k + 1) * n])
            write_metadata(folder, i, prompts[i])
        done += len(full)
    return {"generated": done, "skipped": skipped}


def ensure_generated(generator: ImageGenerator | None, folder: str | os.PathLike,
                     prompts: Sequence[Mapping[str, Any]], cfg: GenerationConfig, *, reuse_images: bool = False,
                     run_chunks: Callable[[list[list[int]]], Any] | None = None) -> dict[str, Any]:
    """Make `folder` hold every prompt's samples; reuse it when complete (always with reuse_images).

    `run_chunks(list of index lists)` runs the work units (a Prefect fan-out); default: in order.
    Returns {"reused": bool, "key": ..., "folder": ...}.
    """
    folder = Path(folder)
    if reuse_images or generator is None:
        missing = missing_prompts(folder, prompts, cfg)
        if missing:
            raise FileNotFoundError(f"--reuse-images: {len(missing)} of {len(prompts)} prompts have no complete "
                                    f"samples in {folder} (first: {missing[:5]}); generate them first")
        return {"reused": True, "key": (read_manifest(folder) or {}).get("generation_key"), "folder": str(folder)}
    key = generation_key(generator.identity, prompts, cfg)
    claim_folder(folder, key)
    if folder_complete(folder, prompts, cfg, key):
        return {"reused": True, "key": key, "folder": str(folder)}
    units = chunks(len(prompts), cfg)
    if run_chunks is None:
        for unit in units:
            generate_chunk(generator, folder, prompts, unit, cfg)
    else:
        run_chunks(units)
    missing = missing_prompts(folder, prompts, cfg)
    if missing:
        raise RuntimeError(f"generation left {len(missing)} prompts incomplete in {folder} (first: {missing[:5]})")
    write_manifest(folder, key, prompts, cfg, {"generator": generator.identity})
    return {"reused": False, "key": key, "folder": str(folder)}


def load_prompt_images(folder: str | os.PathLike, index: int, images: int) -> np.ndarray:
    """(images, H, W, 3) uint8 samples of one prompt."""
    out = []
    for j in range(images):
        with Image.open(sample_path(folder, index, j)) as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


# ----------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(UNet file, decoder file or None) of a checkpoint file, or of a folder holding
    `unet.safetensors` [+ `decoder.safetensors`]; a file's sibling `decoder.safetensors` is used."""
    text = str(path)
    p = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
    unet = p / UNET_FILE if p.is_dir() else p
    if not unet.is_file():
        raise FileNotFoundError(f"model checkpoint {str(unet)!r} does not exist (pass a UNet .safetensors "
                                f"file or a folder with {UNET_FILE})")
    decoder = unet.parent / DECODER_FILE
    return unet, (decoder if decoder.is_file() and decoder != unet else None)


TextEncoder = Callable[[Sequence[str]], dict]


class CheckpointGenerator:
    """A UNet checkpoint (with its preset's sampler settings) and a tiny decoder as an ImageGenerator.

    `conditioner`: the student's `TextConditioner` (a module or a `conditioner.safetensors` path;
    default: the checkpoint's sibling `conditioner.safetensors` when there is one). With it,
    `encode_text` (prompts -> per-encoder `Encoded` outputs) is turned into the condition by the
    conditioner, and the unconditional branch is the conditioner's null (every encoder dropped, as
    in training). Without `encode_text` the UNet gets the null condition (the conditioner's, else
    all zeros): the images are then prompt-blind, and `conditioning` says so. Without a conditioner,
    `encode_text` must return the condition dict itself and guidance must be off (there is no
    training null to guide against).
    """

    def __init__(self, unet_path: str | os.PathLike, *, decoder_path: str | os.PathLike | None = None,
                 encode_text: TextEncoder | None = None, text_identity: str = "", steps: int | None = None,
                 guidance: float | None = None, device: str = "cpu",
                 conditioner: torch.nn.Module | str | os.PathLike | None = None, kind: str | None = None) -> None:
        preset = read_preset(unet_path)
        if preset is None:
            raise ValueError(f"{unet_path}: checkpoint has no preset metadata (save it with save_model(preset=...))")
        given: dict[str, Any] = {"steps": steps, "guidance": guidance, "kind": kind}
        sampler = dataclasses.replace(preset.sampler, **{k: v for k, v in given.items() if v is not None})
        self.preset: SnapGenConfig = dataclasses.replace(preset, sampler=sampler)
        self.unet = load_model(unet_path, expected_kind="SnapGenUNet", device=device).eval()
        self.decoder, decoder_id = self._decoder(decoder_path, device)
        self.conditioner, conditioner_id = self._conditioner(conditioner, unet_path, device)
        if encode_text and self.conditioner is None and sampler.guidance != 1.0:
            raise ValueError(f"{unet_path}: guidance {sampler.guidance} needs the student's text conditioner (its null "
                             f"condition is the unconditional branch training used); pass conditioner= or guidance=1")
        self.encode_text, self.device = encode_text, device
        self.conditioning = (f"text:{text_identity or 'callable'}" if encode_text else
                             "null (no text encoder)" + ("; the conditioner's null" if self.conditioner else ""))
        key = {"unet": file_sha256(str(unet_path)), "decoder": decoder_id, "sampler": sampler.to_dict(),
               "conditioning": self.conditioning}
        self.identity = content_key(key | ({"conditioner": conditioner_id} if conditioner_id else {}))[:32]

    def _conditioner(self, conditioner, unet_path, device: str) -> tuple[torch.nn.Module | None, str | None]:
        if self.preset.unet.conditioning != "text":
            return None, None
        if isinstance(conditioner, torch.nn.Module):
            digest = hashlib.sha256()
            for name, tensor in sorted(conditioner.state_dict().items()):
                digest.update(name.encode() + tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return conditioner.to(device).eval(), digest.hexdigest()
        from snapgen_model.artifacts.student import CONDITIONER, load_conditioner

        path = Path(conditioner) if conditioner is not None else Path(unet_path).parent / CONDITIONER
        if conditioner is None and not path.is_file():
            return None, None

        return load_conditioner(path).to(device).eval(), file_sha256(str(path))

    def _decoder(self, path: str | os.PathLike | None, device: str) -> tuple[torch.nn.Module, str]:
        if path is not None:
            return load_model(path, expected_kind="TinyDecoder", device=device).eval(), file_sha256(str(path))
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.preset.seed)
            decoder = TinyDecoder(self.preset.decoder)
        return decoder.to(device).eval(), f"fresh-init:{self.preset.seed}"

    def null(self, batch: int, tokens: int | Mapping[str, int] = 8) -> dict[str, torch.Tensor]:
        """The unconditional condition: the conditioner's null (training's), else all zeros."""
        if self.conditioner is not None:
            return conditioner_null(self.conditioner, batch, tokens)
        return null_condition(self.preset, batch, device=self.device)

    @torch.no_grad()
    def conditions(self, prompts: Sequence[str]) -> tuple[dict, dict | None]:
        """(cond, uncond) of `prompts`, as training built them (uncond None when prompt-blind)."""
        if not self.encode_text:
            return self.null(len(prompts)), None
        encoded = self.encode_text(prompts)
        if self.conditioner is None:
            return encoded, None
        return self.conditioner(encoded), self.conditioner.null_condition(encoded)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        cond, uncond = self.conditions(prompts)
        return generate(self.unet, self.decoder, self.preset, seeds, cond=cond, uncond=uncond)

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset.name, "image_size": self.preset.image_size, "identity": self.identity,
                "sampler": self.preset.sampler.to_dict(), "conditioning": self.conditioning}
