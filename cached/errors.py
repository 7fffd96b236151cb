"""The one exception tree of cached.

Every error that crosses a module boundary is a ``CachedError``; third-party errors are wrapped
where they enter (``raise OriginError(...) from e``). HTTP statuses are decided in ``cached.api``
and exit codes in ``cached.cli`` -- never here.

    CachedError
    +-- ConfigError            bad config file, flag or environment value (key names the culprit)
    +-- RefError               a ref that does not parse
    +-- RequestError           a malformed API request (body, parameter)
    +-- NotFoundError          an unknown model, lease or route object
    +-- ConflictError          refused because of state (evict while pinned or leased)
    +-- StoreError             local store trouble
    |   +-- StoreFullError     not enough space even after eviction
    |   +-- IntegrityError     bytes that do not match their digest
    +-- OriginError            the origin failed (status, reason, retryable)
    |   +-- OriginNotFound     404 / missing path
    |   +-- OriginDenied       401 / 403
    |   +-- OriginChanged      the origin's content changed under a download
    +-- FetchCancelled         the fetch was cancelled (evict)
    +-- DaemonUnreachable      (client side) the local API could not be reached
"""

from __future__ import annotations


class CachedError(Exception):
    """Base of every error cached raises on purpose. ``code`` is the stable wire name."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CachedError):
    code = "bad_config"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class RefError(CachedError):
    code = "bad_ref"

    def __init__(self, ref: str, message: str) -> None:
        super().__init__(f"invalid ref {ref!r}: {message}")
        self.ref = ref


class RequestError(CachedError):
    code = "bad_request"


class NotFoundError(CachedError):
    code = "not_found"


class ConflictError(CachedError):
    code = "conflict"


class StoreError(CachedError):
    code = "store_error"


class StoreFullError(StoreError):
    code = "store_full"

    def __init__(self, message: str, *, needed_bytes: int, available_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class IntegrityError(StoreError):
    code = "integrity"


class OriginError(CachedError):
    code = "origin_error"

    def __init__(
        self, message: str, *, status: int | None = None, retryable: bool = False, upstream_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        # The origin's own error name where it has one (an HF hub's X-Error-Code).
        self.upstream_code = upstream_code


class OriginNotFound(OriginError):
    code = "origin_not_found"


class OriginDenied(OriginError):
    code = "origin_denied"


class OriginChanged(OriginError):
    code = "origin_changed"


class FetchCancelled(CachedError):
    code = "cancelled"


class DaemonUnreachable(CachedError):
    code = "unreachable"
