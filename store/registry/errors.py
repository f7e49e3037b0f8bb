"""Registry error responses turned into lstore errors with status, codes and a redacted URL.

The distribution spec (spec.md, "Error Codes") sends errors as
`{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "...", "detail": ...}]}`. Proxies and
storage backends send HTML or XML instead, so the body is only a hint.
"""

from __future__ import annotations

import json

from yarl import URL

from lstore.errors import AuthError, NotFoundError, RegistryError

# Error bodies are read only for their codes and first message.
MAX_ERROR_BODY = 64 << 10

# 408 and 425 are retryable by RFC 9110; 429 is a rate limit; 5xx are server trouble.
TEMPORARY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class RegistryNotFoundError(RegistryError, NotFoundError):
    """A repository, manifest or blob that the registry reports as missing (HTTP 404)."""


class ResponseTooLargeError(RegistryError):
    """A response body longer than the limit for what was requested."""


def redact_url(url: URL | str) -> str:
    """Return the URL without query, fragment or user info.

    Pre-signed storage URLs carry their signature in the query, and token URLs carry scopes.
    """
    parsed = URL(str(url))
    if parsed.is_absolute():
        parsed = parsed.with_user(None)
    return str(parsed.with_query(None).with_fragment(None))


def parse_error_body(body: bytes) -> tuple[tuple[str, ...], str]:
    """Return the error codes and the first message of a distribution-spec error body."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return (), ""
    entries = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return (), ""

    codes = []
    message = ""
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        codes.append(str(entry.get("code", "")).upper())
        if not message and isinstance(entry.get("message"), str):
            message = entry["message"]
    return tuple(code for code in codes if code), message


def error_for_status(
    status: int,
    reason: str,
    body: bytes,
    *,
    action: str,
    url: URL | str,
    ref: str | None = None,
    digest: str | None = None,
) -> RegistryError:
    """Build the error for an unexpected HTTP status; `action` names what was attempted."""
    codes, detail = parse_error_body(body)
    summary = f"{status} {reason}".strip()
    if codes:
        summary += f" ({', '.join(codes)}"
        summary += f": {_one_line(detail)})" if detail else ")"
    message = f"{action} failed: {summary} from {redact_url(url)}"
    kind = _error_class(status)
    return kind(
        message,
        status=status,
        codes=codes,
        ref=ref,
        digest=digest,
        temporary=status in TEMPORARY_STATUSES,
    )


def _error_class(status: int) -> type[RegistryError]:
    if status in (401, 403):
        return AuthError
    if status == 404:
        return RegistryNotFoundError
    return RegistryError


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
