"""promote_flow: the promotion gate as a flow (the `snapgen-promote` deployment; triggered when an
evaluation of a registered model completes, see prefect.yaml; the event itself: flows/events.py)."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.events import EVALUATION_EVENT, emit_evaluation_completed  # noqa: F401  (re-exported)
from flows.params import PromoteParams
from flows.pipeline_config import build_config
from tasks import registry



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
