"""Checks of command-line inputs that run before any server starts, and one-line messages for bad inputs.

Every bad input ends the same way: ``error: <the input>: <what is wrong>`` on stderr, exit code 2,
no traceback. Commands call the ``check_*`` helpers before they start Prefect; :class:`SnapgenGroup`
(the CLI's click group) turns the errors that still escape a command (a bad setting, a truncated
checkpoint found while loading, a permanent storage error) into the same one line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

import typer
from rich.console import Console
from typer.core import TyperGroup

err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)


class BadInput(Exception):
    """A bad command-line input, setting or file: printed as one line, exit code 2."""


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` (one line, no markup interpretation) and exit with ``code``."""
    err.print(f"[bold red]error:[/] {_one_line(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _one_line(message: str) -> str:
    from rich.markup import escape

    return escape(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
def describe_settings_error(exc: Any) -> str:
    """A pydantic ``ValidationError`` of ``SnapgenSettings`` as one line naming the variable it came from."""
    from tasks.settings import _STANDARD_ENV_FALLBACKS, ENV_PREFIX, config_file_path, mask_uri

    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        reason = _reason(error, field)
        env_var = f"{ENV_PREFIX}{field.upper()}"
        fallback = _STANDARD_ENV_FALLBACKS.get(field)
        if not field:
            source = "settings"
        elif env_var in os.environ:
            source = env_var
        elif fallback and os.environ.get(fallback, "").strip():
            source = fallback
        else:
            try:
                path = config_file_path()
            except ValueError:
                path = None
            source = f"{field} in {path}" if path else env_var
        secret = any(k in field for k in ("secret", "key_id", "token"))
        value = os.environ.get(source) if source in os.environ and not secret else None
        parts.append(f"{source}={mask_uri(value)!r}: {reason}" if value is not None else f"{source}: {reason}")
    return mask_uri_in_text("; ".join(parts))


def mask_uri_in_text(text: str) -> str:
    """``text`` with the credentials of every URI in it masked (the one secrets policy, tasks/secrets.py)."""
    from tasks.secrets import mask_text

    return mask_text(text)


def _reason(error: Mapping[str, Any], field: str) -> str:
    """pydantic's message without its boilerplate ("Value error, ", a repeated field name)."""
    msg = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if field and msg.startswith(f"{field}: "):
        msg = msg[len(field) + 2:]
    if error.get("type") == "extra_forbidden":
        msg = "unknown setting"
    return msg[:1].lower() + msg[1:]


def describe_params_error(exc: Any, options: Mapping[str, str] | None = None) -> str:
    """A pydantic ``ValidationError`` of flow parameters as one line naming the command-line option."""
    options = options or {}
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        field = loc[0] if loc else ""
        option = options.get(field, f"--{field.replace('_', '-')}" if field else "input")
        value = error.get("input")
        shown = f" {value!r}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        reason = _reason(error, field)
        if error.get("type") == "literal_error":
            expected = error.get("ctx", {}).get("expected", "")
            reason = f"choose from {expected.replace(' or ', ', ')}".replace("'", "")
        parts.append(f"{option}{shown}: {reason}")
    return "; ".join(parts)


def settings_or_fail() -> Any:
    """``get_settings()``; a bad value fails as one line naming the variable (``SNAPGEN_*``, ``AWS_*``, ...)."""
    from pydantic import ValidationError

    from tasks.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        raise BadInput(describe_settings_error(exc)) from None
    except ValueError as exc:  # config file missing or of an unknown type
        raise BadInput(str(exc)) from None


# --------------------------------------------------------------------------------------------
# storage URIs and object stores
# --------------------------------------------------------------------------------------------
def check_storage_uri(option: str, value: str) -> str:
    """``value`` as a storage URI (local paths become ``file://``); an unknown scheme fails naming ``option``."""
    from tasks.storage import parse_uri

    uri = value if "://" in value else "file://" + str(Path(value).expanduser().resolve())
    try:
        return str(parse_uri(uri))
    except ValueError as exc:
        raise BadInput(f"{option} {value!r}: {_strip_uri(str(exc), value)}") from None


def _strip_uri(message: str, value: str) -> str:
    """A parse error without its own copy of the URI ("storage URI 'x' has ..." -> "has ...")."""
    for quoted in (repr(value), f"'{value}'"):
        if quoted in message:
            rest = message.split(quoted, 1)[1].strip(" :")
            return rest[4:] if rest.startswith("has ") else rest
    return message


def check_storage_access(option: str, uri: str, settings: Any) -> None:
    """An s3:// ``uri`` fails at once when retrying could not help: no credentials, 403, no such bucket."""
    from tasks.storage import PermanentStorageError, Storage

    try:
        Storage.from_settings(settings, max_attempts=1).check_access(uri)
    except PermanentStorageError as exc:
        raise BadInput(f"{option} {uri}: {_after_failed(str(exc))}") from None


def _after_failed(message: str) -> str:
    return message.split(" failed: ", 1)[1] if " failed: " in message else message


# --------------------------------------------------------------------------------------------
# models and checkpoints
# --------------------------------------------------------------------------------------------
def check_model(option: str, value: str, settings: Any) -> None:
    """A ``--model`` value: a registry ref that exists, a shipped release (release://<name>, verified), or a
    local checkpoint file/folder whose safetensors files are whole. s3:// models are checked by the flow (it fetches them)."""
    if value.startswith("models:/"):
        from tasks.registry import resolve_model_version

        try:
            resolve_model_version(settings, value)
        except (LookupError, ValueError) as exc:
            message = str(exc).replace(f"model ref {value!r}", "").strip(" :")
            raise BadInput(f"{option} {value}: {message}") from None
        return
    if value.startswith("release://"):
        from snapgen_model.distill.teacher import LoadError
        from snapgen_model.training.release import release_folder

        try:
            release_folder(value)  # in the index, and every sha256 as recorded
        except LoadError as exc:
            raise BadInput(f"{option} {value}: {exc}") from None
        return
    if "://" in value and not value.startswith("file://"):
        return
    check_checkpoint(option, Path(value[len("file://"):] if value.startswith("file://") else value))


def check_checkpoint(option: str, path: Path) -> None:
    """``path`` exists and each safetensors file in it (or it) is whole: not truncated, not a pickle."""
    from snapgen_model.storage.checkpoint import CheckpointError, check_safetensors

    path = path.expanduser()
    if not path.exists():
        raise BadInput(f"{option} {path}: no such file or folder")
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        try:
            check_safetensors(file)
        except CheckpointError as exc:
            reason = str(exc).split(f"{file}: ", 1)[-1]
            where = "" if file == path else f"{file.relative_to(path)}: "
            raise BadInput(f"{option} {path}: {where}{reason}") from None


def check_port(option: str, port: int) -> None:
    """A TCP port number in 1..65535."""
    if not 1 <= port <= 65535:
        raise BadInput(f"{option} {port}: a TCP port is 1-65535")


# --------------------------------------------------------------------------------------------
# the click group: one line for the errors that escape a command
# --------------------------------------------------------------------------------------------
class SnapgenGroup(TyperGroup):
    """The `snapgen` group: known bad-input errors print one line and exit 2 instead of a traceback."""

    def invoke(self, ctx: Any) -> Any:
        from pydantic import ValidationError

        from snapgen_model.config_base import ConfigError
        from snapgen_model.storage.checkpoint import CheckpointError

        try:
            return super().invoke(ctx)
        except BadInput as exc:
            fail(str(exc))
        except ValidationError as exc:
            fail(describe_settings_error(exc) if exc.title == "SnapgenSettings" else describe_params_error(exc))
        except (CheckpointError, ConfigError) as exc:
            fail(str(exc))
        except OSError as exc:
            from tasks.storage import PermanentStorageError

            if isinstance(exc, PermanentStorageError):
                fail(str(exc))
            raise


# --------------------------------------------------------------------------------------------
# presets: one list per kind, from the registries, shown as choices in every command's --help
# --------------------------------------------------------------------------------------------
def preset_names(kind: str) -> list[str]:
    """The preset names of ``kind``: "model" (architectures), "pipeline" (`run`, `demo`, `promote`) or
    "bootstrap" (the toy teacher's training sizes)."""
    if kind == "model":
        from snapgen_model.presets import PRESETS

        return list(PRESETS)
    if kind == "pipeline":
        from flows.pipeline_config import PRESETS as PIPELINE_PRESETS

        return list(PIPELINE_PRESETS)
    if kind == "bootstrap":
        from snapgen_model.artifacts.teacher_recipe import BOOTSTRAP_PRESETS

        return list(BOOTSTRAP_PRESETS)
    raise ValueError(f"preset kind {kind!r}: choose model, pipeline or bootstrap")


def preset_option(default: Any, kind: str, help: str) -> Any:
    """``--preset/-p`` as a choice among :func:`preset_names` (``kind``): the same list in every command."""
    names = preset_names(kind)

    def parse(value: str) -> str:
        if value not in names:  # one line, like every other bad input (not click's boxed usage error)
            fail(f"--preset {value!r}: unknown {kind} preset; choose from {', '.join(names)}")
        return value

    return typer.Option(default, "--preset", "-p", parser=parse, metavar="[" + "|".join(names) + "]", help=help,
                        show_default=default is not None)


GPU_PRESETS = ("toy-gpu", "snapgen-1024", "snapgen-in1k-256")


def gpu_warning(preset: str) -> str | None:
    """A warning when ``preset`` is meant for a GPU and this machine has none (None otherwise)."""
    if preset not in GPU_PRESETS:
        return None
    from snapgen_model.device import has_gpu

    if has_gpu():
        return None
    return (f"preset {preset!r} is sized for a GPU and this machine has none (torch.cuda.is_available() is False): "
            "it will run on the CPU, far slower than its budget; `--preset toy` is the CPU demo")
