"""Settings come from the environment; a missing or malformed value names the variable."""

from __future__ import annotations

import re

import pytest

from treeserve.errors import ConfigurationError
from treeserve.settings import MAX_LAMBDA_PAYLOAD_BYTES, DriftRule, Settings


def test_defaults_follow_design() -> None:
    s = Settings.from_env({"MODEL_BUCKET": "b"})
    assert s.model_bucket == "b"
    assert s.model_name == "default"
    assert s.model_refresh_seconds == 60
    assert s.max_rows == 10_000
    assert s.capture_sample_rate == 0.0
    assert s.promotion_mode == "auto"
    assert s.max_body_bytes == MAX_LAMBDA_PAYLOAD_BYTES
    assert s.drift_rule == DriftRule("psi", 0.1)


def test_values_are_parsed_and_typed() -> None:
    s = Settings.from_env(
        {
            "MODEL_BUCKET": "b",
            "MODEL_NAME": "churn",
            "MODEL_REFRESH_SECONDS": "5",
            "MAX_ROWS": "10",
            "CAPTURE_SAMPLE_RATE": "0.25",
            "PROMOTION_MODE": "MANUAL",
            "PROMOTION_TOLERANCE": "0.01",
            "NOTIFICATION_TOPIC_ARN": "arn:aws:sns:us-east-1:1:t",
            "LOG_LEVEL": "debug",
        }
    )
    assert (s.model_name, s.model_refresh_seconds, s.max_rows) == ("churn", 5.0, 10)
    assert (s.capture_sample_rate, s.promotion_mode, s.promotion_tolerance) == (
        0.25,
        "manual",
        0.01,
    )
    assert s.notification_topic_arn == "arn:aws:sns:us-east-1:1:t"
    assert s.log_level == "DEBUG"


def test_live_promotion_settings() -> None:
    s = Settings.from_env({"MODEL_BUCKET": "b"})
    assert (s.live_min_labeled_rows, s.challenger_max_rows) == (500, 20_000)
    s = Settings.from_env(
        {
            "MODEL_BUCKET": "b",
            "PROMOTION_MODE": "Live",
            "LIVE_MIN_LABELED_ROWS": "1000",
            "CHALLENGER_MAX_ROWS": "5000",
        }
    )
    assert (s.promotion_mode, s.live_min_labeled_rows, s.challenger_max_rows) == (
        "live",
        1000,
        5000,
    )


def test_missing_bucket_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="MODEL_BUCKET"):
        Settings.from_env({})


def test_bucket_argument_overrides_environment() -> None:
    assert Settings.from_env({}, bucket="cli-bucket").model_bucket == "cli-bucket"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CAPTURE_SAMPLE_RATE", "1.5"),
        ("CAPTURE_SAMPLE_RATE", "often"),
        ("MAX_ROWS", "0"),
        ("PROMOTION_MODE", "sometimes"),
        ("MODEL_REFRESH_SECONDS", "-1"),
        ("LIVE_MIN_LABELED_ROWS", "0"),
        ("LIVE_MIN_LABELED_ROWS", "many"),
        ("CHALLENGER_MAX_ROWS", "0"),
    ],
)
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_env({"MODEL_BUCKET": "b", name: value})


@pytest.mark.parametrize(
    ("method", "threshold", "expected"),
    [
        ("", "", DriftRule("psi", 0.1)),
        ("KS", "", DriftRule("ks", 0.1)),
        ("ks", "0.05", DriftRule("ks", 0.05)),
        ("wasserstein", "0.2", DriftRule("wasserstein", 0.2)),
        ("psi", "0.25", DriftRule("psi", 0.25)),
    ],
)
def test_drift_rule_from_the_environment(method: str, threshold: str, expected: DriftRule) -> None:
    env = {"MODEL_BUCKET": "b", "DRIFT_METHOD": method, "DRIFT_THRESHOLD": threshold}
    assert Settings.from_env(env).drift_rule == expected


@pytest.mark.parametrize(
    ("method", "threshold", "says"),
    [
        ("chi2", "", "not one of psi, ks, wasserstein"),
        ("ks", "1.5", r"outside \(0, 1\]"),
        ("wasserstein", "0", "outside"),
        ("psi", "-0.1", "outside"),
        ("psi", "nan", "outside"),
        ("ks", "often", "not a number"),
    ],
)
def test_bad_drift_rule_is_refused_naming_both_variables(
    method: str, threshold: str, says: str
) -> None:
    env = {"MODEL_BUCKET": "b", "DRIFT_METHOD": method, "DRIFT_THRESHOLD": threshold}
    with pytest.raises(ConfigurationError, match="DRIFT_METHOD") as info:
        Settings.from_env(env)
    assert "DRIFT_THRESHOLD" in str(info.value)
    assert re.search(says, str(info.value))


def test_batch_settings_are_read_and_bounded() -> None:
    s = Settings.from_env({"MODEL_BUCKET": "b"})
    assert (s.batch_chunk_rows, s.batch_part_bytes) == (10_000, 8 * 1024 * 1024)
    assert s.batch_state_machine_arn is None
    s = Settings.from_env(
        {
            "MODEL_BUCKET": "b",
            "BATCH_CHUNK_ROWS": "500",
            "BATCH_PART_BYTES": str(6 * 1024 * 1024),
            "BATCH_STATE_MACHINE_ARN": "arn:aws:states:us-east-1:1:stateMachine:x",
        }
    )
    assert (s.batch_chunk_rows, s.batch_part_bytes) == (500, 6 * 1024 * 1024)
    assert s.batch_state_machine_arn == "arn:aws:states:us-east-1:1:stateMachine:x"
    # S3's smallest multipart part is 5 MiB: less is refused, naming the variable.
    with pytest.raises(ConfigurationError, match="BATCH_PART_BYTES"):
        Settings.from_env({"MODEL_BUCKET": "b", "BATCH_PART_BYTES": "1024"})
