"""Static security checks that run in `make test`: no unpickling anywhere in the shipped code,
and ruff's bandit-derived ``S`` rules clean on everything the functions ship and the tools run.

(The template's IAM, TLS, public-access and API-auth checks live in
tests/unit/test_template_security.py.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.reliability

# Modules whose loaders execute code from the data they read.
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "joblib",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
}
UNSAFE_NAMES = {"pickle.load", "pickle.loads", "joblib.load", "marshal.loads", "marshal.load"}


def _python_files(*dirs: str) -> list[Path]:
    files = []
    for d in dirs:
        files.extend(p for p in (ROOT / d).rglob("*.py") if ".egg-info" not in str(p))
    return sorted(files)


def unsafe_uses(source: str) -> list[str]:
    """Imports of unpickling modules, their load calls, and ``allow_pickle=True`` in a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"from {node.module}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in UNSAFE_NAMES or func.endswith(".Unpickler"):
                found.append(func)
            for kw in node.keywords:
                if (
                    kw.arg == "allow_pickle"
                    and isinstance(kw.value, ast.Constant)
                    and kw.value.value is True
                ):
                    found.append(f"{func}(allow_pickle=True)")
    return found


def test_the_detector_finds_what_it_looks_for() -> None:
    """The checker itself: each way of unpickling is caught (so the real check can fail)."""
    assert unsafe_uses("import pickle")
    assert unsafe_uses("import joblib as jl")
    assert unsafe_uses("from pickle import loads")
    assert unsafe_uses("import numpy as np\nnp.load(f, allow_pickle=True)")
    assert unsafe_uses("x = something.Unpickler(f)")
    assert not unsafe_uses("import json\njson.loads(b'{}')")


def test_no_unpickling_in_shipped_code() -> None:
    """Nothing under functions/ (what Lambda runs) imports or calls an unpickler."""
    files = _python_files("functions")
    assert any(f.name == "settings.py" for f in files)  # the scan really looks at the package
    offenders = {
        str(f.relative_to(ROOT)): uses
        for f in files
        if (uses := unsafe_uses(f.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_ruff_security_rules_are_on_and_clean() -> None:
    """ruff's ``S`` rules (bandit's checks) are selected, and the code they cover is clean."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "S" in config["tool"]["ruff"]["lint"]["select"]
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run(
        [
            str(ruff),
            "check",
            "--no-cache",
            "--select",
            "S",
            "--output-format",
            "concise",
            "functions",
            "infra",
            "tests",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the sandbox child never unpickles ---------------------------------------------------------

# Prepended to the sandbox child's bootstrap: any unpickling that resolves a global (every
# exploit does) ends the child at once with status 97 and says so on stderr.
_AUDIT = (
    "import sys as _s, os as _o\n"
    "def _h(event, args):\n"
    "    if event == 'pickle.find_class':\n"
    "        _o.write(2, b'UNPICKLING IN THE SANDBOX\\n'); _o._exit(97)\n"
    "_s.addaudithook(_h)\n"
)


def test_the_audit_hook_catches_unpickling() -> None:
    """The check below can fail: the hook stops a child that unpickles."""
    code = (
        _AUDIT
        + "import pickle, collections\npickle.loads(pickle.dumps(collections.OrderedDict()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 97
    assert b"UNPICKLING IN THE SANDBOX" in proc.stderr


@pytest.mark.parametrize("fmt", ["ubj", "json"])
def test_the_sandbox_child_loads_and_predicts_without_unpickling(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """numpy imports ``pickle`` in the child, so "never imported" cannot hold; what matters is
    that nothing is unpickled: a real model loads, re-saves and predicts under the hook."""
    import numpy as np

    from tests.conftest import train
    from treeserve.model import sandbox

    model = train("multi:softprob", n=120, rounds=3)
    monkeypatch.setattr(sandbox, "_BOOTSTRAP", _AUDIT + sandbox._BOOTSTRAP)
    raw = model.ubj() if fmt == "ubj" else model.json()
    result = sandbox.inspect_model(raw, fmt, model.X[:5])  # type: ignore[arg-type]
    expected = model.booster.inplace_predict(model.X[:5])
    np.testing.assert_allclose(result.predictions, expected, rtol=1e-6)
    synthetic = sandbox.inspect_model(raw, fmt, None)  # type: ignore[arg-type]
    assert synthetic.synthetic
