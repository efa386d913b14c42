"""`snapgen sample --model ... --prompt ...`: a model reference -> the generator that model is evaluated with.

A model is a student folder (student.json + unet_ema + conditioner: the student's own conditioner, the
teacher bundle's text encoders and VAE decoder), a checkpoint inside one, a registered version
(`models:/NAME@ALIAS`, `models:/NAME/N`: the folder its `snapgen.checkpoint_uri` tag names, else its
pyfunc artifacts), a toy teacher bundle, or a bare UNet checkpoint (its sibling decoder.safetensors; no
text path, so it cannot take prompts). Orchestration only: the generators are snapgen_model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYFUNC_STUDENT, PYFUNC_BUNDLE = "artifacts/student", "artifacts/bundle"


@dataclass
class ModelGenerator:
    """A generator (prompts, seeds -> uint8 images) and what it is made of, for the summary."""

    generator: Any
    kind: str          # student | teacher | checkpoint
    source: str        # the local folder or file it was loaded from
    decoder: str       # which decoder turns its latents into pixels
    takes_prompts: bool


def _local(uri: str) -> Path:
    from tasks.cache import local_folder

    if uri.startswith("s3://") and uri.endswith(".safetensors"):
        from tasks.evaluate import _local_checkpoint

        return Path(_local_checkpoint(uri))
    return local_folder(uri)


def resolve_source(ref: str) -> Path:
    """A local file or folder for `ref` (a path, a file:// or s3:// URI, or a models:/ registry ref)."""
    if ref.startswith("models:/"):
        from tasks.settings import get_settings
        from tasks.tracking import resolve_model_version

        ref = resolve_model_version(get_settings(), ref)["source"]
    path = _local(ref) if "://" in ref else Path(ref).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {ref}: no such file or folder")
    return path.resolve()


def model_generator(ref: str, *, steps: int | None = None, guidance: float | None = None,
                    device: str = "cpu") -> ModelGenerator:
    """The generator of the model `ref` names, loaded the way the evaluation stage loads it."""
    from snapgen_model.evaluation.bundle_generators import (
        BundleStudentGenerator,
        BundleTeacherGenerator,
        is_bundle_folder,
        is_student_folder,
        is_toy_teacher_bundle,
        read_student_card,
    )
    from snapgen_model.evaluation.runner import CheckpointGenerator

    path = resolve_source(ref)
    if path.is_file() and path.suffix == ".safetensors" and is_student_folder(path.parent):
        path = path.parent  # a student's checkpoint: the student, with its conditioner and text path
    if path.is_dir() and is_student_folder(path / PYFUNC_STUDENT):  # a registered pyfunc's artifacts
        student, bundle = path / PYFUNC_STUDENT, path / PYFUNC_BUNDLE
        gen = BundleStudentGenerator(student, bundle, steps=steps, guidance=guidance, device=device)
        return ModelGenerator(gen, "student", str(student), f"teacher bundle VAE ({bundle / 'vae'})", True)
    if path.is_dir() and is_student_folder(path):
        bundle = _local(read_student_card(path)["bundle_uri"])
        if not is_bundle_folder(bundle):
            raise FileNotFoundError(f"--model {ref}: its teacher bundle {bundle} (student.json) is not a finished "
                                    "bundle (bundle.json missing)")
        gen = BundleStudentGenerator(path, bundle, steps=steps, guidance=guidance, device=device)
        return ModelGenerator(gen, "student", str(path), f"teacher bundle VAE ({bundle / 'vae'})", True)
    if path.is_dir() and is_toy_teacher_bundle(path):
        gen = BundleTeacherGenerator(path, steps=steps, guidance=guidance, device=device)
        return ModelGenerator(gen, "teacher", str(path), f"teacher bundle VAE ({path / 'vae'})", True)
    if path.is_file() and path.suffix == ".safetensors":
        decoder = path.parent / "decoder.safetensors"
        gen = CheckpointGenerator(path, decoder_path=decoder if decoder.is_file() else None, steps=steps,
                                  guidance=guidance, device=device)
        return ModelGenerator(gen, "checkpoint", str(path), str(decoder) if decoder.is_file() else
                              "a fresh TinyDecoder (no decoder.safetensors beside the checkpoint)", False)
    raise ValueError(f"--model {ref}: {path} is neither a student folder (student.json), a registered snapgen "
                     "pyfunc, a toy teacher bundle (bundle.json) nor a UNet .safetensors checkpoint")
