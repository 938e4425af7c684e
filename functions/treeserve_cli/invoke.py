"""``treeserve invoke FUNCTION --event FILE``: `sam local invoke`, in-process and without Docker.

The function is resolved in template.yaml (:mod:`treeserve_cli.template`: Globals merged, Environment
with ``!Ref``/``!Sub`` resolved to local values, overridden by ``--env-vars`` as sam reads it);
its handler module is imported from the function's own source folder under a module name unique
to that folder (every handler file is called ``app.py``), with the function's environment set
(never clobbering ``AWS_ENDPOINT_URL`` or credentials from the shell), and called with the event
and a Lambda context. The result is printed to stdout as JSON, logs go to stderr; a handler that
raises prints the runtime's ``{"errorMessage", "errorType", ...}`` and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from treeserve.errors import ConfigurationError
from treeserve_cli.template import FunctionDef, Template, load_template

# Variables the shell owns: the template never overrides them, so a moto server in
# AWS_ENDPOINT_URL and the caller's credentials keep working.
SHELL_OWNED = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@dataclass
class LambdaContext:
    """The context object the Lambda runtime passes to a handler."""

    function_name: str
    memory_limit_in_mb: int
    timeout_seconds: int
    function_version: str = "$LATEST"
    invoked_function_arn: str = ""
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = ""
    log_stream_name: str = ""
    identity: Any = None
    client_context: Any = None
    _deadline: float = 0.0

    def __post_init__(self) -> None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        if not self.invoked_function_arn:
            self.invoked_function_arn = (
                f"arn:aws:lambda:{region}:123456789012:function:{self.function_name}"
            )
        self.log_group_name = self.log_group_name or f"/aws/lambda/{self.function_name}"
        self.log_stream_name = self.log_stream_name or time.strftime(
            "%Y/%m/%d/[$LATEST]local", time.gmtime()
        )
        self._deadline = time.monotonic() + self.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the function's Timeout (as the runtime counts them)."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass(frozen=True)
class InvokeResult:
    """What an invocation returned, or the error it raised (as the runtime reports it)."""

    payload: Any = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        return json.dumps(self.error if self.error is not None else self.payload, default=str)


def function_environment(
    fn: FunctionDef, overrides: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The function's environment: the template's, then sam-style ``--env-vars`` overrides.

    ``overrides`` is sam's format: ``{"Parameters": {...}}`` for every function and
    ``{"<LogicalId>": {...}}`` for one; a flat ``{"NAME": "value"}`` map applies to all.
    """
    env = dict(fn.environment)
    overrides = overrides or {}
    nested = any(isinstance(v, dict) for v in overrides.values())
    if nested:
        for scope in ("Parameters", fn.logical_id):
            env.update({k: str(v) for k, v in (overrides.get(scope) or {}).items()})
    else:
        env.update({k: str(v) for k, v in overrides.items()})
    return env


def runtime_environment(fn: FunctionDef, env: Mapping[str, str]) -> dict[str, str]:
    """What the Lambda runtime adds, plus ``env``; shell-owned variables are left out."""
    full = {
        "AWS_LAMBDA_FUNCTION_NAME": fn.function_name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_size),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(fn.timeout),
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{fn.runtime}",
        "_HANDLER": fn.handler,
        "LAMBDA_TASK_ROOT": str(fn.code_uri),
        # As under `sam local invoke`: Powertools' Tracer stays off outside the real service.
        "AWS_SAM_LOCAL": "true",
        **env,
    }
    return {k: v for k, v in full.items() if k not in SHELL_OWNED}


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in os.environ for the block, restoring what was there after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def module_name(source_dir: Path, module: str) -> str:
    """A module name unique to the handler's folder: every function's file is ``app.py``."""
    digest = hashlib.sha256(str(source_dir.resolve()).encode()).hexdigest()[:10]
    return f"_treeserve_fn_{source_dir.name}_{digest}.{module}".replace("-", "_")


def import_handler(source_dir: Path, handler: str, *, fresh: bool = False) -> Callable[..., Any]:
    """Import ``handler`` (``module.function``) from ``source_dir``; cached unless ``fresh``.

    A cached module is a warm execution environment; ``fresh=True`` is a cold start. Set the
    function's environment (:func:`environment`) before the first import: handlers read it at
    module scope.
    """
    module, _, attr = handler.rpartition(".")
    if not module or not attr:
        raise ConfigurationError(f"Handler {handler!r} is not of the form module.function")
    file = source_dir / (module.replace(".", "/") + ".py")
    if not file.is_file():
        raise ConfigurationError(f"Handler {handler!r}: {file} does not exist")
    name = module_name(source_dir, module)
    loaded: ModuleType | None = None if fresh else sys.modules.get(name)
    if loaded is None:
        package = name.rsplit(".", 1)[0]
        if package not in sys.modules:
            parent = ModuleType(package)
            parent.__path__ = [str(source_dir)]
            sys.modules[package] = parent
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"Handler {handler!r}: cannot import {file}")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    func = getattr(loaded, attr, None)
    if not callable(func):
        raise ConfigurationError(f"Handler {handler!r}: {file} has no callable {attr!r}")
    return func  # type: ignore[no-any-return]


def error_payload(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The error document the Lambda Python runtime returns for an unhandled exception."""
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "requestId": request_id,
        "stackTrace": traceback.format_tb(exc.__traceback__),
    }


def invoke(
    template: Template,
    function: str,
    event: Any,
    *,
    env_overrides: Mapping[str, Any] | None = None,
    fresh: bool = False,
) -> InvokeResult:
    """Invoke ``function`` of ``template`` in-process with ``event``, as Lambda would."""
    fn = template.function(function)
    env = runtime_environment(fn, function_environment(fn, env_overrides))
    context = LambdaContext(
        function_name=fn.function_name,
        memory_limit_in_mb=fn.memory_size,
        timeout_seconds=fn.timeout,
    )
    with environment(env):
        try:
            handler = import_handler(fn.code_uri, fn.handler, fresh=fresh)
            payload = handler(event, context)
            json.dumps(payload, default=str)  # the runtime serialises the result
        except Exception as exc:  # the runtime reports any exception as a failed invocation
            return InvokeResult(error=error_payload(exc, context.aws_request_id))
    return InvokeResult(payload=payload)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Handlers log to stdout (Powertools); like sam, keep stdout for the result alone."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real file descriptor (an embedded interpreter): redirect in Python
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    os.dup2(2, 1)
    try:
        # Python-level writes too: sys.stdout may not write through file descriptor 1.
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{what} {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{what} {path} is not JSON: {exc}") from None


def invoke_command(args: argparse.Namespace) -> int:
    """``treeserve invoke``: print the result (stdout) and return 0, or the error and 1."""
    template = load_template(args.template)
    event = _read_json(args.event, "event")
    overrides = _read_json(args.env_vars, "--env-vars") if args.env_vars else None
    with _stdout_to_stderr():
        result = invoke(template, args.function, event, env_overrides=overrides)
    sys.stdout.write(result.to_json() + "\n")
    sys.stdout.flush()
    if not result.ok:
        assert result.error is not None  # noqa: S101 - narrowing for mypy
        sys.stderr.write(
            f"treeserve invoke: {args.function} raised {result.error['errorType']}: "
            f"{result.error['errorMessage']}\n"
        )
        return 1
    return 0
