"""Permanent storage errors are not retried: missing credentials, 403 and NoSuchBucket fail the I/O task
at once (StorageError subclasses OSError, which was retried as if transient); a dropped connection is
still retried. The errors are raised by a real Storage against an endpoint with no credentials and
classified as tasks.defaults does for Prefect's retry condition."""
from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from prefect import flow, task

from tasks import defaults
from tasks.storage import (NoSuchBucketError, PermanentStorageError, Storage, StorageAccessError,
                           StorageCredentialsError, StorageError, StorageUnavailableError)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("exc", [
    StorageCredentialsError("no S3 credentials"), StorageAccessError("403"), NoSuchBucketError("no bucket"),
    NoCredentialsError(), _client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404),
])
def test_permanent_storage_errors_are_not_io_errors(exc: BaseException) -> None:
    assert defaults.is_io_error(exc) is False


@pytest.mark.parametrize("exc", [StorageError("write failed: 500"), StorageUnavailableError("connection refused"),
                                 ConnectionError("reset"), _client_error("SlowDown", 503)])
def test_transient_storage_errors_are_still_retried(exc: BaseException) -> None:
    assert defaults.is_io_error(exc) is True


def test_storage_without_credentials_raises_a_permanent_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"SNAPGEN_{name}", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = Storage(endpoint_url="http://127.0.0.1:9", max_attempts=0)
    with pytest.raises(StorageCredentialsError, match="no S3 credentials") as info:
        store.write_bytes("s3://bucket/key", b"x")
    assert isinstance(info.value, PermanentStorageError) and not defaults.is_io_error(info.value)


def test_an_io_task_failing_for_missing_credentials_runs_once(prefect_harness: float, tmp_path: Any) -> None:
    calls: list[int] = []

    @task(**defaults.io_task_options(retry_delay_seconds=0))
    def upload() -> None:
        calls.append(1)
        raise StorageCredentialsError("write s3://bucket/key failed: no S3 credentials")

    @flow
    def pipeline() -> None:
        upload()

    with pytest.raises(StorageCredentialsError):
        pipeline()
    assert len(calls) == 1  # was 4: 1 try + IO_RETRIES retries
