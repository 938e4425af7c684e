"""One typed settings object, read from the environment that template.yaml sets."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from treeserve.errors import ConfigurationError

PromotionMode = Literal["auto", "manual", "live"]
PROMOTION_MODES: tuple[PromotionMode, ...] = ("auto", "manual", "live")
DriftMethod = Literal["psi", "ks", "wasserstein"]

MAX_LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024
# A monitoring window is read in one invocation: past a month it cannot finish in the timeout.
MAX_WINDOW_HOURS = 24.0 * 31
# Model names are S3 key segments and metric dimensions: keep them boring.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


# Drift rules (treeserve.monitoring.drift applies them; docs/monitoring.md shows them side by side):
# psi: BH-adjusted p < 0.05 and PSI >= threshold; ks: the KS statistic (the L-infinity distance
# of the CDFs, SageMaker Model Monitor's rule) >= threshold; wasserstein: the Wasserstein
# distance divided by the reference's standard deviation (Evidently's normed rule) >= threshold.
DRIFT_METHODS: tuple[DriftMethod, ...] = ("psi", "ks", "wasserstein")
DEFAULT_DRIFT_THRESHOLD = 0.1  # every method's default: PSI 0.1, D 0.1, normed W 0.1
MAX_DRIFT_THRESHOLD = {"psi": 100.0, "ks": 1.0, "wasserstein": 100.0}
DRIFT_RULE_HELP = (
    "method is one of psi, ks, wasserstein; threshold a number > 0 "
    "(at most 1 for ks, at most 100 for psi and wasserstein)"
)


@dataclass(frozen=True, slots=True)
class DriftRule:
    """When a feature drifts: ``method`` and its ``threshold`` (see DRIFT_METHODS)."""

    method: DriftMethod = "psi"
    threshold: float = DEFAULT_DRIFT_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold}


def drift_rule_problem(method: object, threshold: object) -> str | None:
    """Why ``method``/``threshold`` are not a drift rule, or None when they are."""
    if method not in DRIFT_METHODS:
        return f"method {str(method)[:40]!r} is not one of {', '.join(DRIFT_METHODS)}"
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        return f"threshold {str(threshold)[:40]!r} is not a number"
    top = MAX_DRIFT_THRESHOLD[str(method)]
    if not (0.0 < float(threshold) <= top):  # also refuses NaN
        return f"threshold {threshold!r} for {method} is outside (0, {top:g}]"
    return None


def valid_model_name(name: object) -> bool:
    """A model name treeserve accepts anywhere (see :data:`MODEL_NAME_RULE`)."""
    return isinstance(name, str) and MODEL_NAME_RE.fullmatch(name) is not None


# Of the inference function's memory, this fraction is kept free for what no model measurement
# sees: the Lambda runtime, request and response buffers, capture batches, allocator slack.
INFERENCE_HEADROOM_FRACTION = 0.2
# RSS of the inference function with no model loaded: Python, numpy, XGBoost, FastAPI, boto3,
# Powertools (measured: 228 MB importing the inference handler, 161 MB of it numpy + XGBoost).
INFERENCE_RUNTIME_MB = 256


def inference_usable_mb(memory_mb: float) -> float:
    """What an inference function of ``memory_mb`` leaves for models, after headroom and runtime
    (shared by the model cache and one loading slot: treeserve.model.package MODELS_AT_ONCE)."""
    return max(0.0, memory_mb * (1 - INFERENCE_HEADROOM_FRACTION) - INFERENCE_RUNTIME_MB)


# TreeSHAP costs far more per row than prediction: one explain request carries at most this many
# rows (and MAX_ROWS), to stay well inside the timeout and the inference function's memory.
MAX_EXPLAIN_ROWS = 1000
# Lambda's MemorySize range (MB).
LAMBDA_MEMORY_MB = (128, 10_240)


def _text(env: Mapping[str, str], name: str, default: str | None) -> str:
    value = env.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigurationError(
            f"{name} is not set: set the environment variable {name} "
            "(template.yaml sets it for the functions; export it or pass --bucket for the CLI)"
        )
    return default


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(
            f"{name}={raw!r} is not a number: set it to a value in [{lo}, {hi}]"
        ) from None
    if not lo <= value <= hi:
        raise ConfigurationError(
            f"{name}={raw!r} is out of range: set it to a value in [{lo}, {hi}]"
        )
    return value


def _drift_rule(env: Mapping[str, str]) -> DriftRule:
    method = env.get("DRIFT_METHOD", "").strip().lower() or "psi"
    raw = env.get("DRIFT_THRESHOLD", "").strip()
    threshold: float | str
    try:
        threshold = float(raw) if raw else DEFAULT_DRIFT_THRESHOLD
    except ValueError:
        threshold = raw  # drift_rule_problem says it is not a number
    problem = drift_rule_problem(method, threshold)
    if problem:
        raise ConfigurationError(
            f"DRIFT_METHOD={method[:40]!r} DRIFT_THRESHOLD={raw[:40]!r}: {problem}; "
            f"set DRIFT_METHOD to psi (the default), ks or wasserstein and DRIFT_THRESHOLD "
            f"to a number in (0, 1] for ks, (0, 100] for psi and wasserstein (default "
            f"{DEFAULT_DRIFT_THRESHOLD})"
        )
    return DriftRule(method, float(threshold))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Settings:
    """treeserve's configuration. Build it with :meth:`from_env`; tests may build it directly."""

    model_bucket: str
    model_name: str = "default"
    model_refresh_seconds: float = 60.0
    max_rows: int = 10_000
    max_body_bytes: int = MAX_LAMBDA_PAYLOAD_BYTES
    capture_sample_rate: float = 0.0
    capture_max_rows: int = 10_000
    capture_max_age_seconds: float = 60.0
    promotion_mode: PromotionMode = "auto"
    promotion_tolerance: float = 0.0
    # PROMOTION_MODE=live: monitoring promotes a challenger whose live verdict over at least
    # this many labeled rows is `better` or `not worse` (treeserve.monitoring.challenger).
    live_min_labeled_rows: int = 500
    # Rows one monitoring run scores with a challenger or the champion (bounded work per run).
    challenger_max_rows: int = 20_000
    notification_topic_arn: str | None = None
    log_level: str = "INFO"
    monitoring_window_hours: float = 24.0
    # MONITORING_FANOUT_BYTES: a window with more capture bytes than this is fanned out over
    # MONITORING_STATE_MACHINE_ARN's Distributed Map (treeserve.monitoring.fanout); 0: never.
    monitoring_fanout_bytes: int = 2 * 1024**3
    monitoring_state_machine_arn: str | None = None
    # DRIFT_METHOD / DRIFT_THRESHOLD: the drift rule of every feature without a manifest override.
    drift_rule: DriftRule = DriftRule()
    # The path prefix a custom domain's base path mapping adds before every route ("/prod"):
    # Mangum's api_gateway_base_path, removed before routing.
    api_base_path: str = "/"
    # The inference function's MemorySize (template.yaml gives the refresh function the same
    # value): refresh refuses a model whose footprint does not fit it (treeserve.model.package).
    inference_memory_mb: int = 1024
    # MODEL_CACHE_MB: what the inference function's cached models may hold together (MB); None
    # (unset or 0): half of what INFERENCE_MEMORY_MB leaves after headroom and runtime. Refresh
    # reads it too: a model must fit both the cache and the loading slot the cache leaves.
    model_cache_mb: float | None = None
    # Batch scoring (treeserve.batch): rows scored per chunk (what one parse and predict holds),
    # bytes per ranged GET and per multipart part (S3's minimum part is 5 MiB), and the state
    # machine the CLI starts (BATCH_STATE_MACHINE_ARN; the stack's output BatchStateMachineArn).
    batch_chunk_rows: int = 10_000
    batch_part_bytes: int = 8 * 1024 * 1024
    batch_state_machine_arn: str | None = None
    # The published version this environment runs (Lambda's AWS_LAMBDA_FUNCTION_VERSION): the
    # dimension of the 5xx answers that a code deploy's alarms watch (template.yaml).
    function_version: str = "$LATEST"

    @property
    def cache_mb(self) -> float:
        """The model cache's bound (MB): MODEL_CACHE_MB, or half the usable memory."""
        if self.model_cache_mb is not None:
            return self.model_cache_mb
        return inference_usable_mb(self.inference_memory_mb) / 2

    @property
    def max_explain_rows(self) -> int:
        """Most rows one explain request may carry."""
        return min(self.max_rows, MAX_EXPLAIN_ROWS)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, bucket: str | None = None
    ) -> Settings:
        """Read the settings; a missing required value raises ConfigurationError naming it."""
        env = os.environ if env is None else env
        mode = _text(env, "PROMOTION_MODE", "auto").lower()
        if mode not in PROMOTION_MODES:
            raise ConfigurationError(
                f"PROMOTION_MODE={mode[:40]!r}: set it to 'auto', 'manual' or 'live'"
            )
        name = _text(env, "MODEL_NAME", "default")
        if not valid_model_name(name):
            raise ConfigurationError(f"MODEL_NAME={name[:80]!r}: use {MODEL_NAME_RULE}")
        memory_mb = int(_number(env, "INFERENCE_MEMORY_MB", 1024, *LAMBDA_MEMORY_MB))
        cache_mb = _number(env, "MODEL_CACHE_MB", 0.0, 0.0, LAMBDA_MEMORY_MB[1]) or None
        usable = inference_usable_mb(memory_mb)
        if cache_mb is not None and cache_mb >= usable:
            raise ConfigurationError(
                f"MODEL_CACHE_MB={cache_mb:g} leaves no room to load a model: INFERENCE_MEMORY_MB="
                f"{memory_mb} leaves {usable:g} MB after headroom and runtime, shared by the "
                "cache and one loading slot; lower it (0: half) or raise InferenceMemoryMB"
            )
        return cls(
            model_bucket=bucket or _text(env, "MODEL_BUCKET", None),
            model_name=name,
            model_refresh_seconds=_number(env, "MODEL_REFRESH_SECONDS", 60.0, 0.0, 86_400.0),
            max_rows=int(_number(env, "MAX_ROWS", 10_000, 1, 1_000_000)),
            max_body_bytes=int(
                _number(
                    env, "MAX_BODY_BYTES", MAX_LAMBDA_PAYLOAD_BYTES, 1, MAX_LAMBDA_PAYLOAD_BYTES
                )
            ),
            capture_sample_rate=_number(env, "CAPTURE_SAMPLE_RATE", 0.0, 0.0, 1.0),
            capture_max_rows=int(_number(env, "CAPTURE_MAX_ROWS", 10_000, 1, 1_000_000)),
            capture_max_age_seconds=_number(env, "CAPTURE_MAX_AGE_SECONDS", 60.0, 0.0, 3_600.0),
            promotion_mode=mode,
            promotion_tolerance=_number(env, "PROMOTION_TOLERANCE", 0.0, 0.0, 1e9),
            live_min_labeled_rows=int(_number(env, "LIVE_MIN_LABELED_ROWS", 500, 1, 100_000_000)),
            challenger_max_rows=int(_number(env, "CHALLENGER_MAX_ROWS", 20_000, 1, 10_000_000)),
            notification_topic_arn=env.get("NOTIFICATION_TOPIC_ARN", "").strip() or None,
            log_level=_text(env, "LOG_LEVEL", "INFO").upper(),
            monitoring_window_hours=_number(
                env, "MONITORING_WINDOW_HOURS", 24.0, 1 / 60, MAX_WINDOW_HOURS
            ),
            monitoring_fanout_bytes=int(
                _number(env, "MONITORING_FANOUT_BYTES", 2 * 1024**3, 0, float(1 << 50))
            ),
            monitoring_state_machine_arn=env.get("MONITORING_STATE_MACHINE_ARN", "").strip()
            or None,
            drift_rule=_drift_rule(env),
            api_base_path=_text(env, "API_BASE_PATH", "/"),
            inference_memory_mb=memory_mb,
            model_cache_mb=cache_mb,
            batch_chunk_rows=int(_number(env, "BATCH_CHUNK_ROWS", 10_000, 1, 1_000_000)),
            batch_part_bytes=int(
                _number(env, "BATCH_PART_BYTES", 8 * 1024 * 1024, 5 * 1024 * 1024, 512 * 1024**2)
            ),
            batch_state_machine_arn=env.get("BATCH_STATE_MACHINE_ARN", "").strip() or None,
            function_version=_text(env, "AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        )
