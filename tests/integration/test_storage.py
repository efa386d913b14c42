"""tasks.storage against file:// (tmp_path) and a real SeaweedFS S3 server."""
from __future__ import annotations

import hashlib
import os
import pickle
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from tasks.settings import get_settings
from tasks.storage import (
    Storage,
    StorageAccessError,
    StorageUnavailableError,
    parse_uri,
)
from tests.fixtures.seaweed import SeaweedS3, free_ports

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
TMP_SUFFIX = ".snapgen-tmp"


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    """(storage, a fresh root URI) for each scheme."""
    if request.param == "file":
        settings = get_settings(home=tmp_path / "home")
    else:
        settings = request.getfixturevalue("s3_settings")
    root = f"{settings.storage_root}/{uuid.uuid4().hex[:8]}"
    return Storage.from_settings(settings), root


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that cover every byte value."""
    block = bytes(range(256)) + hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _local_tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TMP_SUFFIX)]


# ---------------------------------------------------------------------------- round trips
def test_bytes_text_json_round_trip(backend: tuple[Storage, str]) -> None:
    store, root = backend
    data = _payload(70_000)
    store.write_bytes(store.join(root, "blob.bin"), data)
    store.write_text(store.join(root, "note.txt"), "héllo ✓\n")
    store.write_json(store.join(root, "cfg", "m.json"), {"a": [1, 2.5, None], "b": "ü"})

    assert store.read_bytes(f"{root}/blob.bin") == data
    assert store.read_text(f"{root}/note.txt") == "héllo ✓\n"
    assert store.read_json(f"{root}/cfg/m.json") == {"a": [1, 2.5, None], "b": "ü"}
    assert store.size(f"{root}/blob.bin") == len(data)
    assert store.sha256(f"{root}/blob.bin") == hashlib.sha256(data).hexdigest()
    with store.open_read(f"{root}/blob.bin") as stream:
        head = stream.read(1000)
        rest = stream.read()
    assert head + rest == data and len(head) == 1000


def test_overwrite_replaces_content(backend: tuple[Storage, str]) -> None:
    store, root = backend
    uri = f"{root}/x.bin"
    store.write_bytes(uri, b"first version, longer")
    store.write_bytes(uri, b"second")
    assert store.read_bytes(uri) == b"second"
    assert store.size(uri) == 6


def test_upload_and_download_file(backend: tuple[Storage, str], tmp_path: Path) -> None:
    store, root = backend
    source = tmp_path / "src.bin"
    source.write_bytes(_payload(300_000, seed=1))
    uri = f"{root}/files/src.bin"
    store.upload_file(source, uri)
    target = tmp_path / "out" / "nested" / "copy.bin"
    assert store.download_file(uri, target) == target
    assert target.read_bytes() == source.read_bytes()
    assert store.sha256(uri) == hashlib.sha256(source.read_bytes()).hexdigest()
    assert not _local_tmp_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-local"):
        store.upload_file(tmp_path / "no-such-local.bin", f"{root}/y")


def test_list_exists_delete_size(backend: tuple[Storage, str]) -> None:
    store, root = backend
    names = ["a/1.txt", "a/2.txt", "a/b/3.txt", "ab/4.txt", "other/5.txt"]
    for i, name in enumerate(names):
        store.write_text(f"{root}/{name}", "x" * (i + 1))

    assert store.list(f"{root}/a/") == [f"{root}/a/1.txt", f"{root}/a/2.txt", f"{root}/a/b/3.txt"]
    assert store.list(f"{root}/a") == [f"{root}/{n}" for n in names[:4]]  # a string prefix
    assert store.list(f"{root}/") == [f"{root}/{n}" for n in names]
    assert store.list(f"{root}/missing/") == []
    assert store.exists(f"{root}/a/2.txt") and not store.exists(f"{root}/a/9.txt")
    assert not store.exists(f"{root}/a")  # a folder is not an object
    assert store.size(f"{root}/ab/4.txt") == 4

    store.delete(f"{root}/a/2.txt")
    assert not store.exists(f"{root}/a/2.txt")
    assert store.list(f"{root}/a/") == [f"{root}/a/1.txt", f"{root}/a/b/3.txt"]
    store.delete(f"{root}/a/2.txt")  # idempotent
    with pytest.raises(FileNotFoundError, match="a/2.txt"):
        store.delete(f"{root}/a/2.txt", missing_ok=False)


def test_join_and_root(backend: tuple[Storage, str]) -> None:
    store, root = backend
    assert store.join(root, "x", "y/z.bin") == f"{root}/x/y/z.bin"
    assert store.join(root + "/", "/x/") == f"{root}/x"
    assert store.uri("k") == f"{store.root}/k"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        store.join(root, "../escape")


# ---------------------------------------------------------------------------- missing objects
@pytest.mark.parametrize(
    "call",
    [
        lambda s, u, d: s.read_bytes(u),
        lambda s, u, d: s.read_text(u),
        lambda s, u, d: s.read_json(u),
        lambda s, u, d: s.open_read(u),
        lambda s, u, d: s.size(u),
        lambda s, u, d: s.sha256(u),
        lambda s, u, d: s.download_file(u, d / "dl.bin"),
    ],
    ids=["read_bytes", "read_text", "read_json", "open_read", "size", "sha256", "download_file"],
)
def test_missing_object_raises_file_not_found_naming_the_uri(
    backend: tuple[Storage, str], tmp_path: Path, call: Callable[[Storage, str, Path], Any]
) -> None:
    store, root = backend
    uri = f"{root}/does/not/exist.bin"
    with pytest.raises(FileNotFoundError) as info:
        call(store, uri, tmp_path)
    assert uri in str(info.value) and info.value.filename == uri
    assert not (tmp_path / "dl.bin").exists()


def test_missing_bucket_is_file_not_found(s3_settings: Any) -> None:
    store = Storage.from_settings(s3_settings)
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/k.bin"
    with pytest.raises(FileNotFoundError, match=uri):
        store.read_bytes(uri)
    assert store.exists(uri) is False


# ---------------------------------------------------------------------------- URIs
@pytest.mark.parametrize(
    "uri,needle",
    [
        ("", "non-empty"),
        ("relative/path.bin", "has no scheme"),
        ("/abs/path.bin", "has no scheme"),
        ("ftp://host/x.bin", "unknown scheme 'ftp'"),
        ("s3://", "has no bucket"),
        ("s3:///key.bin", "has no bucket"),
        ("s3://Bad_Bucket/key", "invalid bucket name"),
        ("file://", "has no path"),
    ],
)
def test_malformed_uris_raise_value_error_naming_them(uri: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        parse_uri(uri)
    assert repr(uri) in str(info.value)
    store = Storage.from_settings(get_settings(home=tmp_path))
    with pytest.raises(ValueError):
        store.read_bytes(uri)


def test_uri_credentials_are_masked_in_errors() -> None:
    with pytest.raises(ValueError) as info:
        parse_uri("ftp://user:hunter2@host/x")
    assert "hunter2" not in str(info.value) and "ftp://user:***@host/x" in str(info.value)


def test_relative_file_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = parse_uri("file://rel/dir/x.bin")
    assert loc.path == tmp_path / "rel" / "dir" / "x.bin" and str(loc) == f"file://{tmp_path}/rel/dir/x.bin"
    assert parse_uri("s3://bucket-1/a/b.bin").bucket == "bucket-1"
    assert parse_uri("s3://bucket-1/a/b.bin").key == "a/b.bin"
    store = Storage.from_settings(get_settings(home=tmp_path))
    store.write_bytes("file://rel/dir/x.bin", b"rel")
    assert (tmp_path / "rel" / "dir" / "x.bin").read_bytes() == b"rel"


# ---------------------------------------------------------------------------- atomicity
def test_file_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = Storage.from_settings(get_settings(home=tmp_path))
    root = f"file://{tmp_path}/data"
    for i in range(5):
        store.write_bytes(f"{root}/obj.bin", _payload(1000 * (i + 1), seed=i))
        store.write_json(f"{root}/meta.json", {"i": i})
    src = tmp_path / "src.bin"
    src.write_bytes(b"s" * 5000)
    store.upload_file(src, f"{root}/up.bin")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json", "obj.bin", "up.bin"]
    assert store.read_json(f"{root}/meta.json") == {"i": 4}


def test_failed_file_write_keeps_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage.from_settings(get_settings(home=tmp_path))
    uri = f"file://{tmp_path}/data/obj.bin"
    store.write_bytes(uri, b"old content")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        store.write_bytes(uri, b"new content that must not be half-visible")
    monkeypatch.undo()
    assert store.read_bytes(uri) == b"old content"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["obj.bin"]
    assert store.list(f"file://{tmp_path}/data/") == [uri]


# ---------------------------------------------------------------------------- multipart (S3)
def _multipart_store(s3_settings: Any) -> Storage:
    return Storage.from_settings(s3_settings, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)


def test_multipart_round_trip(s3_settings: Any, seaweed_s3: SeaweedS3, tmp_path: Path) -> None:
    store = _multipart_store(s3_settings)
    data = os.urandom(12 * MIB + 12345)  # 3 parts of 5 MiB
    digest = hashlib.sha256(data).hexdigest()
    uri = store.uri("big", "blob.bin")
    store.write_bytes(uri, data)
    loc = parse_uri(uri)
    head = seaweed_s3.client().head_object(Bucket=loc.bucket, Key=loc.key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # really a 3-part upload
    assert store.sha256(uri) == digest and store.read_bytes(uri) == data

    source = tmp_path / "big.bin"
    source.write_bytes(data)
    file_uri = store.uri("big", "file.bin")
    store.upload_file(source, file_uri)
    file_etag = seaweed_s3.client().head_object(Bucket=loc.bucket, Key=parse_uri(file_uri).key)["ETag"]
    assert file_etag.strip('"').endswith("-3"), file_etag
    out = store.download_file(file_uri, tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest

    small = store.uri("small.bin")
    store.write_bytes(small, b"tiny")
    small_etag = seaweed_s3.client().head_object(Bucket=loc.bucket, Key=parse_uri(small).key)["ETag"]
    assert "-" not in small_etag and small_etag.strip('"') == hashlib.md5(b"tiny").hexdigest()


def test_failed_multipart_upload_is_aborted_and_invisible(s3_settings: Any, seaweed_s3: SeaweedS3) -> None:
    store = _multipart_store(s3_settings)
    uri = store.uri("broken", "blob.bin")
    loc = parse_uri(uri)
    parts_sent: list[int] = []

    def fail_second_part(params: dict[str, Any], **_: Any) -> None:
        parts_sent.append(params["PartNumber"])
        if len(parts_sent) >= 2:
            raise RuntimeError("injected network failure during part upload")

    store.transfer_config.use_threads = False  # deterministic part order
    store.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    with pytest.raises(RuntimeError, match="injected"):
        store.write_bytes(uri, os.urandom(12 * MIB))
    assert len(parts_sent) == 2
    assert not store.exists(uri) and store.list(store.uri("broken/")) == []
    pending = seaweed_s3.client().list_multipart_uploads(Bucket=loc.bucket).get("Uploads", [])
    assert [u for u in pending if u["Key"] == loc.key] == []


# ---------------------------------------------------------------------------- credentials
def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)


def _capture(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever comes out
        return exc
    raise AssertionError("expected the call to fail")


def test_secret_never_appears_in_errors_or_logs(
    s3_settings: Any, seaweed_s3: SeaweedS3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = Storage.from_settings(s3_settings)
    uri = good.uri("guarded.bin")
    good.write_bytes(uri, b"payload")
    sentinel_secret = f"SENTINEL-SECRET-{uuid.uuid4().hex}"
    sentinel_key = f"SENTINELKEY{uuid.uuid4().hex[:8].upper()}"
    wrong_secret = Storage.from_settings(s3_settings, secret_access_key=sentinel_secret)
    wrong_key = Storage.from_settings(s3_settings, access_key_id=sentinel_key, secret_access_key=sentinel_secret)
    local = tmp_path / "l.bin"
    local.write_bytes(b"l" * 100)

    caplog.set_level("DEBUG")
    errors = []
    for store in (wrong_secret, wrong_key):
        for call in (
            lambda: store.read_bytes(uri), lambda: store.write_bytes(uri, b"x"), lambda: store.exists(uri),
            lambda: store.list(good.uri("")), lambda: store.size(uri), lambda: store.upload_file(local, uri),
            lambda: store.download_file(uri, tmp_path / "d.bin"), lambda: store.delete(uri),
        ):
            errors.append(_capture(call))
    for exc in errors:
        assert isinstance(exc, StorageAccessError) and isinstance(exc, PermissionError), repr(exc)
        text = _error_text(exc)
        assert uri in text or good.uri("") in text
        assert "SignatureDoesNotMatch" in text or "InvalidAccessKeyId" in text or "403" in text, text
        assert sentinel_secret not in text and sentinel_key not in text, text
        assert exc.__cause__ is None and exc.__context__ is None  # no botocore response attached
    assert sentinel_secret not in caplog.text  # not even in botocore's DEBUG logs
    assert not any(sentinel_key in r.getMessage() for r in caplog.records if r.name.startswith("tasks"))
    assert good.read_bytes(uri) == b"payload"  # nothing was overwritten or deleted
    for store in (wrong_secret, wrong_key):
        assert sentinel_secret not in repr(store) and sentinel_secret not in repr(pickle.dumps(store))


def test_pickle_drops_credentials_and_rereads_them_from_env(
    s3_settings: Any, seaweed_s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage.from_settings(s3_settings)
    uri = store.uri("p.bin")
    store.write_bytes(uri, b"pickled")
    blob = pickle.dumps(store)
    assert seaweed_s3.secret_key.encode() not in blob and seaweed_s3.access_key.encode() not in blob
    for name in list(os.environ):
        if name.startswith(("SNAPGEN_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SNAPGEN_AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("SNAPGEN_AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    clone = pickle.loads(blob)
    assert clone.read_bytes(uri) == b"pickled" and clone.root == store.root


def test_unreachable_endpoint_raises_connection_error_naming_uri(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    settings = get_settings(home=tmp_path, storage_root="s3://some-bucket/p",
                            s3_endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="k",
                            aws_secret_access_key="s", s3_max_attempts=1, s3_connect_timeout=1)
    store = Storage.from_settings(settings)
    with pytest.raises(StorageUnavailableError, match="s3://some-bucket/p/x.bin") as info:
        store.read_bytes("s3://some-bucket/p/x.bin")
    assert isinstance(info.value, ConnectionError)


def test_client_config_retries_and_timeouts(s3_settings: Any) -> None:
    store = Storage.from_settings(s3_settings, max_attempts=7, retry_mode="adaptive", connect_timeout=3)
    config = store.client.meta.config
    assert config.retries == {"total_max_attempts": 8, "mode": "adaptive"}  # 7 retries + the first
    assert config.connect_timeout == 3 and config.read_timeout == s3_settings.s3_read_timeout
    assert store.client.meta.endpoint_url == s3_settings.s3_endpoint_url
