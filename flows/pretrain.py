"""pretrain_flow: teacher cache -> KD-pretrained student (stage 3)."""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from snapgen_model.training.pretrain import PretrainConfig
from tasks.pretrain import fetch_cache, train_student


class PretrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    cache_uri: str = Field(description="teacher cache (cache_teacher_flow output)")
    preset: str = "toy"
    overrides: list[str] = Field(default_factory=list, description="preset overrides")
    pretrain: list[str] | PretrainConfig = Field(
        default_factory=list, description="PretrainConfig overrides, e.g. steps=300, or the typed config itself "
                                          "(the pipeline passes the one it validated)")
    resume: str = Field("latest", description="latest | none | a state folder")
    _config: PretrainConfig | None = PrivateAttr(None)

    def config(self) -> PretrainConfig:
        """The stage's typed config: `pretrain` as given, or its overrides parsed and validated once, here at
        the flow boundary (a bad override raises ConfigError naming it); the tasks receive this object."""
        if self._config is None:
            self._config = (self.pretrain if isinstance(self.pretrain, PretrainConfig)
                            else PretrainConfig().with_overrides(self.pretrain))
        return self._config


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: PretrainParams) -> dict[str, Any]:
    # the in-memory data path needs a local copy; the streaming one reads the shards where they are
    cfg = params.config()
    cache_dir, manifest = fetch_cache(params.cache_uri, download=cfg.data == "memory")
    result = train_student(cache_dir, manifest, params.preset, params.overrides, cfg, params.resume)
    create_markdown_artifact(f"### Pretraining `{result['key']}`\n\nstep {result['step']}, checkpoints at "
                             f"{result['checkpoints']}, MLflow run {result['mlflow_run_id']}",
                             key="pretrain", description="student pretraining")
    return result
