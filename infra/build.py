"""Build each Lambda function's artifact without Docker: ``python -m infra.build``.

For the Lambda runtime (``--platform lambda``, the default) pip installs cross-platform wheels
(manylinux, CPython 3.12, x86_64 or aarch64, binary only) of exactly what a function needs into
a folder, pinned to the versions of this environment when it has them, then the ``treeserve``
package and the function's ``app.py`` are copied in. Wheels are cached in ``build/wheels`` so a
second build runs offline. ``--platform local`` assembles the same artifact from this
interpreter's own installed distributions (read from their RECORD files): fast and offline, it
is what the tests import in a clean ``python -I`` subprocess.

Every artifact is pruned (tests, caches, stubs, botocore data of services treeserve never calls)
and measured; the build fails when an artifact is over its budget or contains a distribution
that must stay out (pandas, scikit-learn: ``import xgboost`` would import them).

SAM runs this through the Makefile (``BuildMethod: makefile``): ``make build-InferenceFunction``
with ``ARTIFACTS_DIR`` set calls ``python -m infra.build --function inference --out $ARTIFACTS_DIR``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter (sam build outside the venv): pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS_DIR = ROOT / "functions"
WHEEL_CACHE = ROOT / "build" / "wheels"
PIP_VENV = ROOT / "build" / "pip"
MIN_PIP = (24, 1)
DEFAULT_OUT = ROOT / "build" / "artifacts"
LAMBDA_PYTHON = "3.12"
MB = 1024 * 1024

# boto3 is in the Lambda runtime, but its version there trails the SDK and is not ours to pick:
# the registry relies on S3 conditional writes (If-None-Match on create, If-Match on the
# pointer), which need botocore >= 1.35.x. So every function bundles the boto3 it was tested with,
# pruned below to the services treeserve calls.
COMMON = ["numpy", "orjson", "aws-lambda-powertools[tracer]", "boto3"]


@dataclass(frozen=True)
class FunctionSpec:
    """What one function's artifact holds and how large it may be."""

    requirements: tuple[str, ...]
    budget_mb: int


# xgboost imports scipy (scipy.sparse) at import time, so scipy comes with it.
FUNCTIONS: dict[str, FunctionSpec] = {
    "inference": FunctionSpec((*COMMON, "scipy", "xgboost-cpu", "fastapi", "mangum"), 200),
    "refresh": FunctionSpec((*COMMON, "scipy", "xgboost-cpu"), 190),
    # Monitoring scores captured rows with the champion and its challengers (the challenger
    # comparison on live traffic, treeserve.monitoring.challenger) through the predictor that
    # serving uses, so it carries xgboost-cpu as inference and refresh do (the same 190 MB
    # budget as refresh, which holds the same distributions less isal). scipy for the
    # statistics. isal: ISA-L gzip, about 3x faster than zlib on captures
    # (treeserve.monitoring.pipeline falls back to zlib).
    "monitoring": FunctionSpec((*COMMON, "scipy", "xgboost-cpu", "isal"), 190),
    # The batch worker loads models as inference does (scipy: the xgboost package's import, for
    # categorical models), without the web framework.
    "batch": FunctionSpec((*COMMON, "scipy", "xgboost-cpu"), 190),
}

# Distributions that must never be in an artifact.
FORBIDDEN = ("pandas", "scikit-learn", "sklearn", "matplotlib", "dask", "pyarrow")

# botocore's data folder holds every AWS service's model (~28 MB); keep what treeserve calls
# (s3, sns, sqs; stepfunctions: the monitoring fan-out starts its map), xray (outside Lambda,
# i.e. without LAMBDA_TASK_ROOT, the X-Ray SDK behind Powertools' Tracer creates an xray client
# at import for its sampling rules: without the model the import fails) and what botocore needs
# to find credentials (sts, sso, sso-oidc).
BOTOCORE_SERVICES = {"s3", "sns", "sqs", "stepfunctions", "xray", "sts", "sso", "sso-oidc"}

# Folders named `tests` are test suites; `testing` folders are real modules (numpy.testing is
# imported by scipy) and stay.
PRUNE_DIRS = {"tests", "__pycache__", "benchmarks"}
PRUNE_SUFFIXES = (".pyc", ".pyo", ".pyi", ".pyx", ".pxd", ".c", ".cpp", ".h", ".hpp")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_tags(arch: str) -> list[str]:
    """Wheel platform tags the Lambda python3.12 runtime (Amazon Linux 2023, glibc 2.34) runs."""
    machine = {"x86_64": "x86_64", "arm64": "aarch64"}[arch]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in (34, 28, 17)]
    return [*tags, f"manylinux2014_{machine}"]


# --- the dependency closure from this interpreter's installed distributions ------------------


def _requirement(spec: str) -> tuple[str, set[str]]:
    req = Requirement(spec)
    return canonical(req.name), set(req.extras)


def closure(requirements: tuple[str, ...]) -> dict[str, md.Distribution]:
    """Every installed distribution the requirements need (markers evaluated for this Python)."""
    found: dict[str, md.Distribution] = {}
    todo = [_requirement(r) for r in requirements]
    seen_extras: dict[str, set[str]] = {}
    while todo:
        name, extras = todo.pop()
        if name in found and extras <= seen_extras.get(name, set()):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"build: {name} is not installed in {sys.prefix}") from None
        found[name] = dist
        seen_extras.setdefault(name, set()).update(extras)
        for raw in dist.requires or []:
            req = Requirement(raw)
            active = (
                req.marker is None
                or any(req.marker.evaluate({"extra": e}) for e in extras)
                or req.marker.evaluate({"extra": ""})
            )
            if active:
                todo.append((canonical(req.name), set(req.extras)))
    return found


def constraints_text(requirements: tuple[str, ...]) -> str:
    """Pins for pip: the versions this environment runs (and was tested with), when present."""
    try:
        dists = closure(requirements)
    except SystemExit:
        return ""
    return "".join(f"{name}=={dist.version}\n" for name, dist in sorted(dists.items()))


def copy_local_distributions(requirements: tuple[str, ...], target: Path) -> None:
    """Assemble site-packages for this interpreter from installed files (hard links when possible)."""
    for name, dist in closure(requirements).items():
        if name == "treeserve":
            continue
        for file in dist.files or []:
            if str(file).startswith(".."):  # console scripts outside site-packages
                continue
            src = Path(str(dist.locate_file(file)))
            if not src.is_file():
                continue
            dest = target / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                continue
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)


# --- cross-platform wheels for the Lambda runtime ---------------------------------------------


def build_pip() -> Path:
    """The interpreter of ``build/pip``: a venv of the build's own with a current pip.

    pip 23.x (what many machines' Pythons ship) checks a wheel's Requires-Python against the
    running interpreter instead of ``--python-version`` in ``--target`` installs, so a build run
    by Python 3.11 fails on numpy for 3.12 ("requires a different Python"). The build therefore
    never uses the caller's pip; it makes this venv once (later builds reuse it, offline).
    """
    python = PIP_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if python.is_file() and _pip_version(python) >= MIN_PIP:
        return python
    log(f"  creating {PIP_VENV.relative_to(ROOT)} with pip >= {'.'.join(map(str, MIN_PIP))} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PIP_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            f"pip>={'.'.join(map(str, MIN_PIP))}",
        ],
        check=True,
    )
    return python


def _pip_version(python: Path) -> tuple[int, ...]:
    found = subprocess.run(
        [str(python), "-m", "pip", "--version"], capture_output=True, text=True, check=False
    )
    match = re.match(r"pip (\d+)\.(\d+)", found.stdout)
    return tuple(int(v) for v in match.groups()) if match else (0,)


def pip_install_lambda(requirements: tuple[str, ...], target: Path, arch: str) -> None:
    """pip install manylinux wheels for CPython 3.12 into ``target``; offline when cached."""
    pip_python = str(build_pip())
    cache = WHEEL_CACHE / f"cp{LAMBDA_PYTHON.replace('.', '')}-{arch}"
    cache.mkdir(parents=True, exist_ok=True)
    platform_args: list[str] = []
    for tag in platform_tags(arch):
        platform_args += ["--platform", tag]
    common = [
        *platform_args,
        "--python-version",
        LAMBDA_PYTHON,
        "--implementation",
        "cp",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(constraints_text(requirements))
        constraints = fh.name
    try:
        install = [
            pip_python,
            "-m",
            "pip",
            "install",
            *common,
            "--target",
            str(target),
            "--no-compile",
            "--upgrade",
            "-c",
            constraints,
            *requirements,
        ]
        offline = [*install[:4], "--no-index", "--find-links", str(cache), *install[4:]]
        if subprocess.run(offline, capture_output=True, check=False).returncode == 0:
            log(f"  installed from the wheel cache {cache.relative_to(ROOT)}")
            return
        log(f"  downloading wheels into {cache.relative_to(ROOT)} (once; later builds are offline)")
        download = [
            pip_python,
            "-m",
            "pip",
            "download",
            *common,
            "-d",
            str(cache),
            "-c",
            constraints,
            *requirements,
        ]
        subprocess.run(download, check=True)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(offline, check=True)
    finally:
        Path(constraints).unlink(missing_ok=True)


# --- assembling, pruning, measuring -----------------------------------------------------------


# Each function's artifact holds treeserve's top-level modules (settings, errors, the AWS
# adapter) and the subpackages that function imports; never the shell tools (the separate
# `treeserve_cli` package: CLI, local stack, template reader, demo, HTML report).
SUBPACKAGES: dict[str, tuple[str, ...]] = {
    "inference": ("model", "registry", "serving"),
    "refresh": ("model", "registry", "refresh"),
    "monitoring": ("model", "registry", "monitoring"),
    # serving: the inference API's input parser and CSV table (inputs, endpoints), reused as is.
    "batch": ("model", "registry", "serving", "batch"),
}


def copy_sources(function: str, target: Path) -> None:
    """treeserve's top-level modules, the subpackages the function imports, and its handler."""
    if function not in SUBPACKAGES:
        raise SystemExit(f"build: no subpackage list for function {function!r} in infra/build.py")
    package = FUNCTIONS_DIR / "treeserve"
    (target / "treeserve").mkdir(parents=True, exist_ok=True)
    for source in [*package.glob("*.py"), package / "py.typed"]:
        shutil.copy2(source, target / "treeserve" / source.name)
    for sub in SUBPACKAGES[function]:
        shutil.copytree(
            package / sub,
            target / "treeserve" / sub,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    handler_dir = FUNCTIONS_DIR / function
    handler = handler_dir / "app.py"
    if not handler.is_file():
        raise SystemExit(f"build: {handler.relative_to(ROOT)} does not exist")
    for source in handler_dir.glob("*.py"):
        shutil.copy2(source, target / source.name)


def prune(target: Path) -> int:
    """Remove what never runs in Lambda; returns the bytes removed."""
    removed = 0

    def drop(path: Path) -> None:
        nonlocal removed
        if path.is_dir() and not path.is_symlink():
            removed += tree_size(path)
            shutil.rmtree(path)
        elif path.exists():
            removed += path.stat().st_size
            path.unlink()

    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.exists():
            continue
        if path.is_dir():
            if path.name in PRUNE_DIRS:
                drop(path)
        elif path.suffix in PRUNE_SUFFIXES:
            drop(path)
    for extra in ("bin", "xgboost/doc", "xgboost/demo"):
        if (target / extra).exists():
            drop(target / extra)
    data = target / "botocore" / "data"
    if data.is_dir():
        for service in data.iterdir():
            if service.is_dir() and service.name not in BOTOCORE_SERVICES:
                drop(service)
    return removed


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def zipped_size(path: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "artifact.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for file in sorted(path.rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(path).as_posix())
        return archive.stat().st_size


def check_forbidden(target: Path) -> None:
    present = [
        d.name
        for d in target.glob("*.dist-info")
        if canonical(d.name.rsplit("-", 1)[0]) in {canonical(f) for f in FORBIDDEN}
    ]
    present += [name for name in ("pandas", "sklearn") if (target / name).exists()]
    if present:
        raise SystemExit(f"build: forbidden distributions in the artifact: {sorted(set(present))}")


@dataclass
class BuildResult:
    function: str
    path: Path
    unzipped: int
    zipped: int | None
    budget_mb: int

    @property
    def over_budget(self) -> bool:
        return self.unzipped > self.budget_mb * MB


def build(
    function: str,
    out: Path,
    *,
    platform: str = "lambda",
    arch: str = "x86_64",
    measure_zip: bool = False,
) -> BuildResult:
    """Build ``function``'s artifact into ``out`` (replacing its contents) and measure it."""
    spec = FUNCTIONS[function]
    log(
        f"==> {function}: {platform} artifact ({arch if platform == 'lambda' else sys.version.split()[0]})"
    )
    out.mkdir(parents=True, exist_ok=True)
    children = list(out.iterdir())
    if children and not (out / "app.py").is_file():
        # Only an empty folder (SAM's ARTIFACTS_DIR) or a previous artifact is ever cleared.
        raise SystemExit(f"build: {out} is not empty and holds no artifact; refusing to clear it")
    for child in children:  # keep the folder itself: SAM created it
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    if platform == "lambda":
        pip_install_lambda(spec.requirements, out, arch)
    elif platform == "local":
        copy_local_distributions(spec.requirements, out)
    else:
        raise SystemExit(f"build: unknown platform {platform!r} (lambda or local)")
    copy_sources(function, out)
    prune(out)
    check_forbidden(out)
    result = BuildResult(
        function,
        out,
        tree_size(out),
        zipped_size(out) if measure_zip else None,
        spec.budget_mb,
    )
    zipped = f", {result.zipped / MB:.1f} MB zipped" if result.zipped is not None else ""
    log(
        f"    {function}: {result.unzipped / MB:.1f} MB unzipped{zipped} (budget {spec.budget_mb} MB)"
    )
    return result


LAMBDA_LIMIT_MB = 250


def bench() -> None:
    """`make bench` section: each Lambda artifact's size, and its share of Lambda's 250 MB limit.

    Builds the cross-platform artifacts (offline once the wheel cache is warm); without network
    and cache it falls back to local-platform artifacts and says so.
    """
    platform = "lambda"
    results = []
    for name in FUNCTIONS:
        try:
            results.append(build(name, DEFAULT_OUT / name, platform=platform, measure_zip=True))
        except subprocess.CalledProcessError:
            log("  no network and no cached wheels: measuring local-platform artifacts instead")
            platform = "local"
            results.append(build(name, DEFAULT_OUT / name, platform=platform, measure_zip=True))
    print(f"artifacts ({platform} platform): unzipped size / Lambda's {LAMBDA_LIMIT_MB} MB limit")
    print(
        f"{'function':<12} {'unzipped MB':>12} {'zipped MB':>10} {'of limit':>9} {'budget MB':>10}"
    )
    for r in results:
        print(
            f"{r.function:<12} {r.unzipped / MB:12.1f} {(r.zipped or 0) / MB:10.1f} "
            f"{r.unzipped / (LAMBDA_LIMIT_MB * MB):9.2f} {r.budget_mb:10d}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--function", choices=[*FUNCTIONS, "all"], default="all")
    parser.add_argument(
        "--out",
        type=Path,
        help="artifact folder (one function) or parent folder (all); default build/artifacts",
    )
    parser.add_argument("--platform", choices=["lambda", "local"], default="lambda")
    parser.add_argument(
        "--arch",
        choices=["x86_64", "arm64"],
        default=os.environ.get("ARCH", "x86_64"),
        help="Lambda architecture (match the template's Architecture parameter)",
    )
    parser.add_argument("--zip", action="store_true", help="also measure the zipped size")
    args = parser.parse_args(argv)

    names = list(FUNCTIONS) if args.function == "all" else [args.function]
    results = []
    for name in names:
        if args.function == "all" or args.out is None:
            out = (args.out or DEFAULT_OUT) / name
        else:
            out = args.out
        results.append(
            build(name, out, platform=args.platform, arch=args.arch, measure_zip=args.zip)
        )

    print(f"{'function':<12} {'unzipped MB':>12} {'zipped MB':>10} {'budget MB':>10}  path")
    for r in results:
        zipped = f"{r.zipped / MB:10.1f}" if r.zipped is not None else f"{'-':>10}"
        print(f"{r.function:<12} {r.unzipped / MB:12.1f} {zipped} {r.budget_mb:10d}  {r.path}")
    over = [r for r in results if r.over_budget]
    for r in over:
        log(
            f"build: {r.function} is {r.unzipped / MB:.1f} MB unzipped, over its {r.budget_mb} MB "
            "budget (Lambda's limit is 250 MB): drop a dependency or prune more in infra/build.py"
        )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
