"""AWS clients, created lazily and once per execution environment.

Endpoints come from the standard ``AWS_ENDPOINT_URL`` (botocore reads it), so the same code
talks to AWS or to a moto server. Clients are module-level singletons so cold start pays for
them once; :func:`reset_clients` drops them (SnapStart restore, tests that start moto late).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

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


def reset_clients() -> None:
    """Forget every client; the next call creates fresh ones (after a SnapStart restore)."""
    with _lock:
        _clients.clear()
