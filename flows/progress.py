"""Progress of fan-out stages: a rich progress bar when the CLI opened one, log lines otherwise."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_ACTIVE: list = []  # the CLI's rich Progress while a command runs (module state set only by `bar`)
_PLAIN: list[bool] = []  # inside `bar` without a terminal: True = print plain progress lines
log = logging.getLogger("snapgen.progress")


@contextlib.contextmanager
def bar() -> Iterator[None]:
    """Progress of the stages run inside this block (used by the CLI): live rich bars in a terminal;
    plain `label: done/total` lines as work happens when the output is a file or a pipe (a rich bar
    there would only print once, at the end); nothing with --quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.console import verbosity

    if verbosity() == "quiet" or not sys.stderr.isatty():
        _PLAIN.append(verbosity() != "quiet")
        try:
            yield
        finally:
            _PLAIN.pop()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as prog:
        _ACTIVE.append(prog)
        try:
            yield
        finally:
            _ACTIVE.remove(prog)


PLAIN_INTERVAL_S = 2.0  # plain lines: at most one per interval (and always the last), so a burst is one line


def progress(items: Iterable[T], label: str, total: int,
             clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Yield `items` (futures, in submission order) and report each one as it is consumed: a rich bar, or
    plain `label: done/total` lines at every tenth of the work that comes at least `PLAIN_INTERVAL_S` after
    the previous line, and at the end (items that finish together make one line, not one each)."""
    prog = _ACTIVE[-1] if _ACTIVE else None
    task_id = prog.add_task(label, total=total) if prog else None
    step = max(1, total // 10)
    last = clock()
    for done, item in enumerate(items, 1):
        if hasattr(item, "wait"):
            item.wait()
        yield item
        if prog:
            prog.update(task_id, completed=done)
        elif done == total or (done % step == 0 and clock() - last >= PLAIN_INTERVAL_S):
            last = clock()
            if _PLAIN and _PLAIN[-1]:
                print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)
            else:
                log.info("%s: %d/%d", label, done, total)
