"""What the `snapgen` command prints: known third-party noise goes to `<home>/logs/console.log`, the rest stays.

`configure_console` is called once by the CLI's top-level callback, before any command imports Prefect
or diffusers; loggers that already exist by then (building the command line imports torch, and a library
may come with it) get a filter on their handlers. `quiet_environment` runs when the CLI module is
imported, since tqdm reads its switch at its own import.
Only notices known to be noise are moved (matched by logger and text, or by warning text); anything
else, an unexpected warning or an error, still reaches the console. ``--verbose`` moves nothing and
turns on debug logs; ``--quiet`` keeps warnings, errors and the result.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Verbosity = Literal["quiet", "normal", "verbose"]
LOG_NAME = "console.log"

# logger name -> notices from it (regex, searched in the message) that are noise on a console
NOISY_LOGGERS: dict[str, tuple[str, ...]] = {
    "diffusers": (r"`accelerate` was not found", r"low_cpu_mem_usage", r"float32", r"upcast"),
    "transformers": (r"`accelerate`", r"float32", r"torch_dtype", r"`loss_type="),
    "lightning.pytorch.utilities.rank_zero": (r"available:", r"Tip:", r"litlogger", r"`Trainer.fit` stopped",
                                              r"LOCAL_RANK", r"Trainer already configured",
                                              r"Automatic Mixed Precision"),
    "lightning.fabric.utilities.rank_zero": (r"available:", r"Tip:", r"Seed set"),
    "mlflow.system_metrics": (r".",),
    "mlflow.store.db.utils": (r".",),
    "mlflow.tracking.fluent": (r"System metrics", r"Autologging"),
    "alembic": (r".",),
    # Prefect's bookkeeping of every task and subflow that completed (~150 lines in the demo; the stage lines,
    # progress and results stay, and any other state, a failure or a retry, still reaches the console)
    "prefect.task_runs": (r"Finished in state (Completed\(\)|Cached\(type=COMPLETED\))$",),
    "prefect.flow_runs": (r"Beginning subflow run", r"Finished in state Completed\(\)$"),
    "coremltools": (r"not been tested", r"untested", r"libcoremlpython", r"_MLModelProxy", r"int64", r"int32",
                    r"fp64 dtype", r"scikit-learn", r"Tensorflow", r"TensorFlow", r"Tuple detected at graph output"),
}
# Python warnings (message text, regex) that are noise: Lightning's notes on our deliberate choices,
# deprecations inside third-party code, coremltools' version notes
NOISY_WARNINGS: tuple[str, ...] = (
    r"module\(s\) in eval mode",
    r"LeafSpec",
    r"`IterableDataset` has `__len__` defined",
    r"does not have many workers",
    r"The number of training batches",
    r"has not been tested with coremltools",
    r"libcoremlpython",
    r"_MLModelProxy",
    r"int64",
    r"`torch_dtype` is deprecated",
    r"pkg_resources is deprecated",
    r"TypedStorage is deprecated",
)
# progress bars of third-party libraries (tqdm) glue onto log lines in a log file; ours are rich bars
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

_state: dict[str, Any] = {"verbosity": "normal", "handler": None, "showwarning": None}


class _FileFormatter(logging.Formatter):
    """The log file's lines; a Prefect run's record keeps the run it belongs to ("Task run 'name' - ...",
    as Prefect's console prints it)."""

    def format(self, record: logging.LogRecord) -> str:
        task, flow = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.run_prefix = f"Task run '{task}' - " if task else f"Flow run '{flow}' - " if flow else ""
        return super().format(record)


class _LazyFileHandler(logging.FileHandler):
    """A file handler that opens `<home>/logs/console.log` at the first record (the home may change
    until settings are read; nothing is created for `--help`)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.baseFilename = ""
        self.mode, self.encoding, self.errors, self.delay = "a", "utf-8", None, True
        self.stream = None
        self.setFormatter(_FileFormatter("%(asctime)s %(levelname)s %(name)s: %(run_prefix)s%(message)s"))

    def _open(self) -> Any:
        path = log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.baseFilename = str(path)
        return open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by logging.FileHandler.close


def log_path() -> Path:
    """`<home>/logs/console.log` (home from settings; `$SNAPGEN_HOME` or ./.snapgen if they are invalid)."""
    try:
        from tasks.settings import get_settings

        home = Path(get_settings().home)
    except Exception:  # noqa: BLE001 - a bad setting is reported by the command, not here
        home = Path(os.environ.get("SNAPGEN_HOME") or "./.snapgen").expanduser().resolve()
    return home / "logs" / LOG_NAME


def _is_noise(name: str, message: str) -> bool:
    for prefix, patterns in NOISY_LOGGERS.items():
        if (name == prefix or name.startswith(prefix + ".")) and re.search("|".join(patterns), message):
            return True
    return False


class _RoutingLogger(logging.Logger):
    """Loggers created after :func:`configure_console`: known noise (:data:`NOISY_LOGGERS`, below ERROR)
    goes to the console log file instead of the console handlers."""

    def handle(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and _is_noise(record.name, record.getMessage()):
            if _state["handler"] is not None:
                _state["handler"].handle(record)
            return
        super().handle(record)


def _showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    """warnings.showwarning: known noise to the log file, everything else as before."""
    text = str(message)
    if re.search("|".join(NOISY_WARNINGS), text):
        record = logging.LogRecord("py.warnings", logging.WARNING, filename, lineno,
                                   "%s: %s", (category.__name__, text), None)
        if _state["handler"] is not None:
            _state["handler"].handle(record)
        return
    _state["showwarning"](message, category, filename, lineno, file, line)


class _NoiseFilter(logging.Filter):
    """On the handlers of loggers that existed before :func:`configure_console` (a library imported
    earlier, e.g. transformers with its own stderr handler): known noise goes to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and _is_noise(record.name, record.getMessage()):
            if _state["handler"] is not None:
                _state["handler"].handle(record)
            return False
        return True


def _filter_existing_loggers() -> None:
    noise = _NoiseFilter()
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                                       if any(name == p or name.startswith(p + ".") for p in NOISY_LOGGERS)]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _NoiseFilter) for f in handler.filters):
                handler.addFilter(noise)


def quiet_environment(argv: list[str] | None = None) -> None:
    """Turn off third-party progress bars (:data:`QUIET_ENV`) unless the command line asks for --verbose.
    Called when the CLI module is imported: tqdm reads ``TQDM_DISABLE`` when it is first imported, and
    building the command line already imports torch (and tqdm with it), before the CLI callback runs.
    A value the user exported wins."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-v", "--verbose") for a in argv):
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def drop_empty_prefect_env() -> None:
    """Unset ``PREFECT_API_URL`` / ``PREFECT_API_KEY`` when exported empty (``export PREFECT_API_URL=``).

    Prefect reads its settings when it is imported; an empty API URL then makes its events worker
    stop at the first event, print an ERROR with a traceback for every later one, and lose the task
    runs (Prefect 3 records them from events): the UI shows empty subflows. Unset means "use the
    ephemeral server", which is what an empty value meant. Must run before anything imports prefect.
    """
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY"):
        if key in os.environ and not os.environ[key].strip():
            del os.environ[key]


def configure_console(verbosity: Verbosity = "normal") -> None:
    """Set up the console for one command (idempotent)."""
    drop_empty_prefect_env()
    _state["verbosity"] = verbosity
    snapgen_level = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[verbosity]
    logging.getLogger("snapgen").setLevel(snapgen_level)
    if verbosity == "quiet":
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    elif verbosity == "verbose":
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "DEBUG")
        return  # verbose: every third-party notice stays on the console
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if _state["handler"] is None:
        _state["handler"] = _LazyFileHandler()
        logging.setLoggerClass(_RoutingLogger)  # the libraries create their loggers when first imported
        _state["showwarning"] = warnings.showwarning
        warnings.showwarning = _showwarning
    _filter_existing_loggers()  # and those created before this call


def verbosity() -> Verbosity:
    """The verbosity the CLI was started with."""
    return _state["verbosity"]


def exit_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (and SIGHUP, a closed terminal) end the process the way Ctrl-C does, by an exception in the
    main thread (SystemExit 143, 129), instead of Python's default (the process vanishes at once): a flow
    records the stop, files are closed, and Prefect's temporary server is stopped on the way out (its atexit),
    where it used to be left running. A training stage replaces the SIGTERM handler while it trains (the state
    is saved first: `training.state`). Only from the main thread, and only over the default handler (an
    embedding program's own handler stays). Returns what puts the previous handlers back (a host process, such
    as a test runner calling the CLI in-process, gets its own behaviour back when the command ends)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            previous[signum] = signal.signal(signum, _raise_stopped)

    def restore() -> None:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is _raise_stopped:
                signal.signal(signum, handler)
        previous.clear()

    return restore


def _raise_stopped(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
