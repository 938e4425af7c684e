"""Shared fixtures: real XGBoost models trained on a few rows, moto, Powertools environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Powertools and AWS settings for every test, before any module under test is imported.
os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "treeserve-test")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "TreeserveTest")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_SECURITY_TOKEN", "testing")
os.environ.setdefault("AWS_SESSION_TOKEN", "testing")
os.environ.pop("AWS_ENDPOINT_URL", None)  # in-process moto must intercept; server tests set it

import xgboost as xgb

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"
BUCKET = "treeserve-test-models"


@dataclass
class TrainedModel:
    """A real model trained in a fixture, with its data."""

    booster: xgb.Booster
    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    objective: str

    def ubj(self) -> bytes:
        return bytes(self.booster.save_raw("ubj"))

    def json(self) -> bytes:
        return bytes(self.booster.save_raw("json"))

    def save(self, path: Path) -> Path:
        self.booster.save_model(str(path))
        return path


def make_data(n: int = 400, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X[:, 0] + 0.5 * X[:, 1] - 0.25 * X[:, 2] + rng.normal(scale=0.3, size=n)


def train(
    objective: str,
    *,
    n: int = 400,
    d: int = 6,
    rounds: int = 10,
    seed: int = 0,
    num_class: int = 3,
    shift: float = 0.0,
) -> TrainedModel:
    """Train a real, small XGBoost model. ``shift`` changes the target so models differ."""
    X, signal = make_data(n, d, seed)
    signal = signal + shift
    if objective.startswith("binary:"):
        y = (signal > 0).astype(float)
        params: dict[str, object] = {"objective": objective}
    elif objective.startswith("multi:"):
        y = np.digitize(signal, np.quantile(signal, np.linspace(0, 1, num_class + 1)[1:-1])).astype(
            float
        )
        params = {"objective": objective, "num_class": num_class}
    else:
        y = signal
        params = {"objective": objective}
    names = [f"f{i}" for i in range(d)]
    dtrain = xgb.DMatrix(X, label=y, feature_names=names)
    params.update({"max_depth": 3, "eta": 0.3, "nthread": 1, "seed": seed})
    booster = xgb.train(params, dtrain, num_boost_round=rounds)
    return TrainedModel(booster, X, y, names, objective)


@pytest.fixture(scope="session")
def binary_model() -> TrainedModel:
    return train("binary:logistic")


@pytest.fixture(scope="session")
def multiclass_model() -> TrainedModel:
    return train("multi:softprob")


@pytest.fixture(scope="session")
def regression_model() -> TrainedModel:
    return train("reg:squarederror")


@pytest.fixture(scope="session", params=["binary:logistic", "multi:softprob", "reg:squarederror"])
def any_model(request: pytest.FixtureRequest) -> TrainedModel:
    return train(request.param)


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    """Powertools keeps metrics in class-level state: start every test with none buffered."""
    from aws_lambda_powertools import Metrics
    from aws_lambda_powertools.metrics.provider import cold_start

    Metrics().clear_metrics()
    cold_start.is_cold_start = True
    yield
    Metrics().clear_metrics()


@pytest.fixture
def atomic_moto_s3() -> Iterator[None]:
    """moto with S3's per-request atomicity (see treeserve_cli.local.make_moto_s3_atomic)."""
    from treeserve_cli.local import make_moto_s3_atomic

    undo = make_moto_s3_atomic()
    yield
    undo()


@pytest.fixture
def aws() -> Iterator[None]:
    """In-process moto for every AWS service; clients created inside it see moto."""
    from moto import mock_aws

    from treeserve.aws import reset_clients

    reset_clients()
    with mock_aws():
        yield
    reset_clients()


@pytest.fixture
def s3(aws: None) -> object:
    """The shared S3 client (under moto) with the test bucket created."""
    from treeserve.aws import s3_client

    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    return client


@dataclass
class LambdaContext:
    """A Lambda context as the runtime passes it."""

    function_name: str = "treeserve-test"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:treeserve-test"
    memory_limit_in_mb: int = 1024
    aws_request_id: str = "00000000-0000-4000-8000-000000000000"
    log_group_name: str = "/aws/lambda/treeserve-test"
    log_stream_name: str = "2026/11/29/[$LATEST]test"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture
def lambda_context() -> LambdaContext:
    return LambdaContext()
