"""Peak memory of serving one model version, measured in a process of its own.

``python -m tests.reliability.inference_peak MODEL MANIFEST ROWS`` does what the inference
function does with a version: load it (:meth:`treeserve.predictor.Predictor.load`: sha256,
XGBoost load, smoke prediction), then answer one explain of ROWS rows as JSON and as CSV
(:class:`treeserve.serving.endpoints.Endpoints`' encoders). It prints JSON: the RSS growth of the load,
its peak, and the peak of load + explain, in MB over the process before the load (the runtime:
Python, numpy, XGBoost, FastAPI), to compare with the manifest's ``footprint``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import orjson

from treeserve.model.manifest import ModelManifest
from treeserve.model.predictor import Predictor
from treeserve.serving import endpoints

MiB = 1 << 20


def _memory() -> tuple[float, float]:
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def main(model_path: str, manifest_path: str, rows: int) -> int:
    manifest = ModelManifest.from_json(Path(manifest_path).read_bytes())
    rss0, _ = _memory()
    predictor = Predictor.load(Path(model_path).read_bytes(), manifest)
    rss1, peak1 = _memory()
    X = np.random.default_rng(0).normal(size=(rows, manifest.num_features)).astype(np.float32)
    explanation = predictor.explain(X)
    ids = list(range(rows))
    as_json = orjson.dumps(
        {"contributions": explanation.contributions, "bias": explanation.bias, "ids": ids},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    as_csv = endpoints._explain_csv(ids, explanation.contributions, explanation.bias, explanation)
    _, peak2 = _memory()
    json.dump(
        {
            "runtime_mb": round(rss0, 1),
            "loaded_mb": round(rss1 - rss0, 1),
            "load_peak_mb": round(peak1 - rss0, 1),
            "peak_mb": round(peak2 - rss0, 1),
            "answer_mb": round((len(as_json) + len(as_csv)) / MiB, 1),
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
