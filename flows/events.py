"""Prefect events snapgen emits: the evaluation of a registered model completed (the promotion
deployment's trigger listens for it, prefect.yaml)."""
from __future__ import annotations

from typing import Any

EVALUATION_EVENT = "snapgen.evaluation.completed"


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
