"""S3 faults (throttling, 5xx, timeouts, lost responses) injected with botocore event hooks
during cold start, model reload, capture flush, refresh and monitoring.

The contract under test (DESIGN.md, HELPER_RULES): the function keeps serving, or fails the
invocation cleanly so Lambda retries it; nothing half-written; no pointer lost; captures lost
only within the documented bound. Every test counts the faults it injected (``S3Faults``).
"""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from tests.conftest import BUCKET
from tests.reliability.faults import S3Faults, no_backoff

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


# --- the harness itself ----------------------------------------------------------------------


def test_injected_faults_are_retried_like_real_ones(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer faults than botocore's attempts are absorbed by retries; more surface as errors."""
    no_backoff(monkeypatch)
    s3.put_object(Bucket=BUCKET, Key="k", Body=b"v")
    faults = S3Faults(s3)
    faults.add("slowdown", operations={"GetObject"}, times=2)
    assert s3.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"v"
    assert faults.injected[("slowdown", "GetObject")] == 2
    assert faults.sent["GetObject"] == 3

    faults.add("internal", operations={"GetObject"}, times=10)
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket=BUCKET, Key="k")
    assert info.value.response["Error"]["Code"] == "InternalError"
    # Config(retries={"max_attempts": 4}) means 4 retries: 5 attempts in all.
    assert faults.injected[("internal", "GetObject")] == 5
    faults.clear()

    faults.add("timeout", operations={"HeadObject"}, times=10)
    with pytest.raises(ReadTimeoutError):
        s3.head_object(Bucket=BUCKET, Key="k")
    faults.detach()


def test_injected_5xx_is_not_applied_but_a_lost_response_is(
    s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    faults = S3Faults(s3)
    faults.add("slowdown", operations={"PutObject"}, times=10)
    with pytest.raises(ClientError):
        s3.put_object(Bucket=BUCKET, Key="never", Body=b"x")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)
    faults.clear()

    # Applied, then the answer lost: the retry of a conditional create finds its own write.
    faults.add("lost_response", operations={"PutObject"}, times=1)
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=BUCKET, Key="once", Body=b"x", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=BUCKET, Key="once")["Body"].read() == b"x"
    faults.detach()
