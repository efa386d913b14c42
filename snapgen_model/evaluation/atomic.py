"""Atomic file writes for evaluation folders that several evaluations may share at once (re-evaluations
of one model version run concurrently): write a temporary file with a name unique to this process and
thread, then rename it over the target. A reader sees the old file or the new one, never a part, and
two writers of the same file never clobber each other's temporary file."""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def save_image(image: Any, path: str | os.PathLike, format: str = "PNG") -> Path:
    """A PIL image saved atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        image.save(tmp, format=format)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
