"""The student folder: the one module that knows its file names, its card and how its parts are saved.

Pretraining and step distillation write a student folder; evaluation, export, the registry and
`snapgen sample` read it::

    <folder>/unet_ema.safetensors         the EMA UNet; its preset (sampler settings included) in the metadata
    <folder>/conditioner.safetensors      the EMA text conditioner (one EMA over both)
    <folder>/unet_raw.safetensors         the last step's UNet (raw weights, beside the EMA pair)
    <folder>/conditioner_raw.safetensors  the last step's conditioner
    <folder>/student.json                 the card: the teacher bundle and text encoders it was trained on,
                                          and its lineage

Every weight file goes through the checkpoint registry (`storage.checkpoint`: component kind and
config in the safetensors metadata, rebuilt by `load_model`). The card is written after the weights,
so a folder with a card is complete. A class-conditional student has no conditioner files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from snapgen_model.configs import SnapGenConfig
from snapgen_model.distill.text import TextConditioner, TextConditionerConfig
from snapgen_model.storage.checkpoint import load_model, read_preset, register, save_model

UNET = "unet_ema.safetensors"
CONDITIONER = "conditioner.safetensors"
UNET_RAW = "unet_raw.safetensors"
CONDITIONER_RAW = "conditioner_raw.safetensors"
CARD = "student.json"
CARD_KIND = "snapgen-student"
WEIGHTS = (UNET, CONDITIONER)  # what a text-conditioned student needs to generate
CARD_REQUIRED = ("bundle_uri", "encoders")  # what evaluation and export read from the card

register("TextConditioner", TextConditionerConfig, TextConditioner)


def save_conditioner(conditioner: TextConditioner, path) -> str:
    """A TextConditioner through the checkpoint registry (encoder widths in the metadata)."""
    return str(save_model(conditioner, path))


def load_conditioner(path, device: str = "cpu") -> TextConditioner:
    """The TextConditioner saved at `path` (by `save_conditioner` or `save_student`)."""
    return load_model(path, expected_kind="TextConditioner", device=device)


def save_student(folder, preset: SnapGenConfig, unet: nn.Module, conditioner: TextConditioner | None = None, *,
                 raw_unet: nn.Module | None = None, raw_conditioner: TextConditioner | None = None) -> dict[str, str]:
    """Write the student's weights into `folder` (the card comes after, `write_card`): the (EMA) UNet with
    `preset` in its metadata and its conditioner, and the raw pair beside them when given.
    Returns {"unet", "unet_raw", "conditioner", "conditioner_raw"} -> path, for what was written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"unet": str(save_model(unet, folder / UNET, preset=preset))}
    if raw_unet is not None:
        paths["unet_raw"] = str(save_model(raw_unet, folder / UNET_RAW, preset=preset))
    if conditioner is not None:
        paths["conditioner"] = save_conditioner(conditioner, folder / CONDITIONER)
    if raw_conditioner is not None:
        paths["conditioner_raw"] = save_conditioner(raw_conditioner, folder / CONDITIONER_RAW)
    return paths


def load_student(folder, device: str = "cpu") -> tuple[SnapGenConfig, nn.Module, TextConditioner]:
    """(preset, EMA UNet, EMA conditioner) of a student folder."""
    unet_path = Path(folder) / UNET
    preset = read_preset(unet_path)
    if preset is None:
        raise ValueError(f"{unet_path}: the student checkpoint carries no preset")
    return (preset, load_model(unet_path, expected_kind="SnapGenUNet", device=device),
            load_conditioner(Path(folder) / CONDITIONER, device))


def make_card(stage: str, key: str, run_id: str, cache_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The card of a student trained by `stage` on the cache `cache_manifest` describes."""
    return {"kind": CARD_KIND, "stage": stage, "key": key, "mlflow_run_id": run_id,
            "bundle_uri": cache_manifest.get("bundle_uri"), "bundle_id": cache_manifest.get("bundle_id"),
            "encoders": cache_manifest.get("encoders"), "dataset_hash": cache_manifest.get("dataset_hash"),
            "cache_key": cache_manifest.get("key")}


def write_card(folder, card: Mapping[str, Any]) -> Path:
    """`student.json` in a local folder (write it after the weights)."""
    path = Path(folder) / CARD
    path.write_text(json.dumps(dict(card), indent=2))
    return path


def read_card(folder) -> dict[str, Any]:
    """The card of a student folder, with the fields evaluation and export need checked."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a student folder ({CARD} missing; pretraining and step "
                                f"distillation write it beside {UNET})")
    card = json.loads(path.read_text())
    for key in CARD_REQUIRED:
        if not card.get(key):
            raise ValueError(f"{path}: field {key!r} is missing or empty")
    return card


def is_student_folder(folder) -> bool:
    """A complete text-conditioned student folder: its card and both EMA weight files."""
    folder = Path(folder)
    return folder.is_dir() and (folder / CARD).is_file() and all((folder / f).is_file() for f in WEIGHTS)
