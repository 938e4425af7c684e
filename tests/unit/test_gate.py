"""The quality gate's metrics and decision, against real XGBoost models and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import TrainedModel, train
from treeserve.errors import UploadRejected
from treeserve.model import metrics
from treeserve.refresh import gate

pytestmark = pytest.mark.unit


def brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by definition: P(score of a positive > score of a negative), ties count half."""
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def test_auc_matches_the_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=300).astype(float)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding creates many ties
    assert metrics.roc_auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_of_a_single_class_is_nan_and_logloss_decides() -> None:
    assert math.isnan(metrics.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    scores = gate.score("binary", np.ones(3), np.array([0.2, 0.5, 0.9]))
    assert "auc" not in scores
    assert gate.primary_metric("binary", scores) == ("logloss", False)


def test_log_loss_binary_and_multiclass_known_values() -> None:
    assert metrics.log_loss([1, 0], [0.8, 0.2]) == pytest.approx(-math.log(0.8))
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert metrics.log_loss([0, 2], p) == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)
    # A confident mistake is large but finite.
    assert math.isfinite(metrics.log_loss([1], [0.0]))
    assert metrics.log_loss([1], [0.0]) > 30


def test_rmse_known_value() -> None:
    assert metrics.rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))
    with pytest.raises(ValueError, match="differ"):
        metrics.rmse([1.0, 2.0], [1.0])


def test_model_outputs_are_probabilities_matching_xgboost(
    binary_model: TrainedModel, multiclass_model: TrainedModel
) -> None:
    X = binary_model.X[:50]
    ours = gate.model_outputs(binary_model.ubj(), X, "binary")
    theirs = binary_model.booster.inplace_predict(X)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)

    Xm = multiclass_model.X[:50]
    ours_m = gate.model_outputs(multiclass_model.ubj(), Xm, "multiclass")
    np.testing.assert_allclose(ours_m, multiclass_model.booster.inplace_predict(Xm), atol=1e-6)
    np.testing.assert_allclose(ours_m.sum(axis=1), 1.0, atol=1e-9)


def test_multi_softmax_is_scored_on_probabilities() -> None:
    model = train("multi:softmax")
    out = gate.model_outputs(model.ubj(), model.X[:20], "multiclass")
    assert out.shape == (20, 3)
    labels = model.booster.inplace_predict(model.X[:20])  # softmax predicts the class index
    np.testing.assert_array_equal(out.argmax(axis=1), labels)


def test_a_model_trained_on_shuffled_labels_scores_worse(binary_model: TrainedModel) -> None:
    X, y = binary_model.X, binary_model.y
    rng = np.random.default_rng(3)
    noise = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(X, label=rng.permutation(y), feature_names=binary_model.feature_names),
        num_boost_round=10,
    )
    hold_X, hold_y = X[300:], y[300:]
    good = gate.score("binary", hold_y, gate.model_outputs(binary_model.ubj(), hold_X, "binary"))
    bad = gate.score(
        "binary", hold_y, gate.model_outputs(bytes(noise.save_raw("ubj")), hold_X, "binary")
    )
    assert good["auc"] > bad["auc"] + 0.1
    assert not gate.compare("binary", bad, good, 0.01, champion_version=1).passed
    assert gate.compare("binary", good, bad, 0.0, champion_version=1).passed


@pytest.mark.parametrize(
    ("task", "challenger", "champion", "tolerance", "decision"),
    [
        ("binary", {"auc": 0.90}, {"auc": 0.91}, 0.02, "promote"),
        ("binary", {"auc": 0.88}, {"auc": 0.91}, 0.02, "hold"),
        ("binary", {"auc": 0.95}, {"auc": 0.91}, 0.0, "promote"),
        ("multiclass", {"logloss": 0.50}, {"logloss": 0.49}, 0.02, "promote"),
        ("multiclass", {"logloss": 0.60}, {"logloss": 0.49}, 0.02, "hold"),
        ("regression", {"rmse": 1.0}, {"rmse": 1.0}, 0.0, "promote"),
        ("regression", {"rmse": 1.2}, {"rmse": 1.0}, 0.1, "hold"),
        ("ranking", {}, {}, 0.0, "skip"),
    ],
)
def test_compare_applies_the_tolerance_in_the_metric_direction(
    task: str,
    challenger: dict[str, float],
    champion: dict[str, float],
    tolerance: float,
    decision: str,
) -> None:
    result = gate.compare(task, challenger, champion, tolerance, champion_version=4)
    assert result.decision == decision
    if decision != "skip":
        assert "v4" in result.reason
        assert result.to_dict()["champion_version"] == 4


def test_labels_unusable_for_the_task_are_refused() -> None:
    with pytest.raises(UploadRejected) as info:
        gate.check_labels("binary", [0, 1, 2], 0)
    assert info.value.code == "holdout_labels"
    with pytest.raises(UploadRejected):
        gate.check_labels("multiclass", [0, 1, 3], 3)
    with pytest.raises(UploadRejected):
        gate.check_labels("regression", [1.0, float("nan")], 0)
    assert gate.check_labels("multiclass", [0, 2, 1], 3).tolist() == [0.0, 2.0, 1.0]


def test_champion_columns_reorder_by_name_or_refuse() -> None:
    assert gate.champion_columns(["a", "b", "c"], ["c", "a"]) == [2, 0]
    assert gate.champion_columns(["a", "b"], ["a", "z"]) is None


@pytest.mark.parametrize(
    ("objective", "task", "num_target", "gated"),
    [
        ("binary:logistic", "binary", 1, True),
        ("multi:softprob", "multiclass", 1, True),
        ("reg:squarederror", "regression", 1, True),
        ("count:poisson", "regression", 1, True),
        ("reg:squarederror", "regression", 3, False),  # multi-output
        ("reg:quantileerror", "regression", 1, False),
        ("survival:cox", "regression", 1, False),
        ("rank:ndcg", "ranking", 1, False),
    ],
)
def test_which_models_the_gate_can_score(
    objective: str, task: str, num_target: int, gated: bool
) -> None:
    reason = metrics.ungated_reason(objective, task, num_target)
    assert (reason is None) is gated
    if reason:
        assert "no quality metric" in reason
