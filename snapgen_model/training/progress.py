"""Progress of a Lightning training run as short text lines: step, loss, speed and time left.

`ProgressCallback(report, total_steps, every_s)` calls `report(line)` on global rank 0 at most every
`every_s` seconds and once at the end, so a long stage is never silent in a terminal. The line reads

    step 120/500 (24%), 75 s, loss 0.2134, 164 img/s, about 3 min left

The loss is the module's logged `loss/total` (Lightning's callback metrics); images/s counts the
global batch over every rank. Speed and time left are measured from the oldest line of the last `window_s`
seconds (5 min; the previous line where none is that recent), never from before the end of the process's first
step: that step carries the warm-up (torch.compile on CPU: minutes), and counting it once made the first lines
read "0 img/s, about 1240 h left" for a run of 90 minutes. A run that was stopped for a while (`kill -STOP`, a
frozen VM) reads its own speed again at most `window_s` later (a line later after a longer stop), where an average
since the start read "16 img/s, about 7.5 h left" for an hour's work. The task layer decides where the
line goes (a Prefect run logger).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(step: int, total: int, elapsed_s: float, loss: float | None, images_per_s: float | None,
                  steps_done: int, timed_s: float | None = None) -> str:
    """The text of one report; `steps_done`: steps timed so far, in `timed_s` seconds (default `elapsed_s`),
    which the time left extrapolates; none timed yet (the first step only): the line says it is warming up."""
    pct = 100.0 * step / max(1, total)
    parts = [f"step {step}/{total} ({pct:.0f}%)", f"{elapsed_s:.0f} s"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if images_per_s:
        parts.append(f"{images_per_s:.0f} img/s")
    if step < total:
        timed = elapsed_s if timed_s is None else timed_s
        parts.append(f"about {_duration(timed / steps_done * (total - step))} left" if steps_done > 0
                     else "first step (warm-up); time left from the next line")
    return ", ".join(parts)


class ProgressCallback(pl.Callback):
    """Report progress lines (see the module docstring) at most every `every_s` seconds, and at the end."""

    def __init__(self, report: Callable[[str], None], total_steps: int, every_s: float = 30.0,
                 loss_key: str = "loss/total", window_s: float = 300.0) -> None:
        self.report, self.total, self.every_s, self.loss_key = report, int(total_steps), float(every_s), loss_key
        self.window_s = float(window_s)
        self._start: tuple[float, int] | None = None
        self._timed_from: tuple[float, int, int] | None = None  # (time, step, images) after the first step
        self._marks: list[tuple[float, int, int]] = []  # (time, step, images) of the first step and of each line
        self._last = 0.0
        self._images = 0
        self.lines: list[str] = []

    def _step(self, pl_module) -> int:
        current = getattr(pl_module, "current_step", None)
        return int(current()) if current is not None else int(pl_module.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.monotonic(), self._step(pl_module))
        self._last, self._images, self._timed_from, self._marks = time.monotonic(), 0, None, []
        if self._start[1] > 0 and trainer.is_global_zero:  # a resumed run says so before its first step line
            line = f"resuming at step {self._start[1]}/{self.total} from the saved training state"
            self.lines.append(line)
            self.report(line)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += _batch_size(batch) * trainer.world_size
        now = time.monotonic()
        if self._timed_from is None:  # the end of the warm-up step: speed and time left count from here
            self._timed_from = (now, self._step(pl_module), self._images)
            self._marks = [self._timed_from]
        if now - self._last >= self.every_s:
            self._emit(trainer, pl_module, now)

    def on_train_end(self, trainer, pl_module) -> None:
        self._emit(trainer, pl_module, time.monotonic())

    def _emit(self, trainer, pl_module, now: float) -> None:
        self._last = now
        if not trainer.is_global_zero or self._start is None:
            return
        step = self._step(pl_module)
        elapsed = now - self._start[0]
        loss = trainer.callback_metrics.get(self.loss_key)
        done, timed, speed = 0, elapsed, None
        earlier = [m for m in self._marks if m[1] < step]
        if earlier:  # the oldest mark inside the window; none there (a pause): the newest, so one line carries it
            ref = next((m for m in earlier if now - m[0] <= self.window_s), earlier[-1])
            done, timed = step - ref[1], now - ref[0]
            speed = (self._images - ref[2]) / timed if timed > 0 else None
        if self._timed_from is not None:
            self._marks = [m for m in self._marks if now - m[0] <= self.window_s] + [(now, step, self._images)]
        line = progress_line(step, self.total, elapsed, None if loss is None else float(loss), speed, done, timed)
        self.lines.append(line)
        self.report(line)


def _batch_size(batch) -> int:
    """Images in a training batch: the first dimension of its first tensor (0 when it has none)."""
    import torch

    values: Iterable[Any]
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, dict):
        for key in ("latent", "x", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return int(batch[key].shape[0])
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return 0
    for v in values:
        n = _batch_size(v)
        if n:
            return n
    return 0
