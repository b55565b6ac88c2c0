"""Boto errors -> the storage contract's errors, in one place."""

from __future__ import annotations

from ..base import (
    StorageError,
    StorageUnavailable,
)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code", "")


def _cancellation_codes(exc: Exception) -> list[str]:
    response = getattr(exc, "response", None) or {}
    reasons = response.get("CancellationReasons") or []
    return [reason.get("Code", "") for reason in reasons]



def _is_boto_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("botocore", "boto3"))


# Error codes of a table that cannot take the request just now (throttled, or the service
# is having trouble): the caller answers 503 with Retry-After. boto3's standard retry mode
# has already retried these before they reach us.
_UNAVAILABLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "LimitExceededException", "InternalServerError", "ServiceUnavailable",
    "TransactionInProgressException",
})
RETRY_AFTER = 2  # seconds


def _storage_error(exc: Exception) -> StorageError:
    """The one mapping of a boto error to the storage contract's errors."""
    import botocore.exceptions as boto

    # No answer at all (connection refused or reset, a timeout) is unavailability too.
    transport = (boto.EndpointConnectionError, boto.ConnectionClosedError, boto.ConnectTimeoutError,
                 boto.ReadTimeoutError)
    if isinstance(exc, transport) or _error_code(exc) in _UNAVAILABLE_CODES:
        return StorageUnavailable(f"dynamodb: {exc}", RETRY_AFTER)
    return StorageError(f"dynamodb: {exc}")
