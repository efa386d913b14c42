"""Lineage of runs and registered versions: which code produced them (package version, git commit,
dirty flag) and what they were made from (dataset hash, teacher, config hash, parent runs), as
`snapgen.*` tags. Plain Python: no MLflow import (tracking and the registry attach these tags)."""
from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

TAG_PREFIX = "snapgen."
_REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=4)
def git_commit(repo: Path = _REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the code's checkout, or ``"unknown"`` outside a repository."""
    out = _git(repo, "rev-parse", "HEAD")
    return out if out and re.fullmatch(r"[0-9a-f]{40,64}", out) else "unknown"


@functools.lru_cache(maxsize=4)
def git_dirty(repo: Path = _REPO_ROOT) -> bool | None:
    """Whether tracked files differ from HEAD (None when git cannot tell)."""
    out = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def _git(repo: Path, *args: str) -> str | None:
    """Output of a git command in ``repo``, or None if git is missing or fails."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """The installed ``snapgen`` version, else the one in pyproject.toml, else ``"unknown"``."""
    from importlib import metadata

    try:
        return metadata.version("snapgen")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        with open(_REPO_ROOT / "pyproject.toml", "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def code_version() -> str:
    """``<package version>[+g<commit12>[.dirty]]``: identifies the code that produced a run."""
    commit = git_commit()
    if commit == "unknown":
        return package_version()
    suffix = ".dirty" if git_dirty() else ""
    return f"{package_version()}+g{commit[:12]}{suffix}"


def lineage_tags(
    *,
    dataset_hash: str | None = None,
    teacher_id: str | None = None,
    config_hash: str | None = None,
    parent_runs: list[str] | tuple[str, ...] | None = None,
) -> dict[str, str]:
    """Lineage tags for runs and registered model versions (``snapgen.*`` plus MLflow's own).

    Always includes ``snapgen.git_commit`` (``"unknown"`` outside a repository) and
    ``snapgen.code_version``; the other keys only when given.
    """
    commit = git_commit()
    tags = {f"{TAG_PREFIX}git_commit": commit, f"{TAG_PREFIX}code_version": code_version()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    optional = {
        "dataset_hash": dataset_hash,
        "teacher_id": teacher_id,
        "config_hash": config_hash,
        "parent_runs": ",".join(parent_runs) if parent_runs else None,
    }
    tags.update({f"{TAG_PREFIX}{k}": str(v) for k, v in optional.items() if v is not None})
    return tags
