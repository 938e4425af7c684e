"""Predictor: sha256 check, load, smoke, predict == Booster.predict, labels, TreeSHAP."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import TrainedModel
from tests.inference_support import manifest_for
from treeserve.errors import ModelLoadError
from treeserve.model.predictor import Predictor

pytestmark = pytest.mark.unit


def _booster_predict(model: TrainedModel, X: np.ndarray) -> np.ndarray:
    return model.booster.predict(xgb.DMatrix(X, feature_names=model.feature_names))


def test_predictions_equal_booster_predict(any_model: TrainedModel) -> None:
    predictor = Predictor.load(any_model.ubj(), manifest_for(any_model))
    X = any_model.X[:50]
    prediction = predictor.predict(X.astype(np.float32))
    np.testing.assert_array_equal(prediction.values, _booster_predict(any_model, X))


def test_binary_labels_use_threshold_and_class_names(binary_model: TrainedModel) -> None:
    X = binary_model.X[:100].astype(np.float32)
    p = _booster_predict(binary_model, X)
    plain = Predictor.load(binary_model.ubj(), manifest_for(binary_model)).predict(X)
    assert plain.labels == [1 if v >= 0.5 else 0 for v in p]
    named = Predictor.load(
        binary_model.ubj(),
        manifest_for(binary_model, class_names=["no", "yes"], threshold=0.8),
    ).predict(X)
    assert named.labels == ["yes" if v >= 0.8 else "no" for v in p]
    assert named.labels != ["yes" if v >= 0.5 else "no" for v in p]  # the threshold mattered


def test_multiclass_labels_are_argmax(multiclass_model: TrainedModel) -> None:
    X = multiclass_model.X[:60].astype(np.float32)
    probs = _booster_predict(multiclass_model, X)
    names = ["low", "mid", "high"]
    prediction = Predictor.load(
        multiclass_model.ubj(), manifest_for(multiclass_model, class_names=names)
    ).predict(X)
    assert prediction.values.shape == (60, 3)
    assert prediction.labels == [names[i] for i in probs.argmax(axis=1)]
    assert len(set(prediction.labels)) == 3
    plain = Predictor.load(multiclass_model.ubj(), manifest_for(multiclass_model)).predict(X)
    assert plain.labels == probs.argmax(axis=1).tolist()


def test_regression_has_no_labels(regression_model: TrainedModel) -> None:
    prediction = Predictor.load(regression_model.ubj(), manifest_for(regression_model)).predict(
        regression_model.X[:5].astype(np.float32)
    )
    assert prediction.labels is None


def test_missing_values_are_nan(binary_model: TrainedModel) -> None:
    predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model))
    X = binary_model.X[:3].copy()
    X[:, 0] = np.nan
    np.testing.assert_array_equal(
        predictor.predict(X.astype(np.float32)).values, _booster_predict(binary_model, X)
    )


def test_sha256_mismatch_is_refused(
    binary_model: TrainedModel, regression_model: TrainedModel
) -> None:
    manifest = manifest_for(binary_model)
    with pytest.raises(ModelLoadError, match="sha256"):
        Predictor.load(regression_model.ubj(), manifest)


@pytest.mark.parametrize("raw", [b"", b"not a model at all", b"{garbage"])
def test_unloadable_bytes_are_refused(binary_model: TrainedModel, raw: bytes) -> None:
    with pytest.raises(ModelLoadError):
        Predictor.load(raw, manifest_for(binary_model, ubj=raw))


def test_feature_count_disagreeing_with_manifest_is_refused(binary_model: TrainedModel) -> None:
    manifest = manifest_for(binary_model)
    manifest.num_features = 9
    with pytest.raises(ModelLoadError, match="features"):
        Predictor.load(binary_model.ubj(), manifest)


def test_feature_names_disagreeing_with_count_are_refused(binary_model: TrainedModel) -> None:
    manifest = manifest_for(binary_model)
    manifest.feature_names = manifest.feature_names[:-1]
    with pytest.raises(ModelLoadError, match="feature names"):
        Predictor.load(binary_model.ubj(), manifest)


def test_explain_contributions_sum_to_margin(any_model: TrainedModel) -> None:
    predictor = Predictor.load(any_model.ubj(), manifest_for(any_model))
    X = any_model.X[:20].astype(np.float32)
    explanation = predictor.explain(X)
    margin = any_model.booster.predict(
        xgb.DMatrix(X, feature_names=any_model.feature_names), output_margin=True
    )
    total = explanation.contributions.sum(axis=-1) + explanation.bias
    np.testing.assert_allclose(total, margin, rtol=1e-4, atol=1e-4)
    assert explanation.feature_names == any_model.feature_names
    assert explanation.contributions.shape[-1] == len(any_model.feature_names)
    assert np.abs(explanation.contributions).sum() > 0


def test_uses_one_thread(binary_model: TrainedModel) -> None:
    predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model))
    assert predictor.native
    config = predictor.save_config()
    assert '"nthread":"1"' in config.replace(" ", "")
    no_record = Predictor.load(binary_model.ubj(), manifest_for(binary_model, smoke_check=False))
    assert not no_record.native
    assert '"nthread":"1"' in no_record.save_config().replace(" ", "")
