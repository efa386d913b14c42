"""pretrain_flow: teacher cache -> KD-pretrained student (stage 3)."""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from tasks.pretrain import data_mode, fetch_cache, train_student


class PretrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    cache_uri: str = Field(description="teacher cache (cache_teacher_flow output)")
    preset: str = "toy"
    overrides: list[str] = Field(default_factory=list, description="preset overrides")
    pretrain: list[str] = Field(default_factory=list, description="PretrainConfig overrides, e.g. steps=300")
    resume: str = Field("latest", description="latest | none | a state folder")


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: PretrainParams) -> dict[str, Any]:
    # the in-memory data path needs a local copy; the streaming one reads the shards where they are
    cache_dir, manifest = fetch_cache(params.cache_uri, download=data_mode(params.pretrain) == "memory")
    result = train_student(cache_dir, manifest, params.preset, params.overrides, params.pretrain, params.resume)
    create_markdown_artifact(f"### Pretraining `{result['key']}`\n\nstep {result['step']}, checkpoints at "
                             f"{result['checkpoints']}, MLflow run {result['mlflow_run_id']}",
                             key="pretrain", description="student pretraining")
    return result
