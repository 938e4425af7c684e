"""AWS clients, created lazily and once per execution environment, and the one adapter from
botocore's errors to treeserve's.

Endpoints come from the standard ``AWS_ENDPOINT_URL`` (botocore reads it), so the same code
talks to AWS or to a moto server. Clients are module-level singletons so cold start pays for
them once; :func:`reset_clients` drops them (SnapStart restore, tests that start moto late).

:func:`s3_errors` is the only place that reads botocore's error codes: the registry, the
refresh function reading an upload and monitoring reading captures all go through it, so a 403
means the same thing everywhere (:class:`~treeserve.errors.StorageAccessDenied`, a setup
problem) and so does a throttle (:class:`~treeserve.errors.StorageUnavailable`, retry).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from treeserve.errors import (
    BucketNotFound,
    ConfigurationError,
    NotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
    TreeserveError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

# Bounded retries and timeouts: an invocation must fail cleanly well inside its own timeout.
# Worst case per call: 3 attempts x (2 s connect + 4 s between bytes) = 18 s, under the
# inference function's 20 s timeout (API Gateway's own limit is 30 s).
CLIENT_CONFIG = Config(
    retries={"total_max_attempts": 3, "mode": "standard"},  # ("max_attempts" counts retries)
    connect_timeout=2,
    read_timeout=4,
    max_pool_connections=32,
)

# Capture writes run inside the request that crosses the batch bound: S3 trouble must cost
# that request a few seconds at most (2 x (1 + 2) s), never the function's timeout. A lost
# batch is within capture's documented loss bound; a 5xx for valid input is not.
CAPTURE_CLIENT_CONFIG = Config(
    retries={"total_max_attempts": 2, "mode": "standard"},
    connect_timeout=1,
    read_timeout=2,
    max_pool_connections=4,
)

_lock = threading.Lock()
_clients: dict[str, Any] = {}


def _client(service: str, config: Config = CLIENT_CONFIG, key: str | None = None) -> Any:
    key = key or service
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = boto3.session.Session().client(service, config=config)  # type: ignore[call-overload]
                _clients[key] = client
    return client


def s3_client() -> S3Client:
    """The shared S3 client."""
    return _client("s3")  # type: ignore[no-any-return]


def capture_s3_client() -> S3Client:
    """An S3 client with few retries and short timeouts, for writes on the request path."""
    return _client("s3", CAPTURE_CLIENT_CONFIG, key="s3-capture")  # type: ignore[no-any-return]


def sns_client() -> SNSClient:
    """The shared SNS client."""
    return _client("sns")  # type: ignore[no-any-return]


def sqs_client() -> SQSClient:
    """The shared SQS client."""
    return _client("sqs")  # type: ignore[no-any-return]


def sfn_client() -> Any:
    """The shared Step Functions client."""
    return _client("stepfunctions")


def reset_clients() -> None:
    """Forget every client; the next call creates fresh ones (after a SnapStart restore)."""
    with _lock:
        _clients.clear()


# --- botocore's errors as treeserve's ----------------------------------------------------------

_NOT_FOUND = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_RETRYABLE = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "OperationAborted",
}


@contextmanager
def s3_errors(
    bucket: str, key: str = "", *, absent_is: type[TreeserveError] = NotFound
) -> Iterator[None]:
    """Turn botocore's errors inside the block into treeserve's: NotFound (or ``absent_is``),
    PreconditionFailed, BucketNotFound, StorageAccessDenied, StorageUnavailable (retryable),
    ConfigurationError (no credentials or region), and StorageError for anything else."""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        where = f"s3://{bucket}/{key}"
        if code == "NoSuchBucket":
            raise BucketNotFound(
                f"bucket {bucket!r} does not exist: create it, or point --bucket/MODEL_BUCKET "
                "at the model bucket (and AWS_ENDPOINT_URL at its endpoint)"
            ) from None
        if code in _PRECONDITION or status in (409, 412):
            raise PreconditionFailed(f"{where}: condition did not hold ({code})") from None
        if code in _NOT_FOUND or status == 404:
            raise absent_is(f"{where} does not exist") from None
        if code in _DENIED or status == 403:
            raise StorageAccessDenied(
                f"access denied to {where} ({code}): use credentials allowed to use "
                f"s3://{bucket}/ (check AWS_PROFILE, the function's role and the bucket policy)"
            ) from None
        if code in _RETRYABLE or status >= 500 or status == 429:
            raise StorageUnavailable(f"S3 is unavailable for {where} ({code}); retry") from exc
        raise StorageError(
            f"S3 refused an operation on {where}: {code} {err.get('Message', '')}"
        ) from exc
    except (NoCredentialsError, PartialCredentialsError):
        raise ConfigurationError(
            "no AWS credentials found: configure them (aws configure, AWS_PROFILE, or "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ) from None
    except NoRegionError:
        raise ConfigurationError(
            "no AWS region configured: set AWS_REGION or AWS_DEFAULT_REGION (e.g. us-east-1)"
        ) from None
    except ParamValidationError as exc:
        raise ConfigurationError(f"S3 refused the request for s3://{bucket}/{key}: {exc}") from None
    except BotoCoreError as exc:
        # Connection refused or reset, timeouts, truncated bodies: all worth a retry.
        raise StorageUnavailable(
            f"cannot reach S3 for s3://{bucket}/{key}: {exc} (check the network, or "
            "AWS_ENDPOINT_URL if you use a local endpoint)"
        ) from exc
