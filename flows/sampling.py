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
PYFUNC_DECODER = "artifacts/decoder/tiny_decoder.safetensors"  # tasks.mlflow_model: DECODER_ARTIFACT / TINY_DECODER_FILE


@dataclass
class ModelGenerator:
    """A generator (prompts, seeds -> uint8 images) and what it is made of, for the summary."""

    generator: Any
    kind: str          # student | teacher | checkpoint
    source: str        # the local folder or file it was loaded from
    decoder: str       # which decoder turns its latents into pixels
    takes_prompts: bool


def local_path(uri: str) -> Path:
    """A local file or folder for a file:// or s3:// URI (s3 checkpoints and folders are downloaded once)."""
    from tasks.cache import local_folder

    if uri.startswith("s3://") and uri.endswith(".safetensors"):
        from tasks.evaluate import _local_checkpoint

        return Path(_local_checkpoint(uri))
    return local_folder(uri)


def resolve_source(ref: str) -> Path:
    """A local file or folder for `ref` (a path, a file:// or s3:// URI, or a models:/ registry ref)."""
    if ref.startswith("models:/"):
        from tasks.settings import get_settings
        from tasks.registry import resolve_model_version

        ref = resolve_model_version(get_settings(), ref)["source"]
    path = local_path(ref) if "://" in ref else Path(ref).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {ref}: no such file or folder")
    return path.resolve()


def model_generator(ref: str, *, steps: int | None = None, guidance: float | None = None,
                    device: str = "cpu", decoder: str | None = None) -> ModelGenerator:
    """The generator of the model `ref` names, loaded the way the evaluation stage loads it.

    `decoder`: None or "vae" for the decoder evaluation scores with (a student's: its bundle VAE), "tiny" for
    the tiny decoder a registered version carries, or a TinyDecoder checkpoint path or URI (the pipeline's
    train_decoder output) for a student or a bare checkpoint. A teacher always decodes with its own VAE."""
    from snapgen_model.artifacts.student import is_student_folder, read_card
    from snapgen_model.artifacts.teacher_bundle import is_bundle_folder, is_toy_teacher_bundle
    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator, BundleTeacherGenerator
    from snapgen_model.evaluation.runner import CheckpointGenerator, ImageGenerator

    gen: ImageGenerator
    path = resolve_source(ref)
    if path.is_file() and path.suffix == ".safetensors" and is_student_folder(path.parent):
        path = path.parent  # a student's checkpoint: the student, with its conditioner and text path
    packaged = path / PYFUNC_DECODER if path.is_dir() else None
    tiny = _tiny_decoder(decoder, packaged if packaged is not None and packaged.is_file() else None, ref)
    if path.is_dir() and is_student_folder(path / PYFUNC_STUDENT):  # a registered pyfunc's artifacts
        student, bundle = path / PYFUNC_STUDENT, path / PYFUNC_BUNDLE
        gen = BundleStudentGenerator(student, bundle, steps=steps, guidance=guidance, device=device,
                                     decoder_path=tiny)
        return ModelGenerator(gen, "student", str(student), _decoder_name(tiny, bundle), True)
    if path.is_dir() and is_student_folder(path):
        bundle = local_path(read_card(path)["bundle_uri"])
        if not is_bundle_folder(bundle):
            raise FileNotFoundError(f"--model {ref}: its teacher bundle {bundle} (student.json) is not a finished "
                                    "bundle (bundle.json missing)")
        gen = BundleStudentGenerator(path, bundle, steps=steps, guidance=guidance, device=device, decoder_path=tiny)
        return ModelGenerator(gen, "student", str(path), _decoder_name(tiny, bundle), True)
    if path.is_dir() and is_toy_teacher_bundle(path):
        if tiny is not None:
            raise ValueError(f"--decoder {decoder}: {ref} is a teacher bundle, which decodes with its own VAE; "
                             "the tiny decoder is for students")
        gen = BundleTeacherGenerator(path, steps=steps, guidance=guidance, device=device)
        return ModelGenerator(gen, "teacher", str(path), f"teacher bundle VAE ({path / 'vae'})", True)
    if path.is_file() and path.suffix == ".safetensors":
        sibling = path.parent / "decoder.safetensors"
        chosen = tiny or (sibling if sibling.is_file() else None)
        gen = CheckpointGenerator(path, decoder_path=chosen, steps=steps, guidance=guidance, device=device)
        return ModelGenerator(gen, "checkpoint", str(path), str(chosen) if chosen else
                              "a fresh TinyDecoder (no decoder.safetensors beside the checkpoint)", False)
    raise ValueError(f"--model {ref}: {path} is neither a student folder (student.json), a registered snapgen "
                     "pyfunc, a toy teacher bundle (bundle.json) nor a UNet .safetensors checkpoint")


def _tiny_decoder(choice: str | None, packaged: Path | None, ref: str) -> Path | None:
    """The TinyDecoder checkpoint `--decoder` names: None for the VAE, the version's own for "tiny"."""
    if choice in (None, "", "vae"):
        return None
    if choice == "tiny":
        if packaged is None:
            raise ValueError(f"--decoder tiny: {ref} carries no tiny decoder (only a registered version of a pipeline "
                             "that trained one does); pass the decoder checkpoint's path instead")
        return packaged
    path = local_path(choice) if "://" in choice else Path(choice).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--decoder {choice}: no such file (expected vae, tiny or a tiny decoder "
                                "checkpoint such as the pipeline's tiny_decoder.safetensors)")
    return path.resolve()


def _decoder_name(tiny: Path | None, bundle: Path) -> str:
    return f"tiny decoder ({tiny})" if tiny is not None else f"teacher bundle VAE ({bundle / 'vae'})"
