"""The bad-upload corpus and a package builder, shared by the package, refresh and reliability tests.

Every case is built from a real trained model at test time (nothing binary is committed). The
hostile ones are made the way an attacker or a careless user would make them: real pickles
(created, never loaded), real tarballs with links and path tricks, a real gzip bomb (small on
disk, over a GiB once inflated), models edited to predict NaN or infinity.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb

from tests.conftest import TrainedModel

REFERENCE_ROWS = 100
HOLDOUT_ROWS = 100
LABEL = "label"


@dataclass(frozen=True)
class BadUpload:
    """One upload that must be refused, with the UploadRejected.code it must be refused with."""

    name: str
    filename: str
    data: bytes
    code: str


# --- building blocks -----------------------------------------------------------------------------


def csv_bytes(header: list[str], rows: Iterable[Iterable[Any]]) -> bytes:
    lines = [",".join(header)]
    for row in rows:
        lines.append(
            ",".join(
                ""
                if v is None
                else repr(float(v))
                if isinstance(v, float | np.floating)
                else str(v)
                for v in row
            )
        )
    return ("\n".join(lines) + "\n").encode()


def reference_csv(model: TrainedModel, rows: int = REFERENCE_ROWS) -> bytes:
    return csv_bytes(model.feature_names, model.X[:rows].tolist())


def holdout_csv(model: TrainedModel, rows: int = HOLDOUT_ROWS, label: str = LABEL) -> bytes:
    X = model.X[REFERENCE_ROWS : REFERENCE_ROWS + rows]
    y = model.y[REFERENCE_ROWS : REFERENCE_ROWS + rows]
    is_class = not model.objective.startswith("reg:")
    return csv_bytes(
        [*model.feature_names, label],
        [
            [*x, int(t) if is_class else float(t)]
            for x, t in zip(X.tolist(), y.tolist(), strict=True)
        ],
    )


def tar_gz(
    members: Iterable[tuple[tarfile.TarInfo, bytes | None]], *, compresslevel: int = 9
) -> bytes:
    """A gzip tarball from explicit TarInfo records (so tests can make links, devices, paths)."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=compresslevel
    ) as archive:
        for info, content in members:
            if content is not None:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                archive.addfile(info)
    return buf.getvalue()


def file_member(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = 1_700_000_000
    return info, content


def make_package(
    model: TrainedModel,
    *,
    manifest: dict[str, Any] | None = None,
    reference: bool = True,
    holdout: bool = True,
    fmt: str = "ubj",
    extra_members: dict[str, bytes] | None = None,
) -> bytes:
    """A valid .tar.gz model package (extra_members are added or replace members by name)."""
    members: dict[str, bytes] = {f"model.{fmt}": model.ubj() if fmt == "ubj" else model.json()}
    if manifest is not None:
        members["manifest.json"] = json.dumps(manifest).encode()
    if reference:
        members["reference.csv"] = reference_csv(model)
    if holdout:
        members["holdout.csv"] = holdout_csv(model)
    members.update(extra_members or {})
    return tar_gz(file_member(name, content) for name, content in members.items())


def _edited_json_model(model: TrainedModel, leaf_value: float, trees: int | None = None) -> bytes:
    """The model as JSON with every leaf of the first ``trees`` trees set to ``leaf_value``."""
    doc = json.loads(model.json())
    for tree in doc["learner"]["gradient_booster"]["model"]["trees"][:trees]:
        leaves = [left == -1 for left in tree["left_children"]]
        for key in ("split_conditions", "base_weights"):
            tree[key] = [
                leaf_value if leaf else v for leaf, v in zip(leaves, tree[key], strict=True)
            ]
    return json.dumps(doc).encode()  # json writes NaN/Infinity literals, as XGBoost does


def crafted_ubj(ubj: bytes, key: str, value: int, *, tree: int = 0) -> bytes:
    """The UBJ model with every entry of tree ``tree``'s int32 array ``key`` set to ``value``.

    A structurally valid file that XGBoost trusts: out-of-range split indices or child ids make
    xgboost-cpu 3.2 read out of bounds (SIGSEGV).
    """
    needle = struct.pack(">BQ", ord("L"), len(key)) + key.encode() + b"[$l#L"
    out = bytearray(ubj)
    start = -1
    for _ in range(tree + 1):
        start = ubj.index(needle, start + 1)
    count_at = start + len(needle)
    (count,) = struct.unpack(">q", ubj[count_at : count_at + 8])
    data_at = count_at + 8
    out[data_at : data_at + 4 * count] = struct.pack(">i", value) * count
    return bytes(out)


@functools.cache
def _wide_model_ubj(num_features: int) -> bytes:
    """A real model trained on more features than the default cap allows."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, num_features)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.float32)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 1, "nthread": 1},
        xgb.DMatrix(X, label=y),
        num_boost_round=1,
    )
    return bytes(booster.save_raw("ubj"))


def _gzip_of_prefix_and_zeros(prefix: bytes, zeros: int) -> bytes:
    """gzip(prefix + b"\\0" * zeros) without ever holding (or compressing) the zeros in full.

    A raw deflate stream may be concatenated from independently compressed, full-flushed
    pieces; one MiB of zeros compresses to about a KiB, so a GiB costs about a MiB on disk.
    """
    chunk = 1 << 20
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = first.compress(prefix) + first.flush(zlib.Z_FULL_FLUSH)
    piece = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_block = piece.compress(b"\0" * chunk) + piece.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(zeros, chunk)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(b"\0" * rest) + last.flush()
    crc = zlib.crc32(prefix)
    zero_crc_chunk = b"\0" * chunk
    for _ in range(whole):
        crc = zlib.crc32(zero_crc_chunk, crc)
    crc = zlib.crc32(b"\0" * rest, crc)
    size = (len(prefix) + zeros) & 0xFFFFFFFF
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + head + zero_block * whole + tail + struct.pack("<II", crc, size)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padded(content: bytes) -> bytes:
    return content + b"\0" * (-len(content) % 512)


@functools.cache
def gzip_bomb(model_ubj: bytes, inflated: int = (1 << 30) + (1 << 20)) -> bytes:
    """A valid .tar.gz: model.ubj, then a reference.csv member of ``inflated`` zero bytes."""
    prefix = _tar_header("model.ubj", len(model_ubj)) + _padded(model_ubj)
    prefix += _tar_header("reference.csv", inflated)
    body = inflated + (-inflated % 512) + 1024  # the member, then the two end-of-archive blocks
    return _gzip_of_prefix_and_zeros(prefix, body)


@functools.cache
def trailing_zeros_bomb(package: bytes, zeros: int = 64 << 20) -> bytes:
    """A valid package whose gzip stream goes on with ``zeros`` zero bytes after the tar's end."""
    return _gzip_of_prefix_and_zeros(gzip.decompress(package), zeros)


# --- the corpus ----------------------------------------------------------------------------------


def bad_uploads(good: TrainedModel) -> list[BadUpload]:
    """Hostile and broken uploads built from ``good`` (a binary classifier with names f0..)."""
    ubj, js = good.ubj(), good.json()
    the_pickle = pickle.dumps(good.booster, protocol=pickle.HIGHEST_PROTOCOL)
    ref, hold = reference_csv(good), holdout_csv(good)
    names = good.feature_names
    cases: list[BadUpload] = []

    def add(name: str, filename: str, data: bytes, code: str) -> None:
        cases.append(BadUpload(name, filename, data, code))

    def pkg(**kwargs: Any) -> bytes:
        return make_package(good, **kwargs)

    # Serialized Python: detected by content, never unpickled.
    add("pickle", "model.pkl", the_pickle, "pickle")
    add("pickle_protocol2", "model.pkl", pickle.dumps({"model": [1, 2]}, protocol=2), "pickle")
    add("pickle_protocol0", "model.pickle", pickle.dumps({"model": [1, 2]}, protocol=0), "pickle")
    add("joblib_zlib", "model.joblib", zlib.compress(the_pickle, 3), "pickle")
    add("joblib_gzip", "model.joblib.gz", gzip.compress(the_pickle, 3), "pickle")
    add("pickle_renamed_ubj", "model.ubj", the_pickle, "pickle")
    add("pickle_renamed_targz", "model.tar.gz", the_pickle, "pickle")
    npy = io.BytesIO()
    np.save(npy, np.array([{"booster": 1}], dtype=object), allow_pickle=True)
    add("numpy_object_array", "model.npy", npy.getvalue(), "pickle")
    add("polyglot_pickle_after_ubj", "model.ubj", ubj + the_pickle, "pickle")
    add("polyglot_pickle_after_json", "model.json", js + b"\n" + the_pickle, "pickle")
    add(
        "pickle_as_model_in_tar",
        "model.tar.gz",
        pkg(extra_members={"model.ubj": the_pickle}),
        "pickle",
    )
    add(
        "pickle_as_reference_in_tar",
        "model.tar.gz",
        pkg(extra_members={"reference.csv": the_pickle}),
        "pickle",
    )

    # Broken or unknown files.
    add("empty", "model.ubj", b"", "empty")
    add("garbage", "model.ubj", b"\x00" + np.random.default_rng(7).bytes(4095), "unknown_format")
    add("text", "model.json", b"hello, this is not a model\n", "unknown_format")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("model.ubj", ubj)
    add("zip_archive", "model.zip", zipped.getvalue(), "unknown_format")
    add("gzipped_bare_model", "model.ubj.gz", gzip.compress(ubj), "unknown_format")
    plain_tar = io.BytesIO()
    with tarfile.open(fileobj=plain_tar, mode="w") as archive:
        info, content = file_member("model.ubj", ubj)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    add("uncompressed_tar", "model.tar", plain_tar.getvalue(), "unknown_format")
    add("truncated_ubj", "model.ubj", ubj[: len(ubj) // 2], "corrupt")
    add("truncated_json", "model.json", js[: len(js) // 2], "corrupt")
    add("ubj_with_trailing_bytes", "model.ubj", ubj + b"trailing junk", "corrupt")
    add("json_not_a_model", "model.json", b'{"hello": "world"}', "corrupt")
    package = pkg()
    add("truncated_gzip", "model.tar.gz", package[: len(package) // 2], "corrupt")
    add("corrupt_gzip", "model.tar.gz", package[:40] + bytes(64) + package[104:], "corrupt")
    unknown_objective = json.loads(js)
    unknown_objective["learner"]["objective"]["name"] = "binary:made_up"
    add("unknown_objective", "model.json", json.dumps(unknown_objective).encode(), "load_failed")

    # Archive tricks.
    def with_member(info: tarfile.TarInfo, content: bytes | None = None) -> bytes:
        return tar_gz([file_member("model.ubj", ubj), (info, content)])

    link = tarfile.TarInfo("reference.csv")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    add("symlink_member", "model.tar.gz", with_member(link), "link_member")
    hard = tarfile.TarInfo("reference.csv")
    hard.type, hard.linkname = tarfile.LNKTYPE, "model.ubj"
    add("hardlink_member", "model.tar.gz", with_member(hard), "link_member")
    device = tarfile.TarInfo("reference.csv")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    add("device_member", "model.tar.gz", with_member(device), "special_member")
    fifo = tarfile.TarInfo("holdout.csv")
    fifo.type = tarfile.FIFOTYPE
    add("fifo_member", "model.tar.gz", with_member(fifo), "special_member")
    add(
        "absolute_path",
        "model.tar.gz",
        tar_gz([file_member("/tmp/model.ubj", ubj)]),
        "path_traversal",
    )
    add(
        "dotdot_path",
        "model.tar.gz",
        tar_gz([file_member("../../model.ubj", ubj)]),
        "path_traversal",
    )
    add(
        "duplicate_member",
        "model.tar.gz",
        tar_gz([file_member("model.ubj", ubj), file_member("model.ubj", ubj)]),
        "duplicate_member",
    )
    add(
        "ubj_and_json",
        "model.tar.gz",
        tar_gz([file_member("model.ubj", ubj), file_member("model.json", js)]),
        "duplicate_member",
    )
    add(
        "unexpected_member",
        "model.tar.gz",
        tar_gz([file_member("model.ubj", ubj), file_member("train.py", b"print('hi')\n")]),
        "unexpected_member",
    )
    add(
        "nested_member",
        "model.tar.gz",
        tar_gz([file_member("a/b/model.ubj", ubj)]),
        "unexpected_member",
    )
    folders = []
    for i in range(9):
        folder = tarfile.TarInfo(f"d{i}")
        folder.type = tarfile.DIRTYPE
        folders.append((folder, None))
    add(
        "too_many_members",
        "model.tar.gz",
        tar_gz([file_member("model.ubj", ubj), *folders]),
        "too_many_members",
    )
    add("gzip_bomb", "model.tar.gz", gzip_bomb(ubj), "too_large")
    add("trailing_zeros_bomb", "model.tar.gz", trailing_zeros_bomb(pkg(holdout=False)), "too_large")
    add(
        "package_without_model",
        "model.tar.gz",
        tar_gz([file_member("reference.csv", ref)]),
        "missing_model",
    )
    add("empty_model_member", "model.tar.gz", tar_gz([file_member("model.ubj", b"")]), "empty")

    # Crafted trees XGBoost would trust and read out of bounds with (a segfault when loaded).
    add(
        "split_on_missing_feature", "model.ubj", crafted_ubj(ubj, "split_indices", 10**9), "corrupt"
    )
    add("negative_split_index", "model.ubj", crafted_ubj(ubj, "split_indices", -5), "corrupt")
    add("child_outside_tree", "model.ubj", crafted_ubj(ubj, "left_children", 10**6), "corrupt")
    add(
        "cyclic_tree",
        "model.ubj",
        crafted_ubj(crafted_ubj(ubj, "left_children", 1), "right_children", 2),
        "corrupt",
    )
    info_at = ubj.index(b"tree_info[#L") + len(b"tree_info[#L") + 8
    assert ubj[info_at : info_at + 2] == b"i\x00"  # the first tree's output group
    wrong_group = ubj[:info_at] + b"i\x07" + ubj[info_at + 2 :]
    add("tree_in_missing_output", "model.ubj", wrong_group, "corrupt")

    # Models that load but must not serve.
    add("huge_feature_count", "model.ubj", _wide_model_ubj(10_001), "too_many_features")
    add("nan_leaves", "model.json", _edited_json_model(good, float("nan"), trees=1), "non_finite")
    infinite = json.loads(_edited_json_model(good, float("inf"), trees=1))
    second = infinite["learner"]["gradient_booster"]["model"]["trees"][1]
    for key in ("split_conditions", "base_weights"):
        second[key] = [
            float("-inf") if left == -1 else v
            for left, v in zip(second["left_children"], second[key], strict=True)
        ]
    add("infinite_leaves", "model.json", json.dumps(infinite).encode(), "non_finite")
    add(
        "nan_leaves_in_package",
        "model.tar.gz",
        pkg(fmt="json", extra_members={"model.json": _edited_json_model(good, float("nan"), 1)}),
        "non_finite",
    )

    # Manifests that disagree with the model, or with themselves.
    add(
        "manifest_feature_count",
        "model.tar.gz",
        pkg(manifest={"feature_names": names[:-1]}),
        "manifest_mismatch",
    )
    renamed = [*names[:-1], "not_" + names[-1]]
    add(
        "manifest_feature_names",
        "model.tar.gz",
        pkg(manifest={"feature_names": renamed}),
        "manifest_mismatch",
    )
    add(
        "manifest_class_names_count",
        "model.tar.gz",
        pkg(manifest={"class_names": ["a", "b", "c"]}),
        "manifest_mismatch",
    )
    add(
        "manifest_threshold_range",
        "model.tar.gz",
        pkg(manifest={"threshold": 1.5}),
        "manifest_invalid",
    )
    add(
        "manifest_threshold_zero",
        "model.tar.gz",
        pkg(manifest={"threshold": 0}),
        "manifest_invalid",
    )
    add(
        "manifest_unknown_key",
        "model.tar.gz",
        pkg(manifest={"run_this": "rm -rf /"}),
        "manifest_invalid",
    )
    add(
        "manifest_not_json",
        "model.tar.gz",
        pkg(extra_members={"manifest.json": b"{name: nope"}),
        "manifest_invalid",
    )

    # CSVs that do not fit the features.
    wrong_header = ref.replace(b"f0,", b"age,", 1)
    add(
        "reference_wrong_columns",
        "model.tar.gz",
        pkg(extra_members={"reference.csv": wrong_header}),
        "csv_mismatch",
    )
    narrow = csv_bytes(names[:-1], good.X[:10, :-1].tolist())
    add(
        "reference_too_narrow",
        "model.tar.gz",
        pkg(extra_members={"reference.csv": narrow}),
        "csv_mismatch",
    )
    ragged = ref + b"1.0,2.0\n"
    add(
        "reference_ragged_row",
        "model.tar.gz",
        pkg(extra_members={"reference.csv": ragged}),
        "csv_mismatch",
    )
    lines = ref.split(b"\n")
    lines[3] = b"abc," + lines[3].split(b",", 1)[1]
    add(
        "reference_non_numeric",
        "model.tar.gz",
        pkg(extra_members={"reference.csv": b"\n".join(lines)}),
        "csv_invalid",
    )
    many = csv_bytes(names, ([0] * len(names) for _ in range(200_001)))
    add(
        "reference_too_many_rows",
        "model.tar.gz",
        pkg(extra_members={"reference.csv": many}),
        "too_many_rows",
    )
    no_label = csv_bytes(names, good.X[:10].tolist())
    add(
        "holdout_missing_label",
        "model.tar.gz",
        pkg(extra_members={"holdout.csv": no_label}),
        "missing_label",
    )
    bad_label = hold.replace(b"\n", b"\n" + b",".join([b"0"] * len(names)) + b",7\n", 1)
    add(
        "holdout_label_not_a_class",
        "model.tar.gz",
        pkg(extra_members={"holdout.csv": bad_label}),
        "csv_invalid",
    )
    return cases


# --- crafted models the structural checks refuse (issue 13) --------------------------------------


def _json_doc(model: TrainedModel) -> dict[str, Any]:
    return json.loads(model.json())  # type: ignore[no-any-return]


def _trees_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["learner"]["gradient_booster"]["model"]["trees"]  # type: ignore[no-any-return]


def chain_tree_model(model: TrainedModel, depth: int) -> bytes:
    """The model as JSON with tree 0 replaced by a chain ``depth`` splits deep.

    Inner node 2k splits feature k % d at 0 (missing goes right) and has a leaf on its left and
    the next inner node on its right: a valid tree that XGBoost loads and predicts with, whose
    TreeSHAP working memory grows with the square of its depth.
    """
    doc = _json_doc(model)
    tree = _trees_of(doc)[0]
    d = int(doc["learner"]["learner_model_param"]["num_feature"])
    n = 2 * depth + 1
    inner = [2 * k for k in range(depth)]
    left, right = [-1] * n, [-1] * n
    parents = [2147483647] * n
    index, cond = [0] * n, [0.0] * n
    for k, node in enumerate(inner):
        left[node], right[node] = node + 1, node + 2
        parents[node + 1] = parents[node + 2] = node
        index[node] = k % d
        cond[node] = 0.0
    for node in range(n):
        if left[node] == -1:
            cond[node] = 0.01  # leaf value
    tree.update(
        {
            "left_children": left,
            "right_children": right,
            "parents": parents,
            "split_indices": index,
            "split_conditions": cond,
            "split_type": [0] * n,
            "default_left": [0] * n,
            "base_weights": cond,
            "loss_changes": [1.0] * n,
            "sum_hessian": [float(n - i) for i in range(n)],
        }
    )
    tree["tree_param"]["num_nodes"] = str(n)
    return json.dumps(doc).encode()


def edited_model(model: TrainedModel, edit: Any) -> bytes:
    """The model as JSON after ``edit(doc)``."""
    doc = _json_doc(model)
    edit(doc)
    return json.dumps(doc).encode()


def repeated_trees_model(model: TrainedModel, trees: int) -> bytes:
    """The model as UBJ with its trees repeated up to ``trees`` trees (issue 13, row 2: a valid
    model that costs the inference function as much memory and load time as one likes).

    Built by editing the JSON document (cheap) and letting XGBoost write the UBJ."""
    doc = _json_doc(model)
    model_doc = doc["learner"]["gradient_booster"]["model"]
    source = model_doc["trees"]
    info = model_doc["tree_info"]
    groups = max(1, int(model_doc["gbtree_model_param"].get("num_parallel_tree", "1")))
    per_round = max(1, len(source) // max(1, len(model_doc["iteration_indptr"]) - 1)) * groups
    rounds = max(1, trees // per_round)
    count = rounds * per_round
    out = []
    for i in range(count):
        tree = dict(source[i % len(source)])
        tree["id"] = i
        out.append(tree)
    model_doc["trees"] = out
    model_doc["tree_info"] = [info[i % len(info)] for i in range(count)]
    model_doc["gbtree_model_param"]["num_trees"] = str(count)
    model_doc["iteration_indptr"] = [r * per_round for r in range(rounds + 1)]
    doc["learner"]["attributes"] = {}
    booster = xgb.Booster(model_file=bytearray(json.dumps(doc).encode()))
    return bytes(booster.save_raw("ubj"))


def long_decimals_csv(
    names: list[str], rows: int, digits: int, *, label: str | None = None, seed: int = 0
) -> bytes:
    """A CSV of ``rows`` rows whose every feature is ``0.<digits random digits>`` (issue 13,
    row 4: 200,000 rows of long decimals stay within the caps and cost the parser dearly);
    ``label`` adds a 0/1 label column. Built with numpy: a 258 MB file takes a second."""
    rng = np.random.default_rng(seed)
    width = digits + 3  # "0." + digits + separator
    cells = np.empty((rows, len(names), width), dtype=np.uint8)
    cells[:, :, 0] = ord("0")
    cells[:, :, 1] = ord(".")
    cells[:, :, 2:-1] = rng.integers(ord("0"), ord("9") + 1, size=(rows, len(names), digits))
    cells[:, :, -1] = ord(",")
    if label is None:
        cells[:, -1, -1] = ord("\n")
        body = cells.tobytes()
    else:
        labels = np.empty((rows, 2), dtype=np.uint8)
        labels[:, 0] = rng.integers(ord("0"), ord("1") + 1, size=rows)
        labels[:, 1] = ord("\n")
        body = np.concatenate([cells.reshape(rows, -1), labels], axis=1).tobytes()
    header = ",".join([*names, *([label] if label else [])]) + "\n"
    return header.encode() + body
