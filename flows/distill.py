"""distill_steps_flow: pretrained student + teacher cache + teacher bundle -> few-step student (stage 4)."""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from snapgen_model.artifacts.student import WEIGHTS
from snapgen_model.training.distill_steps import StepDistillConfig
from tasks.distill import distill_student, fetch_folder
from tasks.pretrain import fetch_cache


class DistillParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    cache_uri: str = Field(description="teacher cache (cache_teacher_flow output)")
    student_uri: str = Field(description="pretrained student folder (unet_ema.safetensors + conditioner.safetensors)")
    bundle_uri: str = Field(description="teacher bundle folder (its frozen transformer is the discriminator backbone)")
    distill: list[str] | StepDistillConfig = Field(
        default_factory=list, description="StepDistillConfig overrides, e.g. sampler_steps=8, or the typed config "
                                          "itself (the pipeline passes the one it validated)")
    resume: str = Field("latest", description="latest | none | a state folder")
    _config: StepDistillConfig | None = PrivateAttr(None)

    def config(self) -> StepDistillConfig:
        """The stage's typed config: `distill` as given, or its overrides parsed and validated once, here at
        the flow boundary (a bad override raises ConfigError naming it); the task receives this object."""
        if self._config is None:
            self._config = (self.distill if isinstance(self.distill, StepDistillConfig)
                            else StepDistillConfig().with_overrides(self.distill))
        return self._config


@flow(name="distill-steps", log_prints=True)
def distill_steps_flow(params: DistillParams) -> dict[str, Any]:
    cfg = params.config()
    cache_dir, manifest = fetch_cache(params.cache_uri, download=cfg.data == "memory")
    student_dir = fetch_folder(params.student_uri, WEIGHTS)
    bundle_dir = fetch_folder(params.bundle_uri)
    result = distill_student(cache_dir, manifest, student_dir, bundle_dir, params.bundle_uri, cfg, params.resume)
    s, m = result["sampler"], result.get("metrics") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    create_markdown_artifact(f"### Step distillation `{result['key']}`\n\n{s['steps']}-step student ({s['kind']}, "
                             f"shift {s['shift']}, guidance {s['guidance']}) at step {result['step']}; student "
                             f"{result['student']['unet']}; MLflow run {result['mlflow_run_id']}\n\n"
                             f"teacher guidance {fmt(m.get('teacher_guidance'))}; weight change vs the pretrained "
                             f"student: raw {fmt(m.get('generator_rel_change'))}, EMA {fmt(m.get('ema_rel_change'))} "
                             f"(EMA decay {fmt(m.get('ema_decay'))}); discriminator accuracy real "
                             f"{fmt(m.get('d_acc_real'))}, fake {fmt(m.get('d_acc_fake'))}",
                             key="distill-steps", description="adversarial step distillation")
    return result
