"""export_flow: a model ref -> ONNX / Core ML packages, parity-gated, beside the model in storage.

Orchestration only (DESIGN.md 6): resolve the ref, compare the destination's export key, run the
export task (the library does tensors, gates and the report), upload with the manifest last, log to
MLflow and publish the report as a Prefect artifact. Re-running on an unchanged checkpoint and
config is a cache hit; a parity failure fails the flow with the gate's message (and, when tracked,
leaves a run tagged `snapgen.export_parity=failed` holding the failing report).
"""
from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from snapgen_model.export import ExportConfig, ParityError
from snapgen_model.export.report import report_markdown
from tasks.export import (
    default_destination,
    export_checkpoint,
    log_export,
    read_export_manifest,
    read_export_report,
    resolve_model_ref,
    upload_export,
    work_dir,
)


class ExportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    model: str = Field(description="UNet checkpoint: a path, file:// or s3:// URI (models:/ refs need the registry)")
    formats: list[Literal["onnx", "coreml"]] = Field(default_factory=lambda: ["onnx"], description="export formats")
    parts: list[Literal["unet", "decoder", "text_encoder"]] = Field(
        default_factory=lambda: ["unet", "decoder", "text_encoder"],
        description="parts to export (a part without a module, e.g. no text encoder, is skipped and reported)")
    preset: str | None = Field(None, description="preset name (default: the preset stored with the checkpoint)")
    overrides: list[str] = Field(default_factory=list, description="preset overrides key=value")
    export_overrides: list[str] | ExportConfig = Field(
        default_factory=list, description="ExportConfig overrides key=value, or the typed config itself (the pipeline "
                                          "passes the one it validated)")
    palettize: int | None = Field(None, description="Core ML palettization bits (4, 6 or 8)")
    decoder: str | None = Field(None, description="tiny decoder checkpoint (default: a seeded fresh-init decoder)")
    text_encoder: str | None = Field(None, description="CLIPTextModelWithProjection folder (save_pretrained)")
    out: str | None = Field(None, description="destination URI (default: <model folder>/export)")
    force: bool = Field(False, description="export again even if the destination holds this export")
    track: bool = Field(True, description="log the report and files to MLflow")
    log_files: bool = Field(True, description="also upload the exported files as MLflow artifacts")

    @field_validator("formats", "parts")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one entry")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _palettize_needs_coreml(self) -> "ExportParams":
        if self.palettize is not None and "coreml" not in self.formats:
            raise ValueError("palettize: needs the coreml format (--formats onnx,coreml)")
        return self

    def config(self) -> ExportConfig:
        """The typed export config: `export_overrides` as given, or parsed and validated here, at the flow
        boundary (and `palettize` applied to it)."""
        extra = [f"palettize_bits={self.palettize}"] if self.palettize is not None else []
        if isinstance(self.export_overrides, ExportConfig):
            return self.export_overrides.with_overrides(extra) if extra else self.export_overrides
        return ExportConfig().with_overrides(list(self.export_overrides) + extra)


@flow(name="export", log_prints=True)
def export_flow(params: ExportParams) -> dict[str, Any]:
    """Returns the export report with `uri`, `cache_hit` and (when tracked) `mlflow_run_id`."""
    logger = get_run_logger()
    cfg = params.config()
    paths = resolve_model_ref(params.model, params.decoder, params.text_encoder)
    destination = params.out or default_destination(paths["uri"])
    remote = read_export_manifest(destination)
    local = str(work_dir(destination))
    try:
        report = export_checkpoint(paths, params.preset, params.overrides, cfg,
                                   list(params.formats), list(params.parts), local,
                                   remote.get("export_key") if remote else None, params.force)
    except ParityError as exc:
        if params.track and exc.report:
            log_export(exc.report, None, params.model, destination, error=str(exc))
        raise
    if report.get("remote_hit"):
        logger.info("cache hit: %s already holds export %s", destination, report["export_key"][:16])
        return read_export_report(destination) | {"uri": destination, "cache_hit": True}
    upload_export(local, destination)
    create_markdown_artifact(report_markdown(report), key="export-report", description=f"export of {params.model}")
    result = report | {"uri": destination, "cache_hit": bool(report.get("skipped"))}
    if params.track and not report.get("skipped"):
        result["mlflow_run_id"] = log_export(report, local, params.model, destination, params.log_files)
    logger.info("exported %s to %s (%s)", params.model, destination, ", ".join(report["parts"]))
    return result
