"""Domain errors. Adapters turn AWS errors into these; handlers turn these into answers."""

from __future__ import annotations


class TreeserveError(Exception):
    """Base class of every error treeserve raises on purpose."""


class ConfigurationError(TreeserveError):
    """Required configuration is missing or malformed (names the variable and the fix)."""


# --- uploads ---------------------------------------------------------------------------------


class UploadRejected(TreeserveError):
    """An upload that can never become a model version.

    ``code`` is a stable machine-readable reason (``pickle``, ``unknown_format``, ``link_member``,
    ``path_traversal``, ``too_many_members``, ``too_large``, ``corrupt``, ``load_failed``,
    ``manifest_mismatch``, ``csv_mismatch``, ``non_finite`` ...); ``message`` says it to a person.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- registry and storage --------------------------------------------------------------------


class RegistryError(TreeserveError):
    """Something about the registry's state prevents the operation."""


class NotFound(RegistryError):
    """The object, version or pointer does not exist."""


class PreconditionFailed(RegistryError):
    """A conditional write lost a race (If-None-Match / If-Match did not hold)."""


class StorageUnavailable(TreeserveError):
    """The store failed (throttling, 5xx, timeout). Retryable: let Lambda retry the invocation."""


class StorageError(RegistryError):
    """The store refused an operation for a reason treeserve has no better name for."""


class BucketNotFound(RegistryError, ConfigurationError):
    """The bucket does not exist: a setup problem, not the registry's state."""


class StorageAccessDenied(RegistryError, ConfigurationError):
    """The credentials in use may not read or write the bucket: a setup problem."""


class NoModelInService(TreeserveError):
    """No version has been promoted yet for this model name."""


class ModelLoadError(TreeserveError):
    """Model bytes that cannot be loaded, or do not match their recorded sha256."""


# --- client input (the HTTP layer maps these to 4xx) -----------------------------------------


class InvalidInput(TreeserveError):
    """Client input that cannot be served. ``status`` is the HTTP status the API answers with."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedBody(InvalidInput):
    status = 400
    type = "malformed_body"


class PayloadTooLarge(InvalidInput):
    status = 413
    type = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    status = 415
    type = "unsupported_media_type"


class InputMismatch(InvalidInput):
    """Well-formed input that does not fit the model: width, unknown feature, non-numeric."""

    status = 422
    type = "input_mismatch"


class ExplainUnavailable(InvalidInput):
    """The model cannot be explained (XGBoost has no TreeSHAP for its trees)."""

    status = 422
    type = "explain_unavailable"
