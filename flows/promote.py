"""promote_flow: the promotion gate as a flow (the `snapgen-promote` deployment; triggered when an
evaluation of a registered model completes, see prefect.yaml), and the evaluation-completed event."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.pipeline_config import build_config
from tasks import registry

EVALUATION_EVENT = "snapgen.evaluation.completed"


class PromoteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a parameter name is an error, not ignored

    model: str = Field(description="models:/NAME/VERSION or models:/NAME@ALIAS")
    preset: str = Field("toy", description="pipeline preset whose promotion gates apply")
    overrides: list[str] = Field(default_factory=list, description="--set overrides, e.g. promotion.tolerance=0.05")
    dry_run: bool = Field(False, description="decide and report, move nothing")


def decision_markdown(decision: dict[str, Any]) -> str:
    verdict = "promoted" if decision.get("promoted") else ("passed (dry run)" if decision["passed"] else "blocked")
    lines = [f"### Promotion of {decision['name']} v{decision['version']}: {verdict}", "",
             f"champion before: v{decision.get('champion_before') or '-'}", "", "| check | result | detail |",
             "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['passed'] else 'FAIL'} | {c['detail']} |" for c in decision["checks"]]
    return "\n".join(lines)


@flow(name="promote", log_prints=True)
def promote_flow(params: PromoteParams) -> dict[str, Any]:
    gates = build_config(params.preset, params.overrides).promotion
    args = ([g.model_dump() for g in gates.gates], gates.tolerance, gates.require_export_parity, gates.demo_thresholds)
    decision = registry.check_promotion(params.model, *args) if params.dry_run else registry.promote(params.model, *args)
    create_markdown_artifact(decision_markdown(decision), key="promotion", description=f"promotion of {params.model}")
    get_run_logger().info("promotion of %s: passed=%s promoted=%s %s", params.model, decision["passed"],
                          decision.get("promoted"), "; ".join(decision["reasons"]))
    return decision


def emit_evaluation_completed(model_ref: str, results: dict[str, Any]) -> None:
    """Tell Prefect an evaluation of a registered model finished (the promotion trigger listens)."""
    from prefect.events import emit_event

    name = model_ref[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
    version = str(results.get("model", {}).get("version") or "")
    concrete = f"models:/{name}/{version}" if version else model_ref  # promote what was scored, not a moving alias
    emit_event(event=EVALUATION_EVENT,
               resource={"prefect.resource.id": f"snapgen.model.{name}.{version or 'unknown'}",
                         "snapgen.model_ref": concrete, "snapgen.evaluated_ref": model_ref},
               payload={"benchmarks": sorted((results.get("benchmarks") or {}).keys())})
