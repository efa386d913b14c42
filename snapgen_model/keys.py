"""Content keys and behaviour hashes of source code (pure Python): the one helper behind the
project's cache, stage and run keys (`tasks/keys.py` adds the named code scopes).

- `content_key(obj)`: sha256 of `obj` as canonical JSON (sorted keys, non-JSON values as text).
- `behaviour_of(source)` / `source_hash(roots)`: Python source hashed as its syntax tree without
  docstrings, so comments, docstrings, blank lines and formatting leave the hash alone, and any change
  to statements, expressions, names or constants moves it.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any


def content_key(obj: Any, length: int | None = None) -> str:
    """Hex sha256 of `obj` as canonical JSON (first `length` characters when given)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


def behaviour_of(source: str, name: str = "<source>") -> str:
    """The syntax tree of Python `source` without docstrings, as text: equal for two sources that differ
    only in comments, docstrings or layout. Source that does not parse is its own text."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def source_hash(roots: tuple[str | Path, ...], base: Path) -> str:
    """16-hex hash of the behaviour (`behaviour_of`) of every .py file under `roots` (relative to `base`),
    with their paths."""
    files = sorted(p for root in roots for p in (base / root).rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(behaviour_of(path.read_text(encoding="utf-8"), str(path)).encode())
    return digest.hexdigest()[:16]
