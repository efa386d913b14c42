"""Object storage over ``file://`` and ``s3://`` URIs: the only module that creates boto3 clients.

* Writes are atomic. ``file://``: a temp file in the target's folder, fsync, ``os.replace``.
  ``s3://``: ``put_object`` below the multipart threshold, else a multipart upload (boto3
  ``TransferConfig``) that s3transfer aborts on failure, so no partial object is ever visible.
* Missing objects raise ``FileNotFoundError`` whose ``filename`` is the URI, for both schemes.
* S3 requests retry with exponential backoff and jitter (botocore ``standard``/``adaptive``
  retry modes); connect/read timeouts are bounded.
* Credentials come from settings (``SecretStr``) or the standard AWS env/config chain. They
  never appear in messages: S3 errors are re-raised as :class:`StorageError` subclasses (or
  ``FileNotFoundError``) with a scrubbed message and no chained botocore exception.
"""
from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, NoReturn, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
from botocore.exceptions import NoCredentialsError, PartialCredentialsError
from urllib3.exceptions import ProtocolError as Urllib3ProtocolError
from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeoutError
from pydantic import SecretStr

from tasks.secrets import MASK, as_secret, mask_uri, secret_value
from tasks.settings import MIB

if TYPE_CHECKING:
    from tasks.settings import SnapgenSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMES = ("file", "s3")
DEFAULT_MULTIPART_THRESHOLD = 64 * MIB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MIB
_TMP_SUFFIX = ".snapgen-tmp"
_COPY_CHUNK = 4 * MIB
_MIN_SCRUB_LEN = 6  # shorter "credentials" (test dummies) would mangle every message
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
# errors while streaming a GET body (after botocore's request retries are over): connection reset or
# closed mid-body, body shorter than Content-Length, read timeout. The read resumes with a Range GET.
_STREAM_ERRORS = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, BotoConnectionError,
                  Urllib3ProtocolError, Urllib3ReadTimeoutError, ConnectionError, TimeoutError)
_ACCESS_CODES = {
    "403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken",
    "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
}


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
class StorageError(OSError):
    """A storage operation failed (message names the URI, never a credential)."""


class PermanentStorageError(StorageError):
    """A storage failure that retrying cannot fix (missing credentials, 403, no such bucket):
    never retried (``tasks.defaults.is_io_error``), reported to the user as a bad input."""


class StorageAccessError(PermanentStorageError, PermissionError):
    """The object store refused the credentials or the request (403 and friends)."""


class StorageCredentialsError(PermanentStorageError):
    """No S3 credentials were found (nor given in settings, nor in the environment)."""


class NoSuchBucketError(PermanentStorageError, FileNotFoundError):
    """The bucket does not exist (a ``FileNotFoundError`` too: reading from it finds nothing)."""


class StorageUnavailableError(StorageError, ConnectionError):
    """The object store could not be reached (after botocore's retries)."""


def _not_found(uri: str) -> FileNotFoundError:
    """``FileNotFoundError`` whose message and ``filename`` name ``uri``."""
    return FileNotFoundError(errno.ENOENT, "no such object", uri)


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StorageURI:
    """A parsed storage location. ``file``: ``key`` is an absolute POSIX path and ``bucket`` is
    empty. ``s3``: ``bucket`` and ``key`` (``""`` for the bucket root)."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> Path:
        """Local path (``file`` only)."""
        if self.scheme != "file":
            raise ValueError(f"{self} is not a file:// URI")
        return Path(self.key)

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.key}"
        return f"s3://{self.bucket}/{self.key}"


def parse_uri(uri: str) -> StorageURI:
    """Parse ``file://<path>`` (a relative path is resolved against the working directory) or
    ``s3://bucket/key``. Raises ``ValueError`` naming the URI when it is malformed."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"storage URI must be a non-empty string, got {uri!r}")
    text = uri.strip()
    shown = mask_uri(text)
    scheme, sep, rest = text.partition("://")
    if not sep or not scheme:
        raise ValueError(f"storage URI {shown!r} has no scheme (expected file:// or s3://)")
    scheme = scheme.lower()
    if scheme == "file":
        return _parse_file(rest, shown)
    if scheme == "s3":
        return _parse_s3(rest, shown)
    raise ValueError(f"storage URI {shown!r} has unknown scheme {scheme!r} (allowed: file, s3)")


def _parse_file(rest: str, shown: str) -> StorageURI:
    if not rest:
        raise ValueError(f"storage URI {shown!r} has no path")
    path = Path(rest).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    text = os.path.normpath(str(path))
    if rest.endswith("/") and text != "/":
        text += "/"  # keep a directory-style prefix for list()
    return StorageURI("file", "", text)


def _parse_s3(rest: str, shown: str) -> StorageURI:
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"storage URI {shown!r} has no bucket (expected s3://bucket/key)")
    if "@" in bucket or ":" in bucket:
        raise ValueError(f"storage URI {shown!r}: credentials or ports do not belong in an s3 URI")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"storage URI {shown!r} has an invalid bucket name {bucket!r}")
    return StorageURI("s3", bucket, key)


# --------------------------------------------------------------------------------------------
# the storage layer
# --------------------------------------------------------------------------------------------
class Storage:
    """Read/write/list objects at ``file://`` and ``s3://`` URIs (see module docstring)."""

    def __init__(
        self,
        *,
        root: str | None = None,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: SecretStr | str | None = None,
        secret_access_key: SecretStr | str | None = None,
        session_token: SecretStr | str | None = None,
        max_attempts: int = 4,
        retry_mode: str = "standard",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = 4,
    ) -> None:
        if retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(f"retry_mode: expected 'standard' or 'adaptive', got {retry_mode!r}")
        if max_attempts < 0:
            raise ValueError(f"max_attempts: must be >= 0, got {max_attempts}")
        self.root = str(parse_uri(root)) if root else None
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = tuple(as_secret(v) for v in (access_key_id, secret_access_key, session_token))
        self.max_attempts = max_attempts
        self.retry_mode = retry_mode
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.transfer_config = TransferConfig(
            multipart_threshold=int(multipart_threshold),
            multipart_chunksize=int(multipart_chunksize),
            max_concurrency=max_concurrency,
        )
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: SnapgenSettings, **overrides: Any) -> Storage:
        """A storage layer configured from ``settings``; ``overrides`` replace constructor
        arguments (e.g. ``multipart_threshold=5 * MIB`` in tests)."""
        options: dict[str, Any] = {
            "root": getattr(settings, "storage_root", None),
            "endpoint_url": getattr(settings, "s3_endpoint_url", None),
            "region": getattr(settings, "s3_region", "us-east-1"),
            "access_key_id": getattr(settings, "aws_access_key_id", None),
            "secret_access_key": getattr(settings, "aws_secret_access_key", None),
            "session_token": getattr(settings, "aws_session_token", None),
            "max_attempts": getattr(settings, "s3_max_attempts", 4),
            "retry_mode": getattr(settings, "s3_retry_mode", "standard"),
            "connect_timeout": getattr(settings, "s3_connect_timeout", 10.0),
            "read_timeout": getattr(settings, "s3_read_timeout", 60.0),
            "multipart_threshold": getattr(settings, "s3_multipart_threshold", DEFAULT_MULTIPART_THRESHOLD),
            "multipart_chunksize": getattr(settings, "s3_multipart_chunksize", DEFAULT_MULTIPART_CHUNKSIZE),
        }
        options.update(overrides)
        return cls(**options)

    def __repr__(self) -> str:
        return f"Storage(root={self.root!r}, endpoint_url={mask_uri(self.endpoint_url or '') or None!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without credentials (pickles can land in result storage or on other
        machines): an unpickled copy re-reads them from the environment (:func:`get_settings`,
        i.e. ``SNAPGEN_AWS_*``, the config file, then ``AWS_*``). The client and lock are rebuilt."""
        state = self.__dict__.copy()
        state["_client"], state["_lock"], state["_credentials"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- boto3 client
    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use, shared by threads)."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        if self._credentials is None:  # unpickled: credentials come from the environment
            self._credentials = _credentials_from_environment()
        key_id, secret, token = (secret_value(c) for c in self._credentials)
        config = Config(
            # botocore: max_attempts = retries after the first request (N + 1 attempts in all)
            retries={"max_attempts": self.max_attempts, "mode": self.retry_mode},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            signature_version="s3v4",
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        session = boto3.session.Session()
        log.debug("creating S3 client (endpoint=%s, region=%s)", mask_uri(self.endpoint_url or "aws"), self.region)
        return session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config,
            aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token,
        )

    # ---------------------------------------------------------------- URIs
    def join(self, base_uri: str, *parts: str) -> str:
        """``base_uri`` + ``/``-joined ``parts`` (no ``..`` segments allowed)."""
        base = str(parse_uri(base_uri)).rstrip("/")
        clean = []
        for part in parts:
            segments = [s for s in str(part).split("/") if s]
            if any(s in (".", "..") for s in segments):
                raise ValueError(f"join: path part {part!r} must not contain '.' or '..' segments")
            clean.extend(segments)
        return "/".join([base, *clean]) if clean else base

    def uri(self, *parts: str) -> str:
        """A URI under the configured ``storage_root``."""
        if self.root is None:
            raise ValueError("storage_root is not configured for this Storage")
        return self.join(self.root, *parts)

    def check_access(self, uri: str) -> None:
        """Fail at once when ``uri`` is on S3 and retrying could not help: no credentials
        (:class:`StorageCredentialsError`), access refused (:class:`StorageAccessError`) or no such
        bucket (:class:`NoSuchBucketError`). One HEAD of the bucket; ``file://`` URIs pass."""
        loc = parse_uri(uri)
        if loc.scheme != "s3":
            return
        try:
            self._call("access", loc, lambda: self.client.head_bucket(Bucket=loc.bucket))
        except NoSuchBucketError:
            raise
        except FileNotFoundError:  # HEAD has no body: a missing bucket is a bare 404
            raise NoSuchBucketError(f"access {loc} failed: bucket {loc.bucket!r} does not exist") from None

    # ---------------------------------------------------------------- writes
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomically write ``data`` to ``uri``."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            self._atomic_file_write(loc.path, lambda f: f.write(data))
        elif len(data) < self.transfer_config.multipart_threshold:
            self._call("write", loc, lambda: self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data))
        else:
            self._call("write", loc, lambda: self.client.upload_fileobj(
                io.BytesIO(data), loc.bucket, loc.key, Config=self.transfer_config))
        log.debug("wrote %d bytes to %s", len(data), loc)

    def write_text(self, uri: str, text: str, encoding: str = "utf-8") -> None:
        """Atomically write ``text``."""
        self.write_bytes(uri, text.encode(encoding))

    def write_json(self, uri: str, obj: Any, *, indent: int | None = 2) -> None:
        """Atomically write ``obj`` as UTF-8 JSON."""
        self.write_text(uri, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")

    def upload_file(self, local_path: str | Path, uri: str) -> None:
        """Atomically copy a local file to ``uri`` (multipart on S3 from the threshold on)."""
        source = Path(local_path)
        if not source.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such local file", str(source))
        loc = parse_uri(uri)
        if loc.scheme == "file":
            with source.open("rb") as src:
                self._atomic_file_write(loc.path, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))
        else:
            self._call("upload", loc, lambda: self.client.upload_file(
                str(source), loc.bucket, loc.key, Config=self.transfer_config))
        log.debug("uploaded %s to %s", source, loc)

    # ---------------------------------------------------------------- reads
    def read_bytes(self, uri: str) -> bytes:
        """The whole object. ``FileNotFoundError`` naming ``uri`` if missing."""
        with self.open_read(uri) as stream:
            return stream.read()

    def read_text(self, uri: str, encoding: str = "utf-8") -> str:
        """The object decoded as text."""
        return self.read_bytes(uri).decode(encoding)

    def read_json(self, uri: str) -> Any:
        """The object parsed as JSON."""
        return json.loads(self.read_bytes(uri))

    def open_read(self, uri: str) -> BinaryIO:
        """A binary stream (a file, or an S3 object body that resumes with a ranged GET when the
        connection breaks mid-body, see :class:`_S3Reader`); close it when done."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            return self._open_local(loc)
        response = self._call("read", loc, lambda: self.client.get_object(Bucket=loc.bucket, Key=loc.key))
        return io.BufferedReader(_S3Reader(self, loc, response), buffer_size=_COPY_CHUNK)

    def download_file(self, uri: str, local_path: str | Path) -> Path:
        """Atomically copy ``uri`` to ``local_path`` (parents created); returns the path."""
        loc = parse_uri(uri)
        target = Path(local_path)
        if loc.scheme == "file":
            with self._open_local(loc) as src:
                self._atomic_file_write(target, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))
        else:
            self._head(loc)  # FileNotFoundError before any local file is touched
            self._atomic_file_write(target, lambda f: self._download_into(loc, f))
        return target

    # ---------------------------------------------------------------- metadata
    def exists(self, uri: str) -> bool:
        """Whether an object exists at ``uri`` (folders are not objects)."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            return loc.path.is_file()
        try:
            self._head(loc)
        except FileNotFoundError:
            return False
        return True

    def size(self, uri: str) -> int:
        """Object size in bytes."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            if not loc.path.is_file():
                self._raise_missing(loc)
            return loc.path.stat().st_size
        return int(self._head(loc)["ContentLength"])

    def sha256(self, uri: str) -> str:
        """Hex SHA-256 of the object's content (streamed)."""
        digest = hashlib.sha256()
        with self.open_read(uri) as stream:
            for chunk in iter(lambda: stream.read(_COPY_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def list(self, prefix_uri: str) -> list[str]:
        """Full URIs of all objects whose URI starts with ``prefix_uri`` (recursive, sorted).
        A prefix ending in ``/`` lists a folder."""
        loc = parse_uri(prefix_uri)
        if loc.scheme == "file":
            return sorted(self._list_local(loc))
        return sorted(self._list_s3(loc))

    def delete(self, uri: str, *, missing_ok: bool = True) -> None:
        """Delete one object (idempotent unless ``missing_ok=False``)."""
        loc = parse_uri(uri)
        if not missing_ok and not self.exists(uri):
            self._raise_missing(loc)
        if loc.scheme == "file":
            loc.path.unlink(missing_ok=True)
        else:
            self._call("delete", loc, lambda: self.client.delete_object(Bucket=loc.bucket, Key=loc.key))
        log.debug("deleted %s", loc)

    # ---------------------------------------------------------------- file:// helpers
    @staticmethod
    def _raise_missing(loc: StorageURI) -> NoReturn:
        raise _not_found(str(loc))

    def _open_local(self, loc: StorageURI) -> BinaryIO:
        if not loc.path.is_file():
            self._raise_missing(loc)
        try:
            return loc.path.open("rb")
        except FileNotFoundError:
            self._raise_missing(loc)

    @staticmethod
    def _atomic_file_write(target: Path, write: Any) -> None:
        """Call ``write(f)`` on a temp file next to ``target``, fsync, then ``os.replace``."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:100]}.", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    @staticmethod
    def _list_local(loc: StorageURI) -> Iterator[str]:
        path_prefix = loc.key
        folder = Path(path_prefix) if path_prefix.endswith("/") else Path(path_prefix).parent
        if Path(path_prefix).is_file():
            yield f"file://{path_prefix}"
        if not folder.is_dir():
            return
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                full = os.path.join(dirpath, name)
                if not name.endswith(_TMP_SUFFIX) and full.startswith(path_prefix) and full != path_prefix:
                    yield f"file://{full}"

    # ---------------------------------------------------------------- s3:// helpers
    def _head(self, loc: StorageURI) -> dict[str, Any]:
        return self._call("stat", loc, lambda: self.client.head_object(Bucket=loc.bucket, Key=loc.key))

    def _download_into(self, loc: StorageURI, handle: BinaryIO) -> None:
        self._call("download", loc, lambda: self.client.download_fileobj(
            loc.bucket, loc.key, handle, Config=self.transfer_config))

    def _list_s3(self, loc: StorageURI) -> builtins.list[str]:
        def keys() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key)
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

        found = self._call("list", loc, keys)
        return [f"s3://{loc.bucket}/{key}" for key in found if not key.endswith("/")]  # no folder markers

    def _call(self, op: str, loc: StorageURI, fn: Callable[[], T]) -> T:
        """Run one S3 call; translate botocore/boto3 errors into scrubbed ``FileNotFoundError``
        or :class:`StorageError`. The new error is raised outside the ``except`` block, so it
        carries no chained botocore exception (whose response can hold the access key id)."""
        try:
            return fn()
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            error = self._translate(op, loc, exc)
        raise error

    def _translate(self, op: str, loc: StorageURI, exc: BaseException) -> OSError:
        """The exception to raise instead of ``exc``."""
        cause = exc
        if isinstance(exc, S3UploadFailedError):
            cause = exc.__cause__ or exc.__context__ or exc
        uri = str(loc)
        if isinstance(cause, ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", "")) or str(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return NoSuchBucketError(f"{op} {uri} failed: bucket {loc.bucket!r} does not exist")
            if code in _NOT_FOUND_CODES or status == 404:
                return _not_found(uri)
            message = self._scrub(f"{op} {uri} failed: {code} (HTTP {status}): {err.get('Message', '')}")
            if code in _ACCESS_CODES or status == 403:
                return StorageAccessError(message)
            return StorageError(message)
        message = self._scrub(f"{op} {uri} failed: {type(cause).__name__}: {cause}")
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
            return StorageCredentialsError(
                f"{op} {uri} failed: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or SNAPGEN_AWS_ACCESS_KEY_ID and SNAPGEN_AWS_SECRET_ACCESS_KEY)")
        if isinstance(cause, BotoConnectionError):
            return StorageUnavailableError(message)
        return StorageError(message)

    def _scrub(self, text: str) -> str:
        """``text`` with every configured credential (and URI passwords) masked."""
        values = [secret_value(secret) for secret in self._credentials or ()]
        values += [os.environ.get(name) for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")]
        for value in values:
            if value and len(value) >= _MIN_SCRUB_LEN:
                text = text.replace(value, MASK)
        return mask_uri(text) if "://" in text and "@" in text else text


class _S3Reader(io.RawIOBase):
    """An S3 object body that survives a broken connection: on a streaming error (reset, body cut
    short of Content-Length, read timeout) it re-requests the rest with ``Range: bytes=<pos>-`` and
    ``If-Match: <ETag>`` (so a replaced object is never spliced in), up to the storage's
    ``max_attempts`` times with exponential backoff; then it raises :class:`StorageUnavailableError`
    naming the URI. A short read is never returned as the whole object."""

    def __init__(self, storage: Storage, loc: StorageURI, response: dict[str, Any]) -> None:
        super().__init__()
        self._storage, self._loc = storage, loc
        self._body = response["Body"]
        self._etag = response.get("ETag")
        self._size = response.get("ContentLength")
        self._pos = 0
        self._failures = 0

    def readable(self) -> bool:
        return True

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes (b"" only at the real end of the object), resuming on breaks."""
        while True:
            try:
                data = self._body.read(size)
            except _STREAM_ERRORS as exc:
                self._resume(exc)
                continue
            if not data and size and self._size is not None and self._pos < self._size:
                self._resume(IncompleteReadError(actual_bytes=self._pos, expected_bytes=self._size))
                continue
            self._pos += len(data)
            return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self._read(_COPY_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def _resume(self, exc: BaseException) -> None:
        import random
        import time

        self._failures += 1
        uri = str(self._loc)
        if self._failures > max(1, self._storage.max_attempts):
            message = self._storage._scrub(f"read {uri} failed at byte {self._pos} after {self._failures} "
                                           f"interrupted attempts: {type(exc).__name__}: {exc}")
            raise StorageUnavailableError(message) from None
        log.info("read %s interrupted at byte %d (%s); resuming", uri, self._pos, type(exc).__name__)
        time.sleep(min(8.0, 0.2 * 2 ** (self._failures - 1)) * (0.5 + random.random() / 2))
        self._close_body()
        extra = {"IfMatch": self._etag} if self._etag else {}
        response = self._storage._call("read", self._loc, lambda: self._storage.client.get_object(
            Bucket=self._loc.bucket, Key=self._loc.key, Range=f"bytes={self._pos}-", **extra))
        self._body = response["Body"]

    def _close_body(self) -> None:
        try:
            self._body.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


def storage() -> Storage:
    """The project's storage as the current settings configure it (the one place tasks get it from)."""
    from tasks.settings import get_settings

    return Storage.from_settings(get_settings())


def _credentials_from_environment() -> tuple[SecretStr | None, ...]:
    """(key id, secret, session token) from the settings sources (env, config file, AWS_*)."""
    from tasks.settings import get_settings

    settings = get_settings()
    return (settings.aws_access_key_id, settings.aws_secret_access_key, settings.aws_session_token)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "Storage", "StorageURI", "StorageError", "StorageAccessError", "StorageUnavailableError", "parse_uri",
]
