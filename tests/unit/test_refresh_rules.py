"""The refresh function's pure rules: keys, names, event order, envelopes. No network."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import ROOT
from treeserve.refresh.pipeline import (
    Outcome,
    compare_sequencers,
    is_newer,
    parse_incoming_key,
    valid_model_name,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("incoming/churn/model.ubj", ("churn", "model.ubj")),
        ("incoming/churn/2026/11/model.tar.gz", ("churn", "model.tar.gz")),
        ("incoming/churn/", None),
        ("incoming/model.ubj", None),
        ("incoming//model.ubj", None),
        ("registry/churn/current.json", None),
        ("Incoming/churn/model.ubj", None),
    ],
)
def test_incoming_keys(key: str, parsed: tuple[str, str] | None) -> None:
    assert parse_incoming_key(key) == parsed


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("churn", True),
        ("churn-v2.1_final", True),
        ("A" * 64, True),
        ("A" * 65, False),
        ("-leading-dash", False),
        ("has space", False),
        ("dots..", True),
        ("ümlaut", False),
        ("semi;colon", False),
    ],
)
def test_model_names(name: str, ok: bool) -> None:
    assert valid_model_name(name) is ok


def test_sequencers_compare_as_left_padded_hex() -> None:
    assert compare_sequencers("0055AEA1C5E4B7F5A1", "0055AEA1C5E4B7F5A2") == -1
    assert compare_sequencers("F2C3", "0A1B") == 1  # different lengths: pad, then compare
    assert compare_sequencers("00F2C3", "0A1B") == 1
    assert compare_sequencers("0a1b", "0A1B") == 0  # case does not matter
    assert compare_sequencers("1", "0000000000000002") == -1


def source(
    key: str = "incoming/m/a.ubj", sequencer: str | None = None, time: str | None = None
) -> dict[str, Any]:
    return {"key": key, "sequencer": sequencer, "event_time": time}


def test_newer_uses_the_sequencer_for_the_same_key_and_time_otherwise() -> None:
    early, late = "2026-11-29T05:00:00.000Z", "2026-11-29T05:00:00.001Z"
    # Same key with sequencers: the sequencer decides, even against the clock.
    assert is_newer(source(sequencer="0B", time=early), source(sequencer="0A", time=late))
    assert not is_newer(source(sequencer="0A", time=late), source(sequencer="0B", time=early))
    # Different keys: sequencers are not comparable; the upload time decides.
    assert not is_newer(
        source("incoming/m/a.ubj", "0B", early), source("incoming/m/b.ubj", "0A", late)
    )
    assert is_newer(source("incoming/m/b.ubj", time=late), source("incoming/m/a.ubj", time=early))
    assert is_newer(source(time=early), source(time=early))  # a tie: the version order decides
    # Unknown order (a champion registered by other means) does not block a promotion.
    assert is_newer(source(time=early), {})


def test_outcome_round_trips_without_the_redelivered_flag() -> None:
    outcome = Outcome("promoted", "incoming/m/a.ubj", "abc", model="m", version=3)
    outcome.redelivered = True
    data = outcome.to_dict()
    assert "redelivered" not in data
    again = Outcome.from_dict(json.loads(json.dumps(data)))
    assert again.redelivered is False
    assert (again.status, again.version, again.attempt) == ("promoted", 3, outcome.attempt)


# --- the handler's envelopes (imported from its file, as Lambda does) -----------------------------


@pytest.fixture(scope="module")
def app() -> Any:
    import sys

    from treeserve_cli.invoke import import_handler

    handler = import_handler(ROOT / "functions" / "refresh", "app.handler", fresh=True)
    return sys.modules[handler.__module__]


S3_RECORD = {
    "eventName": "ObjectCreated:Put",
    "eventTime": "2026-11-29T05:00:00.000Z",
    "s3": {
        "bucket": {"name": "b"},
        "object": {
            "key": "incoming/m/my+model%281%29.ubj",
            "size": 10,
            "eTag": "e1",
            "sequencer": "0A",
            "versionId": "v1",
        },
    },
}


def test_s3_records_are_decoded(app: Any) -> None:
    (event,) = app.upload_events({"Records": [S3_RECORD]})
    assert event.key == "incoming/m/my model(1).ubj"
    assert (event.bucket, event.etag, event.size, event.sequencer, event.version_id) == (
        "b",
        "e1",
        10,
        "0A",
        "v1",
    )
    assert event.event_time == "2026-11-29T05:00:00.000Z"


def test_removed_objects_and_test_events_are_not_uploads(app: Any) -> None:
    removed = dict(S3_RECORD, eventName="ObjectRemoved:Delete")
    assert app.upload_events({"Records": [removed]}) == []
    assert app.upload_events({"Service": "Amazon S3", "Event": "s3:TestEvent"}) == []
    assert app.upload_events({"detail-type": "Object Deleted", "detail": {}}) == []


def test_sns_envelopes_are_unwrapped(app: Any) -> None:
    wrapped = {"Type": "Notification", "Message": json.dumps({"Records": [S3_RECORD, S3_RECORD]})}
    assert len(app.upload_events(wrapped)) == 2


def test_eventbridge_keys_are_taken_as_they_are(app: Any) -> None:
    (event,) = app.upload_events(
        {
            "detail-type": "Object Created",
            "time": "2026-11-29T05:00:00Z",
            "detail": {
                "bucket": {"name": "b"},
                "object": {"key": "incoming/m/a+b.ubj", "etag": "e", "size": 3, "sequencer": "0F"},
            },
        }
    )
    assert (event.key, event.etag, event.sequencer) == ("incoming/m/a+b.ubj", "e", "0F")
