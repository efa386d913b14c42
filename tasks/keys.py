"""Content keys and code hashes: the one helper behind every cache and stage key (the functions live
in `snapgen_model.keys`, so the library uses them too; this module names the code scopes).

- `content_key(obj)`: sha256 of `obj` as canonical JSON (sorted keys, non-JSON values as text). Stage
  keys, run keys, generation keys and dataset plans are all content keys of what determines them.
- `code_hash(scope)`: what the code of a scope *does*, for keys that must change when behaviour
  changes. Each source file is parsed and hashed as its syntax tree without docstrings, so comments,
  docstrings, blank lines and formatting leave the hash alone, and any change to statements,
  expressions, names or constants moves it. Scopes: `pipeline` (the product: snapgen_model, tasks,
  flows; part of every stage key) and `evaluation` (sampling and scoring, the generation cache's key).

Two other identities are deliberately not code hashes: `tasks.lineage.code_version()` names the
checkout a run came from (package version, git commit, dirty flag; a lineage tag, not a key), and
the explicit format versions of long-lived data (`tasks.curate.CODE_VERSION`, `tasks.cache.CODE_VERSION`,
`snapgen_model.export.EXPORT_CODE_VERSION`) are bumped by hand when their on-disk layout changes, so
an edit elsewhere never rebuilds a dataset or a cache.
"""
from __future__ import annotations

import functools
from pathlib import Path

from snapgen_model.keys import behaviour_of, content_key, source_hash  # noqa: F401  (the one helper)

ROOT = Path(__file__).resolve().parents[1]
SCOPES: dict[str, tuple[str, ...]] = {
    "pipeline": ("snapgen_model", "tasks", "flows"),
    "evaluation": ("snapgen_model/evaluation", "snapgen_model/diffusion"),
}


@functools.lru_cache(maxsize=None)
def code_hash(scope: str = "pipeline") -> str:
    """`source_hash` of a named scope (`SCOPES`), computed once per process."""
    if scope not in SCOPES:
        raise ValueError(f"code_hash: unknown scope {scope!r}; known: {sorted(SCOPES)}")
    return source_hash(SCOPES[scope], ROOT)
