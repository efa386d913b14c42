"""The MLflow server goes away during training and comes back on the same port: training keeps
going at full speed, metrics logged meanwhile are buffered and arrive once it is back (here the
run ends while the server is still down, so the logger's final flush waits for it), nothing
crashes. The server is a real ``mlflow server`` process, stopped (SIGTERM to its process group)
and restarted on the same port and store."""
from __future__ import annotations

import threading
import time

import lightning.pytorch as pl
import pytest
from mlflow.tracking import MlflowClient

from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.data import load_cache_folder
from snapgen_model.training.pretrain import PretrainConfig, fit
from tests.reliability.servers import MlflowOnPort
from tests.reliability.train_child import write_cache

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS, OUTAGE_AT = 30, 3


class Outage(pl.Callback):
    """Stops the server when step ``at`` starts and restarts it from a thread; times every step."""

    def __init__(self, server: MlflowOnPort, at: int) -> None:
        self.server, self.at = server, at
        self.restarter: threading.Thread | None = None
        self.down_at = self.up_at = None
        self.step_times: list[tuple[float, float]] = []  # (start, duration)
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.monotonic()
        if int(batch["step"]) == self.at:
            self.server.stop()
            self.down_at = time.monotonic()

            def restart() -> None:
                self.server.start()
                self.up_at = time.monotonic()

            self.restarter = threading.Thread(target=restart)
            self.restarter.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_times.append((self._t, time.monotonic() - self._t))
        time.sleep(0.1)  # paces the run; changes no numbers


def test_mlflow_outage_during_training(tmp_path, record):
    from tasks.settings import get_settings
    from tasks.metric_log import lightning_logger
    from tasks.tracking import start_run

    server = MlflowOnPort(tmp_path / "mlflow")
    server.start()
    try:
        settings = get_settings(home=tmp_path / "home", mlflow_tracking_uri=server.uri)
        data = load_cache_folder(write_cache(tmp_path / "cache"), ["clip"])
        cfg = PretrainConfig.from_dict({"steps": STEPS, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 10,
                                        "log_every": 1, "accelerator": "cpu", "kd": {"feature_kd": False}})
        outage = Outage(server, OUTAGE_AT)
        started = time.monotonic()
        with start_run(settings, "mlflow-outage") as run:
            result = fit(get_preset("toy-smoke"), cfg, data, CacheConfig(targets_per_sample=2), tmp_path / "state",
                         loggers=[lightning_logger(settings, run.run_id)], callbacks=[outage])
            train_s = time.monotonic() - started
        ended = time.monotonic()
        outage.restarter.join()
        assert result["step"] == STEPS
        down = [d for t, d in outage.step_times if outage.down_at <= t < (outage.up_at or ended)]
        assert len(down) >= 3, "training did not go on while the server was down"
        during = max(down)
        assert during < 2.5, f"a step took {during:.1f}s while MLflow was down: logging blocks training"
        client = MlflowClient(server.uri)
        history = client.get_metric_history(run.run_id, "loss/total")
        steps = sorted({m.step for m in history})
        assert len(steps) == STEPS, f"metrics lost: {STEPS - len(steps)} of {STEPS} steps missing ({steps})"
        assert client.get_run(run.run_id).info.status == "FINISHED"
        record(outage_s=outage.up_at - outage.down_at, steps_during_outage=len(down), max_step_s_during_outage=during,
               metrics_expected=STEPS, metrics_arrived=len(steps), train_s=train_s,
               buffered_metrics_sent_s_after_restart=max(0.0, ended - outage.up_at), restart_s=server.starts[-1])
    finally:
        server.stop()
