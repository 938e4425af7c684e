"""Fault injection for S3 calls made through a boto3 client, with botocore event hooks.

``S3Faults(client)`` registers a ``before-send.s3`` handler on that client. Handlers registered
on the more specific ``before-send.s3`` run before moto's catch-all ``before-send`` stub, so a
fault decides first, and faults happen inside botocore's retry loop exactly as a real network or
service failure would: every attempt (first try and each retry) is one "send" here.

Fault kinds:
- ``slowdown``: HTTP 503 ``SlowDown`` (S3 throttling); the request is not applied.
- ``internal``: HTTP 500 ``InternalError``; the request is not applied.
- ``timeout``: ``ReadTimeoutError`` before the request reaches the store (not applied).
- ``connect``: ``EndpointConnectionError`` (not applied).
- ``lost_response``: the request IS applied (moto runs it), then the response is lost as a
  ``ReadTimeoutError``: the ambiguous failure a retried conditional write must survive.

Call :func:`no_backoff` so botocore's retries do not sleep (the retries themselves still run).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

FaultKind = Literal["slowdown", "internal", "timeout", "connect", "lost_response"]
KINDS: tuple[FaultKind, ...] = ("slowdown", "internal", "timeout", "connect", "lost_response")

_ERROR_BODIES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class _Raw:
    """The minimal urllib3-like body botocore reads an AWSResponse from."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


@dataclass
class Fault:
    """One rule: which calls fail, how, and how many more times (None: every time)."""

    kind: FaultKind
    operations: frozenset[str] | None = None  # e.g. {"GetObject"}; None: every operation
    key_contains: str | None = None  # substring of the object key; None: any key
    times: int | None = None
    methods: frozenset[str] | None = None  # e.g. {"PUT"}
    # Fail only the call-th matching API call (0-based), every attempt of it (botocore marks
    # the attempts of one call with the same amz-sdk-invocation-id).
    call: int | None = None
    _calls_seen: int = 0
    _failing: str | None = None

    def filters(self, operation: str, key: str, method: str) -> bool:
        if self.operations is not None and operation not in self.operations:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.key_contains is None or self.key_contains in key

    def matches(self, operation: str, key: str, method: str, invocation: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if not self.filters(operation, key, method):
            return False
        if self.call is None:
            return True
        if self._failing is not None:
            return invocation == self._failing
        index = self._calls_seen
        self._calls_seen += 1
        if index == self.call:
            self._failing = invocation
            return True
        return False


@dataclass
class S3Faults:
    """Inject S3 faults on one client; count what was sent and what was injected."""

    client: Any
    faults: list[Fault] = field(default_factory=list)
    injected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, operation)
    sent: Counter[str] = field(default_factory=Counter)  # operation -> attempts
    log: list[tuple[str, str]] = field(default_factory=list)  # (operation, key) per attempt
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client.meta.events.register("before-send.s3", self._before_send)

    def add(
        self,
        kind: FaultKind,
        *,
        operations: set[str] | None = None,
        key_contains: str | None = None,
        times: int | None = None,
        methods: set[str] | None = None,
        call: int | None = None,
    ) -> Fault:
        fault = Fault(
            kind,
            frozenset(operations) if operations else None,
            key_contains,
            times,
            frozenset(methods) if methods else None,
            call,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def detach(self) -> None:
        self.clear()
        self.client.meta.events.unregister("before-send.s3", self._before_send)

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def _before_send(
        self, request: AWSPreparedRequest, event_name: str, **_: Any
    ) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        parts = urlsplit(request.url)
        key = unquote(parts.path)
        if parts.query:
            key += "?" + unquote(parts.query)  # ListObjectsV2: the prefix is in the query
        invocation = str(request.headers.get("amz-sdk-invocation-id", ""))
        with self._lock:
            self.sent[operation] += 1
            self.log.append((operation, key))
            fault = next(
                (f for f in self.faults if f.matches(operation, key, request.method, invocation)),
                None,
            )
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
            self.injected[(fault.kind, operation)] += 1
        if fault.kind == "timeout":
            raise ReadTimeoutError(endpoint_url=request.url)
        if fault.kind == "connect":
            raise EndpointConnectionError(endpoint_url=request.url)
        if fault.kind == "lost_response":
            from moto.core.models import botocore_stubber

            botocore_stubber(event_name=event_name, request=request)  # applied ...
            raise ReadTimeoutError(endpoint_url=request.url)  # ... but the answer is lost
        status, code, message = _ERROR_BODIES[fault.kind]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>FAULTINJECTED</RequestId></Error>"
        ).encode()
        # Point the request elsewhere so moto's stub (called after us) does not apply it: an
        # injected 5xx means the store never saw the request.
        request.url = "http://fault-injected.invalid/"
        return AWSResponse(parts.geturl(), status, {"Content-Type": "application/xml"}, _Raw(body))


def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore retries without sleeping between attempts (tests stay fast; retries still run)."""
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
