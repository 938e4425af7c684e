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
    retries={"max_attempts": 3, "mode": "standard"},
    connect_timeout=2,
    read_timeout=4,
    max_pool_connections=32,
)

_lock = threading.Lock()
_clients: dict[str, Any] = {}


def _client(service: str) -> Any:
    client = _clients.get(service)
    if client is None:
        with _lock:
            client = _clients.get(service)
            if client is None:
                client = boto3.session.Session().client(service, config=CLIENT_CONFIG)  # type: ignore[call-overload]
                _clients[service] = client
    return client


def s3_client() -> S3Client:
    """The shared S3 client."""
    return _client("s3")  # type: ignore[no-any-return]


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
