"""inspect_flow: log a preset's architecture table and config to MLflow (and a Prefect artifact)."""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.report import inspect_markdown
from tasks.inspect import inspect_preset, log_inspect_report


class InspectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    preset: str = Field("toy", description="preset name, e.g. snapgen-1024, toy")
    overrides: list[str] = Field(default_factory=list, description="key=value config overrides")


@flow(name="inspect", log_prints=True)
def inspect_flow(params: InspectParams = InspectParams()) -> dict:
    """Returns {"report", "config", "config_hash", "mlflow_run_id"}."""
    result = inspect_preset(params.preset, params.overrides)
    table = inspect_markdown(result["report"])
    create_markdown_artifact(table, key=f"inspect-{params.preset}".replace("_", "-"),
                             description=f"architecture of preset {params.preset}")
    run_id = log_inspect_report(result, table)
    return result | {"mlflow_run_id": run_id}
