"""Drift rules from manifest.json to the report: refresh validates and records them, monitoring
applies them to the version's captured traffic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from tests.conftest import BUCKET, train
from tests.corpus import make_package, reference_csv
from tests.integration.refresh_stack import RefreshStack, build_stack
from tests.integration.test_monitoring import traffic
from treeserve.monitoring.pipeline import run_monitoring
from treeserve.registry.model_registry import upload_id
from treeserve.settings import DriftRule

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(s3: Any, monkeypatch: pytest.MonkeyPatch) -> RefreshStack:
    return build_stack(monkeypatch, s3)


def test_manifest_drift_rules_reach_the_report(stack: RefreshStack) -> None:
    model = train("binary:logistic", n=2500)
    drift = {"default": {"method": "wasserstein"}, "features": {"f3": {"method": "ks"}}}
    key = "incoming/churn/model.tar.gz"
    # 2,000 reference rows: fixed-threshold distances need a reference of some size
    package = make_package(
        model,
        manifest={"drift": drift},
        extra_members={"reference.csv": reference_csv(model, rows=2000)},
    )
    stack.deliver_sqs(stack.put(key, package))
    registry = stack.registry("churn")
    assert registry.current() is not None
    manifest = registry.manifest(1)
    assert manifest.drift == {
        "default": {"method": "wasserstein"},
        "features": {"f3": {"method": "ks"}},
    }

    X = np.random.default_rng(2).normal(size=(4000, 6))
    X[:, 1] += 0.4  # normed Wasserstein about 0.4: flagged
    X[:, 3] *= 1.3  # normed Wasserstein about 0.24 but KS about 0.07: quiet under its ks rule
    now = datetime.now(UTC)
    traffic(stack.s3, model, 1, X, name="churn", ts=now - timedelta(minutes=30))
    report = run_monitoring(
        BUCKET, "churn", now - timedelta(hours=1), now, s3=stack.s3, write=False,
        rule=DriftRule("psi", 0.1),
    )  # fmt: skip
    assert report["summary"]["drifted_features"] == ["f1"]
    (v,) = report["versions"]
    assert [f["rule"]["method"] for f in v["features"]] == ["wasserstein"] * 3 + ["ks"] + [
        "wasserstein"
    ] * 2
    assert v["features"][3]["wasserstein_normed"] > 0.1  # what the default rule would flag


def test_a_bad_drift_section_is_rejected_and_the_upload_kept(stack: RefreshStack) -> None:
    model = train("binary:logistic", n=400)
    key = "incoming/churn/bad-drift.tar.gz"
    package = make_package(model, manifest={"drift": {"features": {"f9": {"method": "ks"}}}})
    stack.deliver_sqs(stack.put(key, package))
    outcome = stack.outcome(key, "churn")
    assert outcome is not None
    assert (outcome["status"], outcome["code"]) == ("rejected", "manifest_mismatch")
    rejection = stack.registry("churn").rejection(upload_id(key, stack.etags[key]))
    assert rejection is not None
    assert "drift.features names 'f9'" in rejection["reason"]
    assert stack.registry("churn").versions() == []
    stack.s3.head_object(Bucket=BUCKET, Key=key)
