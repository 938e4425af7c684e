"""The demo model of the local stack: XGBoost on the Breast Cancer Wisconsin (Diagnostic) data.

The dataset ships with treeserve (``treeserve_cli/data/breast_cancer.csv``, 569 rows, 30 numeric
features, label ``malignant``; source and licence in ``treeserve_cli/data/README.md``), so the demo
needs no network. :func:`write_demo_package` writes what a user would publish: a model package
(``model.ubj``, ``manifest.json``, ``reference.csv``, ``holdout.csv``) as one ``.tar.gz``.

Run ``python -m treeserve_cli.demo OUTDIR`` to write a package (and its parts) to try
``treeserve publish`` with; ``--rounds``/``--depth`` train a different model.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import xgboost as xgb

DATASET_FILE = "breast_cancer.csv"
LABEL = "malignant"
CLASS_NAMES = ["benign", "malignant"]
DEMO_DESCRIPTION = (
    "Demo: probability that a breast mass is malignant, from 30 features of a fine needle "
    "aspirate image (Breast Cancer Wisconsin (Diagnostic), UCI, CC BY 4.0)"
)
DEFAULT_ROUNDS = 40
DEFAULT_DEPTH = 3
HOLDOUT_FRACTION = 0.3
SPLIT_SEED = 20261129


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature matrix, labels and feature names of a tabular dataset."""

    feature_names: list[str]
    X: np.ndarray
    y: np.ndarray


@dataclass(frozen=True, slots=True)
class DemoPackage:
    """Files written by :func:`write_demo_package`."""

    package: Path  # the .tar.gz to publish
    model: Path
    reference: Path
    holdout: Path
    feature_names: list[str]
    example_rows: list[list[float]]  # real holdout rows, for curl examples
    example_labels: list[int]
    holdout_auc: float


def load_dataset() -> Dataset:
    """The bundled Breast Cancer Wisconsin (Diagnostic) data."""
    text = resources.files("treeserve_cli").joinpath("data", DATASET_FILE).read_text("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    if header[-1] != LABEL:
        raise ValueError(f"{DATASET_FILE}: last column is {header[-1]!r}, expected {LABEL!r}")
    data = np.asarray(body, dtype=np.float64)
    return Dataset(feature_names=header[:-1], X=data[:, :-1], y=data[:, -1])


def split(data: Dataset, *, seed: int = SPLIT_SEED) -> tuple[Dataset, Dataset]:
    """A fixed, stratified train/holdout split, so every run publishes the same demo."""
    rng = np.random.default_rng(seed)
    holdout_idx: list[int] = []
    for cls in np.unique(data.y):
        idx = np.flatnonzero(data.y == cls)
        rng.shuffle(idx)
        holdout_idx.extend(idx[: round(len(idx) * HOLDOUT_FRACTION)].tolist())
    mask = np.zeros(len(data.y), dtype=bool)
    mask[holdout_idx] = True
    names = data.feature_names
    return (
        Dataset(names, data.X[~mask], data.y[~mask]),
        Dataset(names, data.X[mask], data.y[mask]),
    )


def train_model(
    train: Dataset, *, rounds: int = DEFAULT_ROUNDS, depth: int = DEFAULT_DEPTH, seed: int = 0
) -> xgb.Booster:
    """A binary:logistic XGBoost booster."""
    dtrain = xgb.DMatrix(train.X, label=train.y, feature_names=train.feature_names)
    params = {
        "objective": "binary:logistic",
        "eval_metric": "auc",
        "max_depth": depth,
        "eta": 0.2,
        "subsample": 0.9,
        "nthread": 1,
        "seed": seed,
    }
    return xgb.train(params, dtrain, num_boost_round=rounds)


def auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get their average rank)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy's rankdata, without scipy)."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def write_csv(path: Path, names: Sequence[str], X: np.ndarray, y: np.ndarray | None = None) -> None:
    """A CSV with a header; ``repr`` of floats round-trips exactly."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*names, LABEL] if y is not None else list(names))
        for i, row in enumerate(X):
            values = [_num(v) for v in row]
            writer.writerow([*values, _num(y[i])] if y is not None else values)


def _num(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def write_demo_package(
    directory: Path,
    *,
    rounds: int = DEFAULT_ROUNDS,
    depth: int = DEFAULT_DEPTH,
    seed: int = 0,
    name: str = "demo-package",
) -> DemoPackage:
    """Train the demo model and write it as a model package (plus its loose parts)."""
    directory.mkdir(parents=True, exist_ok=True)
    train, holdout = split(load_dataset())
    booster = train_model(train, rounds=rounds, depth=depth, seed=seed)
    holdout_scores = booster.inplace_predict(holdout.X)
    holdout_auc = auc(holdout.y, np.asarray(holdout_scores))

    model = directory / "model.ubj"
    booster.save_model(str(model))
    reference = directory / "reference.csv"
    write_csv(reference, train.feature_names, train.X)
    holdout_csv = directory / "holdout.csv"
    write_csv(holdout_csv, holdout.feature_names, holdout.X, holdout.y)
    manifest = {
        "description": DEMO_DESCRIPTION,
        "feature_names": train.feature_names,
        "class_names": CLASS_NAMES,
        "label": LABEL,
        "threshold": 0.5,
        "metrics": {"holdout_auc": round(holdout_auc, 6)},
    }
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    package = directory / f"{name}.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        for path in (model, manifest_path, reference, holdout_csv):
            tar.add(path, arcname=path.name, recursive=False)

    # One malignant and one benign row of the holdout, for examples that show both classes.
    picks = [int(np.flatnonzero(holdout.y == 1)[0]), int(np.flatnonzero(holdout.y == 0)[0])]
    return DemoPackage(
        package=package,
        model=model,
        reference=reference,
        holdout=holdout_csv,
        feature_names=list(train.feature_names),
        example_rows=[[float(v) for v in holdout.X[i]] for i in picks],
        example_labels=[int(holdout.y[i]) for i in picks],
        holdout_auc=holdout_auc,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treeserve_cli.demo OUTDIR``: write a demo model package to publish."""
    parser = argparse.ArgumentParser(
        prog="python -m treeserve_cli.demo",
        description="Train the demo XGBoost model (Breast Cancer Wisconsin (Diagnostic)) and "
        "write it as a model package: model.ubj, manifest.json, reference.csv, holdout.csv and "
        "demo-package.tar.gz with all four.",
    )
    parser.add_argument("outdir", metavar="OUTDIR", type=Path, help="folder to write into")
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help=f"boosting rounds ({DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--depth", type=int, default=DEFAULT_DEPTH, help=f"max tree depth ({DEFAULT_DEPTH})"
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (0)")
    args = parser.parse_args(argv)
    demo = write_demo_package(args.outdir, rounds=args.rounds, depth=args.depth, seed=args.seed)
    sys.stdout.write(
        f"wrote {demo.package} (holdout AUC {demo.holdout_auc:.4f}) and its parts "
        f"{demo.model.name}, manifest.json, {demo.reference.name}, {demo.holdout.name} "
        f"in {args.outdir}\n"
        f"publish it:  treeserve publish {demo.package} --wait\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- the second demo: Palmer Penguins, with categorical columns ---------------------------------

PENGUINS_FILE = "penguins.csv"
PENGUINS_MODEL = "penguins"  # the name the local stack publishes it under
PENGUINS_LABEL = "sex"
PENGUINS_CLASSES = ["female", "male"]
PENGUINS_CATEGORICAL = ("species", "island")
PENGUINS_NUMERIC = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")
PENGUINS_DESCRIPTION = (
    "Demo: probability that a penguin is male, from its species and island (categorical) and "
    "body measurements (Palmer Penguins, Gorman et al., CC0)"
)


@dataclass(frozen=True, slots=True)
class PenguinsPackage:
    """Files written by :func:`write_penguins_package` and examples for the curl lines."""

    package: Path
    reference: Path
    feature_names: list[str]
    categories: dict[str, list[str]]
    example_records: list[dict[str, str | float | None]]
    holdout_auc: float


def load_penguins() -> tuple[list[str], list[list[str]]]:
    """Header and rows (text) of the bundled Palmer Penguins data, rows without a sex dropped."""
    text = resources.files("treeserve_cli").joinpath("data", PENGUINS_FILE).read_text("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    sex = header.index(PENGUINS_LABEL)
    return header, [r for r in rows[1:] if r[sex] in PENGUINS_CLASSES]


def _penguin_matrix(
    header: list[str], rows: list[list[str]], categories: dict[str, list[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Features as XGBoost reads a DataFrame's category columns: codes in category order."""
    names = [*PENGUINS_CATEGORICAL, *PENGUINS_NUMERIC]
    X = np.full((len(rows), len(names)), np.nan)
    for j, name in enumerate(names):
        k = header.index(name)
        for i, row in enumerate(rows):
            cell = row[k]
            if cell in ("", "NA"):
                continue
            X[i, j] = categories[name].index(cell) if name in categories else float(cell)
    sex = header.index(PENGUINS_LABEL)
    y = np.array([PENGUINS_CLASSES.index(r[sex]) for r in rows], dtype=np.float64)
    return X, y


def write_penguins_package(directory: Path, *, seed: int = 0) -> PenguinsPackage:
    """Train a categorical model on Palmer Penguins and write it as a model package.

    Trained from a DMatrix of codes with ``feature_types="c"`` (no pandas in treeserve): such a
    model stores no category values, so ``manifest.json`` lists them (``categories``, in code
    order, as pandas orders a ``category`` column: sorted); the CSVs hold the values themselves.
    """
    directory.mkdir(parents=True, exist_ok=True)
    header, rows = load_penguins()
    categories = {
        name: sorted({r[header.index(name)] for r in rows} - {"", "NA"})
        for name in PENGUINS_CATEGORICAL
    }
    X, y = _penguin_matrix(header, rows, categories)
    names = [*PENGUINS_CATEGORICAL, *PENGUINS_NUMERIC]
    data = split(Dataset(names, X, y), seed=seed + SPLIT_SEED)
    train, holdout = data
    types = ["c"] * len(PENGUINS_CATEGORICAL) + ["float"] * len(PENGUINS_NUMERIC)
    dtrain = xgb.DMatrix(
        train.X, label=train.y, feature_names=names, feature_types=types, enable_categorical=True
    )
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.2, "nthread": 1}
    booster = xgb.train({**params, "seed": seed}, dtrain, num_boost_round=DEFAULT_ROUNDS)
    scores = booster.predict(
        xgb.DMatrix(holdout.X, feature_names=names, feature_types=types, enable_categorical=True)
    )
    holdout_auc = auc(holdout.y, np.asarray(scores))

    def as_text(X_: np.ndarray) -> list[list[str]]:
        return [
            [
                ("" if np.isnan(v) else categories[n][int(v)] if n in categories else _num(v))
                for n, v in zip(names, row, strict=True)
            ]
            for row in X_
        ]

    members: dict[str, bytes] = {"model.ubj": bytes(booster.save_raw("ubj"))}
    reference = directory / "reference.csv"
    reference.write_text(_csv_text(names, as_text(train.X)), encoding="utf-8")
    members["reference.csv"] = reference.read_bytes()
    members["holdout.csv"] = _csv_text(
        [*names, PENGUINS_LABEL],
        [
            [*r, PENGUINS_CLASSES[int(c)]]
            for r, c in zip(as_text(holdout.X), holdout.y, strict=True)
        ],
    ).encode()
    manifest = {
        "description": PENGUINS_DESCRIPTION,
        "class_names": PENGUINS_CLASSES,
        "label": PENGUINS_LABEL,
        "categories": categories,
        "metrics": {"holdout_auc": round(holdout_auc, 6)},
    }
    members["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    package = directory / "penguins-package.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        for member, content in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    examples = [dict(zip(names, r, strict=True)) for r in as_text(holdout.X[:2])]
    records: list[dict[str, str | float | None]] = [
        {k: (v if k in categories else float(v)) if v else None for k, v in e.items()}
        for e in examples
    ]
    return PenguinsPackage(package, reference, names, categories, records, holdout_auc)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows(rows)
    return out.getvalue()
