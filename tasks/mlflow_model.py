"""The registered model as MLflow expects it: a pyfunc that turns prompts into images.

``mlflow.pyfunc.load_model("models:/snapgen@champion").predict(["a red circle left of a blue square"])``
returns a ``uint8`` array ``(N, H, W, 3)``: the student UNet, its text conditioner and the teacher
bundle's frozen text encoders and VAE decoder, sampled exactly as the evaluation stage samples them
(``BundleStudentGenerator``). Everything it needs travels with the version as artifacts:

    artifacts/student/   unet_ema.safetensors, conditioner.safetensors, student.json
    artifacts/bundle/    vae/, the text encoders' folders, bundle.json (no teacher transformer)
    artifacts/decoder/   tiny_decoder.safetensors, when the pipeline trained SnapGen's tiny decoder

Input: a list of prompts, one prompt, or a DataFrame with a ``prompt`` column. Params: ``seed`` (image i
uses seed + i; default 0), ``steps`` and ``guidance`` (default: the student's own sampler settings),
``decoder``: ``vae`` (the bundle VAE's decoder, what evaluation scores; default) or ``tiny`` (the
phone's tiny decoder, when the version carries one). Same prompt and seed, same image.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from snapgen_model.artifacts import student as student_files

__all__ = ["SnapgenPyfunc", "package_student", "save_pyfunc", "log_pyfunc", "prompt_inputs"]

STUDENT_ARTIFACT, BUNDLE_ARTIFACT, DECODER_ARTIFACT = "student", "bundle", "decoder"
TINY_DECODER_FILE = "tiny_decoder.safetensors"
DECODERS = ("vae", "tiny")
_PARAM_DEFAULTS = {"seed": 0, "steps": 0, "guidance": -1.0, "decoder": "vae"}  # 0 / -1: the student's own setting


def prompt_inputs(model_input: Any, seed: int = 0) -> tuple[list[str], list[int]]:
    """(prompts, seeds) from a prompt, a list of prompts, a dict or a DataFrame (`prompt`, optional `seed`)."""
    seeds: list[int] | None = None
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        columns = list(model_input.columns)
        if "prompt" not in columns and len(columns) != 1:
            raise ValueError(f"snapgen pyfunc: the input DataFrame needs a 'prompt' column (got {columns})")
        prompts = [str(p) for p in model_input["prompt" if "prompt" in columns else columns[0]].tolist()]
        if "seed" in model_input.columns and not model_input["seed"].isna().all():
            seeds = [int(s) for s in model_input["seed"].tolist()]
    elif isinstance(model_input, Mapping):
        raw = model_input.get("prompt")
        prompts = [raw] if isinstance(raw, str) else [str(p) for p in (raw or [])]
        if model_input.get("seed") is not None:
            raw_seeds = model_input["seed"]
            seeds = [int(raw_seeds)] if isinstance(raw_seeds, (int, np.integer)) else [int(s) for s in raw_seeds]
    elif isinstance(model_input, str):
        prompts = [model_input]
    elif isinstance(model_input, Sequence) or isinstance(model_input, np.ndarray):
        prompts = [str(p) for p in np.asarray(model_input, dtype=object).reshape(-1)]
    else:
        raise ValueError(f"snapgen pyfunc: expected prompts (str, list of str or a DataFrame with a 'prompt' column), "
                         f"got {type(model_input).__name__}")
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("snapgen pyfunc: every prompt must be a non-empty string")
    if seeds is None:
        seeds = [int(seed) + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"snapgen pyfunc: {len(prompts)} prompts but {len(seeds)} seeds")
    return prompts, seeds


# The model is saved "from code" (this file's entry point, not a pickle): loading needs the snapgen package.
_MODEL_CODE = "import mlflow\nfrom tasks.mlflow_model import SnapgenPyfunc\n\nmlflow.models.set_model(SnapgenPyfunc())\n"


class SnapgenPyfunc(mlflow.pyfunc.PythonModel):
    """Prompts -> images with the student, its conditioner and the bundle's text encoders and VAE decoder."""

    # No type-hint schema (MLflow would ask for one on every import): the explicit signature says what goes in.
    _skip_type_hint_validation = True
    _generators: dict[tuple[int | None, float | None, str], Any]

    def load_context(self, context):  # no type hints: MLflow would read them as an input schema
        import torch

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._student = context.artifacts[STUDENT_ARTIFACT]
        self._bundle = context.artifacts[BUNDLE_ARTIFACT]
        tiny = context.artifacts.get(DECODER_ARTIFACT)
        self._tiny = str(Path(tiny) / TINY_DECODER_FILE) if tiny else None
        self._generators = {}
        self._generator(None, None, "vae")  # load now: a broken artifact fails at load_model, not at predict

    def _generator(self, steps: int | None, guidance: float | None, decoder: str) -> Any:
        from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator

        if decoder not in DECODERS:
            raise ValueError(f"snapgen pyfunc: params decoder={decoder!r}; choose one of {list(DECODERS)}")
        if decoder == "tiny" and self._tiny is None:
            raise ValueError("snapgen pyfunc: params decoder='tiny', but this version carries no tiny decoder (the "
                             "pipeline ran with decoder.enabled=false); use decoder='vae'")
        key = (steps, guidance, decoder)
        if key not in self._generators:
            self._generators[key] = BundleStudentGenerator(self._student, self._bundle, steps=steps,
                                                           guidance=guidance, device=self._device,
                                                           decoder_path=self._tiny if decoder == "tiny" else None)
        return self._generators[key]

    def predict(self, context, model_input, params=None):
        params = dict(_PARAM_DEFAULTS) | {k: v for k, v in (params or {}).items() if v is not None}
        prompts, seeds = prompt_inputs(model_input, int(params["seed"]))
        steps = int(params["steps"]) or None
        guidance = float(params["guidance"]) if float(params["guidance"]) >= 0 else None
        generator = self._generator(steps, guidance, str(params["decoder"]))
        return np.asarray(generator(prompts, seeds), dtype=np.uint8)


def package_student(student_folder: str | Path, bundle_folder: str | Path, dst: str | Path,
                    decoder: str | Path | None = None) -> dict[str, str]:
    """Copy what the pyfunc needs into `dst`: the student's weights and card, the bundle's VAE and
    text-encoder folders (not its teacher transformer) and, if given, the trained tiny decoder checkpoint.
    Returns the artifacts mapping."""
    student, bundle, dst = Path(student_folder), Path(bundle_folder), Path(dst)
    card = student_files.read_card(student)
    missing = [f for f in student_files.WEIGHTS if not (student / f).is_file()]
    if missing:
        raise FileNotFoundError(f"student folder {student}: {missing} missing")
    (dst / STUDENT_ARTIFACT).mkdir(parents=True, exist_ok=True)
    for name in (*student_files.WEIGHTS, student_files.CARD):
        shutil.copy2(student / name, dst / STUDENT_ARTIFACT / name)
    folders = {"vae"} | {sub for spec in card["encoders"]
                         for sub in (spec.get("subfolder"), spec.get("tokenizer_subfolder")) if sub}
    for sub in sorted(folders):
        if not (bundle / sub).is_dir():
            raise FileNotFoundError(f"teacher bundle {bundle}: folder {sub!r} (needed to sample the student) is missing")
        shutil.copytree(bundle / sub, dst / BUNDLE_ARTIFACT / sub, dirs_exist_ok=True)
    from snapgen_model.artifacts.teacher_bundle import BUNDLE_FILE

    if (bundle / BUNDLE_FILE).is_file():
        shutil.copy2(bundle / BUNDLE_FILE, dst / BUNDLE_ARTIFACT / BUNDLE_FILE)
    artifacts = {STUDENT_ARTIFACT: str(dst / STUDENT_ARTIFACT), BUNDLE_ARTIFACT: str(dst / BUNDLE_ARTIFACT)}
    if decoder is not None:
        if not Path(decoder).is_file():
            raise FileNotFoundError(f"tiny decoder {decoder}: no such file")
        (dst / DECODER_ARTIFACT).mkdir(parents=True, exist_ok=True)
        shutil.copy2(decoder, dst / DECODER_ARTIFACT / TINY_DECODER_FILE)
        artifacts[DECODER_ARTIFACT] = str(dst / DECODER_ARTIFACT)
    return artifacts


def _signature(image_size: int | None) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    side = int(image_size) if image_size else -1
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, side, side, 3))]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("steps", "long", 0),
                            ParamSpec("guidance", "double", -1.0), ParamSpec("decoder", "string", "vae")]))


def save_pyfunc(student_folder: str | Path, bundle_folder: str | Path, path: str | Path,
                decoder: str | Path | None = None) -> Path:
    """Write the pyfunc model folder (MLmodel, python_model.pkl, artifacts/) at `path` (must not exist);
    `decoder`: a trained TinyDecoder checkpoint to carry as well (params decoder='tiny')."""
    from snapgen_model.storage.checkpoint import read_preset

    preset = read_preset(Path(student_folder) / student_files.UNET)
    card = student_files.read_card(student_folder)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about type hints and input examples
        artifacts = package_student(student_folder, bundle_folder, tmp, decoder=decoder)
        code = Path(tmp) / "snapgen_pyfunc.py"
        code.write_text(_MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(code), artifacts=artifacts,
            signature=_signature(preset.image_size if preset else None),
            metadata={"snapgen.stage": str(card.get("stage")), "snapgen.bundle_id": str(card.get("bundle_id")),
                      "snapgen.preset": preset.name if preset else "unknown",
                      "snapgen.encoders": json.dumps([e.get("name") for e in card["encoders"]]),
                      "snapgen.decoders": json.dumps(["vae", "tiny"] if decoder is not None else ["vae"])})
    return Path(path)


def log_pyfunc(run: Any, student_folder: str | Path, bundle_folder: str | Path, artifact_path: str = "model",
               decoder: str | Path | None = None) -> str:
    """Save the pyfunc and upload it into `run`'s artifacts under `artifact_path`; returns `runs:/<id>/<path>`,
    the source a registered version points at."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pyfunc(student_folder, bundle_folder, Path(tmp) / "pyfunc", decoder=decoder)
        run.log_artifact(str(folder), artifact_path)
    return f"runs:/{run.run_id}/{artifact_path}"
