"""train_decoder_flow: the tiny decoder learns the teacher VAE's latents (stage 2b)."""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from snapgen_model.training.decoder import DecoderTrainConfig
from tasks.decoder import log_decoder, train_decoder_task


class DecoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    cache_uri: str = Field(description="teacher cache folder (cache_teacher_flow output)")
    bundle_uri: str = Field(description="teacher bundle folder (its vae/ is the reference decoder)")
    preset: str = "toy"
    overrides: list[str] = Field(default_factory=list, description="preset overrides (decoder.*)")
    train_overrides: list[str] | DecoderTrainConfig = Field(
        default_factory=list, description="DecoderTrainConfig overrides, or the typed config itself (the pipeline "
                                          "passes the one it validated)")
    track: bool = True

    def config(self) -> DecoderTrainConfig:
        """The stage's typed config: `train_overrides` as given, or parsed and validated here, at the flow boundary."""
        if isinstance(self.train_overrides, DecoderTrainConfig):
            return self.train_overrides
        return DecoderTrainConfig().with_overrides(self.train_overrides)


@flow(name="train-decoder", log_prints=True)
def train_decoder_flow(params: DecoderParams) -> dict[str, Any]:
    result = train_decoder_task(params.cache_uri, params.bundle_uri, params.preset, params.overrides, params.config())
    r = result["report"]
    create_markdown_artifact(
        "### Tiny decoder\n\n| metric | tiny decoder | teacher VAE decoder |\n|---|---|---|\n"
        f"| params | {r['params']:,} | {r['vae_decoder_params']:,} |\n"
        f"| PSNR vs images (dB) | {r['psnr_vs_images']:.2f} | {r['vae_psnr_vs_images']:.2f} |\n"
        f"| latency, batch {r['batch']} (ms) | {r['latency_ms']:.1f} | {r['vae_latency_ms']:.1f} |\n\n"
        f"PSNR vs the VAE decoder {r['psnr_vs_vae_decoder']:.2f} dB, SSIM {r['ssim_vs_vae_decoder']:.3f}",
        key="tiny-decoder", description="tiny decoder against the teacher VAE decoder")
    if params.track and not result.get("cache_hit"):
        result["mlflow_run_id"] = log_decoder(result)
    return result
