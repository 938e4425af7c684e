"""One inference function serving every model of the registry by name (issue 16).

Three models of different widths and tasks behind one function: the by-name, alias and version
routes, 404/503, eviction under a small MODEL_CACHE_MB, a promotion reaching a warm function
without disturbing the other models, and concurrent first use loading once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, LambdaContext, TrainedModel, train
from tests.inference_support import http_api_event, manifest_for, response_body, response_headers
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    FakeClock,
    function_fixture,
    registry_fixture,
)
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import InMemoryRegistryStore, S3RegistryStore, StoredObject
from treeserve.serving.service import ModelCache, ModelRef, ModelService, Served
from treeserve.settings import Settings

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]


@pytest.fixture(scope="module")
def trio() -> dict[str, TrainedModel]:
    """The default model (binary, 6 features), penguins (3 classes, 4), price (regression, 9)."""
    return {
        "default": train("binary:logistic", d=6),
        "penguins": train("multi:softprob", d=4, seed=1),
        "price": train("reg:squarederror", d=9, seed=2),
    }


def register(
    name: str, model: TrainedModel, *, promote: bool = True, loaded_mb: float | None = None
) -> int:
    registry = ModelRegistry(S3RegistryStore(BUCKET), name)
    manifest = manifest_for(model, name=name)
    if loaded_mb is not None:
        manifest.footprint = {"loaded_mb": loaded_mb}
    version = registry.register(model.ubj(), manifest)
    if promote:
        registry.promote(version)
    return version


def call(
    module: ModuleType, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    raw_body = None if body is None else orjson.dumps(body)
    response = module.handler(http_api_event(method, path, raw_body), LambdaContext())
    raw = response_body(response)
    return response["statusCode"], response_headers(response), orjson.loads(raw) if raw else None


def rows(model: TrainedModel, n: int = 3) -> list[list[float]]:
    return model.X[:n].tolist()


def expected(model: TrainedModel, n: int = 3) -> np.ndarray:
    return model.booster.predict(xgb.DMatrix(model.X[:n], feature_names=model.feature_names))


@pytest.fixture
def published(registry: ModelRegistry, trio: dict[str, TrainedModel]) -> dict[str, TrainedModel]:
    for name, model in trio.items():
        register(name, model)
    return trio


def test_one_function_answers_three_models_by_name(
    published: dict[str, TrainedModel], function: Start
) -> None:
    module = function()
    for name, model in published.items():
        status, headers, body = call(
            module, "POST", f"/models/{name}/predict", {"instances": rows(model)}
        )
        assert status == 200, body
        assert headers["x-model-name"] == name
        assert headers["x-model-version"] == "1"
        assert body["model"] == {"name": name, "version": 1, "alias": "champion"}
        np.testing.assert_allclose(np.asarray(body["predictions"]), expected(model), rtol=1e-6)
        status, _, manifest = call(module, "GET", f"/models/{name}")
        assert status == 200
        assert manifest["num_features"] == len(model.feature_names)
        status, _, explained = call(
            module, "POST", f"/models/{name}/explain", {"instances": rows(model, 1)}
        )
        assert status == 200
        assert explained["feature_names"] == model.feature_names
    # The short routes stay the default model's.
    status, headers, body = call(
        module, "POST", "/predict", {"instances": rows(published["default"])}
    )
    assert status == 200
    assert headers["x-model-name"] == "default"
    np.testing.assert_allclose(body["predictions"], expected(published["default"]), rtol=1e-6)
    # A model answers only to its own width.
    status, _, body = call(
        module, "POST", "/models/price/predict", {"instances": rows(published["penguins"])}
    )
    assert status == 422, body
    status, _, listing = call(module, "GET", "/models")
    assert status == 200
    assert {m["name"]: (m["version"], m["task"]) for m in listing["models"]} == {
        "default": (1, "binary"),
        "penguins": (1, "multiclass"),
        "price": (1, "regression"),
    }


def test_pinned_versions_and_aliases(published: dict[str, TrainedModel], function: Start) -> None:
    other = train("reg:squarederror", d=9, seed=7, shift=3.0)
    registry = ModelRegistry(S3RegistryStore(BUCKET), "price")
    v2 = register("price", other, promote=False)
    registry.set_alias("challenger", v2)
    module = function()
    body = {"instances": rows(published["price"])}
    status, headers, champion = call(module, "POST", "/models/price/predict", body)
    assert status == 200
    assert headers["x-model-version"] == "1"
    for path in ("/models/price@challenger/predict", f"/models/price/versions/{v2}/predict"):
        status, headers, pinned = call(module, "POST", path, body)
        assert status == 200, path
        assert headers["x-model-version"] == str(v2), path
        assert headers["x-model-name"] == "price"
        np.testing.assert_allclose(
            pinned["predictions"],
            other.booster.predict(
                xgb.DMatrix(published["price"].X[:3], feature_names=other.feature_names)
            ),
            rtol=1e-6,
        )
    status, _, pinned = call(module, "POST", "/models/price/versions/1/predict", body)
    assert status == 200
    assert pinned["predictions"] == champion["predictions"]
    status, headers, _ = call(module, "GET", "/models/price@champion")
    assert status == 200
    assert headers["x-model-version"] == "1"
    status, _, manifest = call(module, "GET", f"/models/price/versions/{v2}")
    assert status == 200
    assert manifest["version"] == v2


def test_unknown_model_version_or_alias_is_a_json_404_and_nothing_in_service_a_503(
    published: dict[str, TrainedModel], function: Start
) -> None:
    register("waiting", published["price"], promote=False)  # known, nothing in service
    module = function()
    body = {"instances": rows(published["price"])}
    for path in (
        "/models/nobody/predict",
        "/models/price/versions/9/predict",
        "/models/price@nobody/predict",
        "/models/nobody@challenger/predict",
        "/models/..%2f/predict",
        "/models/price/versions/0/predict",
        "/models/price/versions/x/predict",
    ):
        status, headers, answer = call(module, "POST", path, body)
        assert status == 404, (path, answer)
        assert answer["error"]["type"] == "not_found", path
        if "%" not in path:  # a path no route matches is the framework's 404
            assert headers["x-model-version"] == "none", path
    status, _, answer = call(module, "GET", "/models/nobody")
    assert status == 404
    assert "nobody" in answer["error"]["message"]
    status, headers, answer = call(module, "POST", "/models/waiting/predict", body)
    assert status == 503
    assert answer["error"]["type"] == "no_model"
    assert headers["x-model-name"] == "waiting"
    status, _, answer = call(module, "GET", "/models/waiting")
    assert status == 503
    # Refused names are not kept: the cache holds only what exists.
    assert ModelRef("nobody") not in module.function.models.cached()
    assert all(ref.alias is None and ref.version is None for ref in module.function.models.cached())


def test_a_small_cache_evicts_the_least_recently_used_and_reloads_it_the_same(
    registry: ModelRegistry,
    trio: dict[str, TrainedModel],
    function: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, model in trio.items():
        register(name, model, loaded_mb=10.0)
    monkeypatch.setenv("MODEL_CACHE_MB", "25")  # the default model and one other
    module = function()
    cache = module.function.models
    first = {}
    for name in ("penguins", "price"):
        status, _, body = call(
            module, "POST", f"/models/{name}/predict", {"instances": rows(trio[name])}
        )
        assert status == 200
        first[name] = body["predictions"]
    assert cache.cached() == [ModelRef("price")]
    assert cache.evictions == 1
    assert cache.used_mb() == pytest.approx(20.0)
    status, _, again = call(
        module, "POST", "/models/penguins/predict", {"instances": rows(trio["penguins"])}
    )
    assert status == 200
    assert again["predictions"] == first["penguins"]
    assert cache.cached() == [ModelRef("penguins")]
    assert cache.evictions == 2
    status, _, body = call(module, "POST", "/predict", {"instances": rows(trio["default"])})
    assert status == 200  # the default model is never evicted


def test_a_promotion_reaches_a_warm_function_without_disturbing_the_others(
    published: dict[str, TrainedModel], function: Start
) -> None:
    module = function()
    clock = FakeClock()
    module.service.clock = clock
    cache = module.function.models
    cache.clock = clock
    for name in ("penguins", "price"):
        assert (
            call(module, "POST", f"/models/{name}/predict", {"instances": rows(published[name])})[0]
            == 200
        )
    before = {ref.name: cache.peek(ref).service.loaded for ref in cache.cached()}  # type: ignore[union-attr]
    default_before = module.service.loaded
    newer = train("multi:softprob", d=4, seed=5, shift=1.0)
    v2 = register("penguins", newer)
    status, headers, _ = call(
        module, "POST", "/models/penguins/predict", {"instances": rows(published["penguins"])}
    )
    assert headers["x-model-version"] == "1"  # within the refresh interval
    clock.advance(61)
    status, headers, body = call(
        module, "POST", "/models/penguins/predict", {"instances": rows(published["penguins"])}
    )
    assert status == 200
    assert headers["x-model-version"] == str(v2)
    np.testing.assert_allclose(
        body["predictions"],
        newer.booster.predict(
            xgb.DMatrix(published["penguins"].X[:3], feature_names=newer.feature_names)
        ),
        rtol=1e-6,
    )
    status, headers, _ = call(
        module, "POST", "/models/price/predict", {"instances": rows(published["price"])}
    )
    assert status == 200
    assert headers["x-model-version"] == "1"
    assert cache.peek(ModelRef("price")).service.loaded is before["price"]  # type: ignore[union-attr]
    assert module.service.loaded is default_before


class CountingStore(InMemoryRegistryStore):
    """The in-memory registry store, counting (and slowing) reads of model bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.model_reads = 0
        self._count = threading.Lock()

    def get(self, key: str) -> StoredObject:
        if key.endswith("/model.ubj"):
            with self._count:
                self.model_reads += 1
            time.sleep(0.05)  # a slow first load: the other threads arrive during it
        return super().get(key)


def test_concurrent_first_use_loads_a_model_once(trio: dict[str, TrainedModel]) -> None:
    store = CountingStore()
    for name, model in trio.items():
        registry = ModelRegistry(store, name)
        registry.promote(registry.register(model.ubj(), manifest_for(model, name=name)))
    settings = Settings(model_bucket="unused")
    default = ModelService(ModelRegistry(store, "default"), settings)
    cache = ModelCache(
        Served(default, None), lambda name: ModelRegistry(store, name), settings, limit_mb=100.0
    )
    store.model_reads = 0
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def first_use() -> None:
        barrier.wait()
        served = cache.get(ModelRef("penguins"))
        results.append((served, served.service.current().predictor.predict(trio["penguins"].X[:2])))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8  # every caller was served (none saw "nothing in service")
    assert store.model_reads == 1
    assert len({id(served) for served, _ in results}) == 1
    for _, prediction in results:
        np.testing.assert_array_equal(prediction.values, results[0][1].values)


def test_an_alias_moved_or_cleared_reaches_a_warm_function(
    published: dict[str, TrainedModel], function: Start
) -> None:
    registry = ModelRegistry(S3RegistryStore(BUCKET), "price")
    v2 = register("price", train("reg:squarederror", d=9, seed=8, shift=1.0), promote=False)
    registry.set_alias("staging", 1)
    module = function()
    clock = FakeClock()
    module.function.models.clock = clock
    body = {"instances": rows(published["price"])}
    status, headers, _ = call(module, "POST", "/models/price@staging/predict", body)
    assert status == 200
    assert headers["x-model-version"] == "1"
    registry.set_alias("staging", v2)
    clock.advance(61)
    status, headers, _ = call(module, "POST", "/models/price@staging/predict", body)
    assert status == 200
    assert headers["x-model-version"] == str(v2)
    registry.clear_alias("staging")
    clock.advance(61)
    status, _, answer = call(module, "POST", "/models/price@staging/predict", body)
    assert status == 404, answer
    status, headers, _ = call(module, "POST", "/models/price/predict", body)
    assert status == 200  # the champion is untouched
    assert headers["x-model-version"] == "1"


def test_each_model_captures_under_its_own_name(
    published: dict[str, TrainedModel],
    function: Start,
    monkeypatch: pytest.MonkeyPatch,
    s3: Any,
) -> None:
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "1")
    module = function()
    for name in ("default", "penguins", "price"):
        status, _, _ = call(
            module, "POST", f"/models/{name}/predict", {"instances": rows(published[name])}
        )
        assert status == 200
    buffers = module.function.models.captures()
    assert sorted(b.model_name for b in buffers) == ["default", "penguins", "price"]
    for buffer in buffers:
        assert buffer.flush()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/")["Contents"]]
    assert sorted(k.split("/")[1] for k in keys) == ["default", "penguins", "price"]


def test_a_larger_new_version_of_a_cached_model_evicts_others(
    registry: ModelRegistry,
    trio: dict[str, TrainedModel],
    function: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, model in trio.items():
        register(name, model, loaded_mb=10.0)
    monkeypatch.setenv("MODEL_CACHE_MB", "35")
    module = function()
    cache = module.function.models
    clock = FakeClock()
    cache.clock = clock
    for name in ("penguins", "price"):
        body = {"instances": rows(trio[name])}
        assert call(module, "POST", f"/models/{name}/predict", body)[0] == 200
    assert cache.evictions == 0
    register("price", train("reg:squarederror", d=9, seed=9, shift=2.0), loaded_mb=20.0)
    clock.advance(61)
    status, headers, _ = call(
        module, "POST", "/models/price/predict", {"instances": rows(trio["price"])}
    )
    assert status == 200
    assert headers["x-model-version"] == "2"
    assert cache.cached() == [ModelRef("price")]
    assert cache.used_mb() == pytest.approx(30.0)
