"""When and how long to wait before repeating a registry request.

Rate limits (429) and maintenance (503) often come with Retry-After (RFC 9110 section 10.2.3),
either in seconds or as an HTTP-date. Other temporary failures get exponential backoff.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Limits for repeating a request that failed for a temporary reason.

    `attempts` counts the first try. Backoff waits are `backoff_base * 2**n` seconds, capped
    at `backoff_max`, so the defaults wait 1, 2, 4 and 4 s. A Retry-After longer than
    `retry_after_max` seconds fails at once, because waiting hours inside a pull helps no one.
    """

    attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 4.0
    retry_after_max: float = 60.0

    def backoff(self, failures: int) -> float:
        """Return the wait in seconds after `failures` consecutive failures (1 or more)."""
        return min(self.backoff_base * 2 ** max(failures - 1, 0), self.backoff_max)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return the wait in seconds that a Retry-After header requests, or None if invalid.

    `now` is the current Unix time, for HTTP-dates. A date in the past means no wait.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
