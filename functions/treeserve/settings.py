"""One typed settings object, read from the environment that template.yaml sets."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from treeserve.errors import ConfigurationError

PromotionMode = Literal["auto", "manual"]

MAX_LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024
# A monitoring window is read in one invocation: past a month it cannot finish in the timeout.
MAX_WINDOW_HOURS = 24.0 * 31
# Model names are S3 key segments and metric dimensions: keep them boring.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def valid_model_name(name: object) -> bool:
    """A model name treeserve accepts anywhere (see :data:`MODEL_NAME_RULE`)."""
    return isinstance(name, str) and MODEL_NAME_RE.fullmatch(name) is not None


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
    notification_topic_arn: str | None = None
    log_level: str = "INFO"
    monitoring_window_hours: float = 24.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, bucket: str | None = None
    ) -> Settings:
        """Read the settings; a missing required value raises ConfigurationError naming it."""
        env = os.environ if env is None else env
        mode = _text(env, "PROMOTION_MODE", "auto").lower()
        if mode not in ("auto", "manual"):
            raise ConfigurationError(f"PROMOTION_MODE={mode!r}: set it to 'auto' or 'manual'")
        name = _text(env, "MODEL_NAME", "default")
        if not valid_model_name(name):
            raise ConfigurationError(f"MODEL_NAME={name[:80]!r}: use {MODEL_NAME_RULE}")
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
            promotion_mode=mode,  # type: ignore[arg-type]
            promotion_tolerance=_number(env, "PROMOTION_TOLERANCE", 0.0, 0.0, 1e9),
            notification_topic_arn=env.get("NOTIFICATION_TOPIC_ARN", "").strip() or None,
            log_level=_text(env, "LOG_LEVEL", "INFO").upper(),
            monitoring_window_hours=_number(
                env, "MONITORING_WINDOW_HOURS", 24.0, 1 / 60, MAX_WINDOW_HOURS
            ),
        )
