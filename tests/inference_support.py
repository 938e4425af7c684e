"""Helpers for the inference tests: manifests for fixture models, API Gateway events.

Events follow the shapes API Gateway and Lambda send (and `sam local generate-event` writes):
HTTP API payload 2.0, REST API (payload 1.0) and Function URL (2.0 shape, lambda-url domain).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import xgboost as xgb

from tests.conftest import TrainedModel
from treeserve.model.manifest import SMOKE_CHECK_ROWS, ModelManifest, smoke_check_record, task_of


def manifest_for(
    model: TrainedModel,
    *,
    name: str = "default",
    class_names: list[Any] | None = None,
    threshold: float | None = None,
    ubj: bytes | None = None,
    smoke_check: bool = True,
) -> ModelManifest:
    """The manifest the registry would record for ``model`` (sha256 of its UBJ bytes; with
    ``smoke_check``, the rows the refresh sandbox predicts and ``inplace_predict``'s answers)."""
    raw = model.ubj() if ubj is None else ubj
    rows = model.X[:SMOKE_CHECK_ROWS]
    num_class = 3 if model.objective.startswith("multi:") else 0
    return ModelManifest(
        name=name,
        sha256=hashlib.sha256(raw).hexdigest(),
        model_size=len(raw),
        xgboost_version=xgb.__version__,
        objective=model.objective,
        task=task_of(model.objective, num_class),
        num_features=len(model.feature_names),
        feature_names=list(model.feature_names),
        feature_types=["float"] * len(model.feature_names),
        num_class=num_class,
        num_trees=model.booster.num_boosted_rounds(),
        class_names=class_names,
        threshold=threshold,
        smoke_check=smoke_check_record(rows, model.booster.inplace_predict(rows))
        if smoke_check
        else None,
    )


REQUEST_ID = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"


def _body(body: bytes | str | None, base64_body: bool) -> tuple[str | None, bool]:
    if body is None:
        return None, False
    raw = body.encode() if isinstance(body, str) else body
    if base64_body:
        return base64.b64encode(raw).decode(), True
    return raw.decode("utf-8", errors="surrogateescape"), False


def http_api_event(
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    *,
    base64_body: bool = False,
    query: str = "",
    function_url: bool = False,
) -> dict[str, Any]:
    """An HTTP API (payload 2.0) event; ``function_url`` gives a Lambda Function URL event."""
    text, encoded = _body(body, base64_body)
    domain = (
        "abcdefghij.lambda-url.us-east-1.on.aws"
        if function_url
        else "id.execute-api.us-east-1.amazonaws.com"
    )
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {
            "accept": "*/*",
            "host": domain,
            "user-agent": "curl/8.5.0",
            "x-forwarded-proto": "https",
            **{k.lower(): v for k, v in (headers or {}).items()},
        },
        "requestContext": {
            "accountId": "123456789012" if not function_url else "anonymous",
            "apiId": "abcdefghij",
            "domainName": domain,
            "domainPrefix": "abcdefghij",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "curl/8.5.0",
            },
            "requestId": REQUEST_ID,
            "routeKey": "$default",
            "stage": "$default",
            "time": "29/Nov/2026:04:40:50 +0000",
            "timeEpoch": 1795927250000,
        },
        "isBase64Encoded": encoded,
    }
    if text is not None:
        event["body"] = text
    if query:
        event["queryStringParameters"] = dict(
            part.split("=", 1) for part in query.split("&") if "=" in part
        )
    return event


def rest_api_event(
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    *,
    base64_body: bool = False,
    stage: str = "prod",
) -> dict[str, Any]:
    """A REST API (payload 1.0) proxy event, as `sam local generate-event apigateway aws-proxy`."""
    text, encoded = _body(body, base64_body)
    hdrs = {
        "Accept": "*/*",
        "Host": "abcdefghij.execute-api.us-east-1.amazonaws.com",
        "User-Agent": "curl/8.5.0",
        "X-Forwarded-Proto": "https",
        **(headers or {}),
    }
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": hdrs,
        "multiValueHeaders": {k: [v] for k, v in hdrs.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourceId": "123456",
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "requestTime": "29/Nov/2026:04:40:50 +0000",
            "path": f"/{stage}{path}",
            "accountId": "123456789012",
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": "abcdefghij",
            "requestTimeEpoch": 1795927250000,
            "requestId": REQUEST_ID,
            "identity": {"sourceIp": "192.0.2.1", "userAgent": "curl/8.5.0"},
            "domainName": "abcdefghij.execute-api.us-east-1.amazonaws.com",
            "apiId": "abcdefghij",
        },
        "body": text,
        "isBase64Encoded": encoded,
    }


def response_body(response: dict[str, Any]) -> bytes:
    """The body of a Lambda proxy response as bytes."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        return base64.b64decode(body)
    return str(body).encode()


def response_headers(response: dict[str, Any]) -> dict[str, str]:
    """Headers of a Lambda proxy response, lower-cased (v1 may also have multiValueHeaders)."""
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    for key, values in (response.get("multiValueHeaders") or {}).items():
        headers.setdefault(key.lower(), values[-1])
    return headers
