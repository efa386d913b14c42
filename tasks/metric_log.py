"""Training metrics into MLflow without ever waiting on it: `MetricBuffer` (a background uploader that
keeps metrics through a tracking outage and sends them when the server is back) and `lightning_logger`
(Lightning's MLFlowLogger writing into a run that `tracking.start_run` created, through the buffer).

Why not MLflow's own asynchronous logging (`log_metrics(synchronous=False)`): its queue
(`mlflow.utils.async_logging.AsyncLoggingQueue`) sends each batch once; when the server is down it
logs an ERROR line, stores the exception on the batch (raised only to a caller that waits on it) and
moves on, so an outage loses those metrics. The reliability suite (tests/reliability/test_mlflow_outage.py)
requires that a run training through a server outage loses no metric, neither blocks nor fails, and
prints no ERROR; this buffer retries with backoff until the server is back, which is what passes it.
"""
from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tasks.tracking import MAX_METRICS_PER_BATCH, RetryPolicy, configure_mlflow, is_transient

log = logging.getLogger(__name__)


class MetricBuffer:
    """Metrics queued in memory and uploaded by a background thread, so training never waits on
    (or crashes because of) the tracking server: an outage keeps them queued and retried with
    exponential backoff until the server is back; nothing is dropped unless the queue exceeds
    ``max_pending`` (oldest first, counted in ``dropped``) or the server rejects a batch outright."""

    def __init__(self, client: MlflowClient, run_id: str, policy: RetryPolicy | None = None,
                 max_pending: int = 1_000_000) -> None:
        import threading

        self.client, self.run_id = client, run_id
        self.policy = policy or RetryPolicy()
        self.max_pending = max_pending
        self.sent = self.dropped = self.failures = 0
        self._pending: list[Metric] = []
        self._inflight = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._urgent = False  # set by flush(): retry now instead of waiting out the back-off

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + self._inflight

    def add(self, items: list[Metric]) -> None:
        import threading

        with self._cond:
            self._pending.extend(items)
            excess = len(self._pending) - self.max_pending
            if excess > 0:
                del self._pending[:excess]
                self.dropped += excess
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._loop, name=f"mlflow-metrics-{self.run_id[:8]}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        delay, down_since = self.policy.base_delay_s, None
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._pending[:MAX_METRICS_PER_BATCH]
                del self._pending[:len(batch)]
                self._inflight = len(batch)
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - nothing may escape into training
                with self._cond:
                    self._inflight = 0
                    if is_transient(exc):
                        self._pending[:0] = batch  # back to the front, in order
                    else:
                        self.dropped += len(batch)
                self.failures += 1
                if not is_transient(exc):
                    log.error("MLflow rejected %d metrics of run %s: %s", len(batch), self.run_id, exc)
                    continue
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow unreachable; buffering metrics of run %s and retrying: %s", self.run_id, exc)
                retry_at = time.monotonic() + delay
                with self._cond:  # back off (new metrics do not cut it short; a flush does)
                    while not self._urgent and (left := retry_at - time.monotonic()) > 0:
                        self._cond.wait(timeout=left)
                delay = min(self.policy.max_delay_s, delay * 2)
                continue
            with self._cond:
                self._inflight = 0
                self.sent += len(batch)
                self._cond.notify_all()
            if down_since is not None:
                log.warning("MLflow reachable again after %.1fs; buffered metrics of run %s sent",
                            time.monotonic() - down_since, self.run_id)
                down_since = None
            delay = self.policy.base_delay_s

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is sent (True) or ``timeout_s`` passed (False); a retry
        back-off in progress is cut short."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._urgent = True
            self._cond.notify_all()
            while self._pending or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(timeout=min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> bool:
        """Flush (bounded by ``timeout_s``), then stop the uploader; warns about what is left."""
        done = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            left = len(self._pending) + self._inflight
            self._cond.notify_all()
        if not done and left:
            message = (f"MLflow still unreachable after {timeout_s:.0f}s: {left} metrics of run {self.run_id} "
                       "could not be sent")
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return done


def lightning_logger(settings: Any, run_id: str, *, flush_timeout_s: float = 120.0, retry: RetryPolicy | None = None):
    """Lightning's MLFlowLogger writing into an existing run (created by `start_run`), with metric
    uploads buffered in the background (:class:`MetricBuffer`): a tracking outage during training
    neither blocks nor crashes it, and the metrics arrive once the server is back (the logger
    waits up to ``flush_timeout_s`` for that when training ends)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class BufferedMLFlowLogger(MLFlowLogger):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.buffer = MetricBuffer(MlflowClient(tracking_uri=kwargs["tracking_uri"]), kwargs["run_id"],
                                       retry or RetryPolicy(base_delay_s=1.0, max_delay_s=8.0))

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            stamp = int(time.time() * 1000)
            items = [Metric(re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), float(v), stamp, step or 0)
                     for k, v in metrics.items() if not isinstance(v, str)]
            self.buffer.add(items)

        @rank_zero_only
        def log_hyperparams(self, params: Any) -> None:
            try:
                super().log_hyperparams(params)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("MLflow unreachable: hyper-parameters of run %s not logged: %s", run_id, exc)

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            self.buffer.close(flush_timeout_s)
            try:
                super().finalize(status)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("MLflow unreachable: could not mark run %s %s: %s", run_id, status, exc)

    configure_mlflow(settings)
    return BufferedMLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id, log_model=False)
