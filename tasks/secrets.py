"""The project's one secrets policy: what counts as a credential, and how it is masked.

Settings (`tasks/settings.py`), tracking (`tasks/tracking.py`, parameters and dicts logged to MLflow),
storage (`tasks/storage.py`, error messages) and the CLI's checks all mask through this module, so a
credential hidden in one place is hidden in all of them.

- A *key* names a credential when it contains one of `SECRET_MARKERS` (case-insensitive):
  `aws_secret_access_key`, `mlflow_tracking_token`, `X-Amz-Signature`, `db_password`. In a URI's
  query string the bare names `key` and `sig` count too (API keys and signatures of presigned URLs);
  as config or parameter names they are too common (a stage's `key` is a content hash) to mask.
- A *value* is a credential when it is a pydantic secret or is shaped like a well-known one
  (`VALUE_PATTERNS`: AWS key ids, PEM private keys, GitHub/Hugging Face/OpenAI/Slack tokens, bearer
  headers), whatever its key.
- A URI keeps everything but its password (`user:***@host`) and its secret query values.

No project imports: usable from any module.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_MARKERS = ("password", "passwd", "secret", "token", "signature", "credential", "access_key",
                  "private_key", "api_key", "apikey")
QUERY_SECRET_NAMES = ("key", "sig")  # exact query-parameter names that hold credentials
VALUE_PATTERNS = (
    re.compile(r"^(AKIA|ASIA)[0-9A-Z]{16}$"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^(gh[pousr]_|hf_|sk-|xox[abp]-)[A-Za-z0-9_\-]{16,}$"),  # common API tokens
    re.compile(r"^Bearer\s+\S+$", re.IGNORECASE),
)


def is_secret_key(key: str, *, query: bool = False) -> bool:
    """True when `key` names a credential (`query`: a URI query parameter, see the module docstring)."""
    lowered = str(key).lower()
    return any(marker in lowered for marker in SECRET_MARKERS) or (query and lowered in QUERY_SECRET_NAMES)


def looks_like_secret(value: Any) -> bool:
    """True for pydantic secrets and strings shaped like well-known credentials."""
    if hasattr(value, "get_secret_value"):
        return True
    if not isinstance(value, str):
        return False
    return any(pattern.search(value.strip()) for pattern in VALUE_PATTERNS)


def secret_value(secret: Any) -> str | None:
    """The plain value of a pydantic secret (or of a plain value, as text); None stays None."""
    if secret is None:
        return None
    getter = getattr(secret, "get_secret_value", None)
    return str(getter() if callable(getter) else secret)


def as_secret(value: Any):
    """A plain credential wrapped as a pydantic `SecretStr` (never printed); a secret, None or "" as is
    (None for "")."""
    from pydantic import SecretStr

    if value is None or hasattr(value, "get_secret_value"):
        return value
    return SecretStr(str(value)) if str(value) else None


def mask_uri(uri: str) -> str:
    """`uri` with its password (`user:***@host`) and the values of secret query parameters masked;
    text that is not a URI comes back unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostinfo}"
    query = _mask_query(parts.query)
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(is_secret_key(k, query=True) for k, _ in pairs):
        return query
    return urlencode([(k, MASK if is_secret_key(k, query=True) else v) for k, v in pairs], safe="*")


def mask_text(text: str) -> str:
    """`text` with every URI in it (space-separated words containing `://`) masked."""
    return " ".join(mask_uri(word) if "://" in word else word for word in text.split(" "))


def mask_value(key: str, value: Any) -> Any:
    """`MASK` for a secret key or value; a URI keeps everything but its credentials."""
    if is_secret_key(key) or looks_like_secret(value):
        return MASK
    if isinstance(value, str) and "://" in value:
        return mask_uri(value)
    return value


def mask_secrets(obj: Any, _key: str = "") -> Any:
    """A copy of `obj` (nested dicts, lists, pydantic models) with secret entries masked (`mask_value`,
    keyed by the dotted path)."""
    if hasattr(obj, "model_dump") and not hasattr(obj, "get_secret_value"):
        obj = obj.model_dump()
    if isinstance(obj, Mapping):
        return {k: mask_secrets(v, f"{_key}.{k}" if _key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v, _key) for v in obj]
    return mask_value(_key, obj)
