"""Progress lines of a training stage into the Prefect run log (what a terminal shows during `snapgen run`)."""
from __future__ import annotations

import logging

from snapgen_model.training.progress import ProgressCallback

PROGRESS_EVERY_S = 30.0  # seconds between progress lines of a training stage


def training_progress(label: str, total_steps: int, every_s: float = PROGRESS_EVERY_S) -> ProgressCallback:
    """A Lightning callback logging "[label] step s/N (p%), elapsed, loss, img/s, time left" lines to the
    current Prefect run's logger (a plain logger outside a run)."""
    try:
        from prefect import get_run_logger

        logger = get_run_logger()
    except Exception:  # noqa: BLE001 - no Prefect run context (a library caller): the module logger
        logger = logging.getLogger("snapgen.training")

    def report(line: str) -> None:
        logger.info("[%s] %s", label, line)

    return ProgressCallback(report, total_steps, every_s)
