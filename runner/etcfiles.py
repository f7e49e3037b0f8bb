"""The container's /etc/hosts and /etc/hostname."""

from __future__ import annotations

import re

from lstore.errors import InvalidArgumentError

# RFC 1123 section 2.1: labels of letters, digits and hyphens, 1-63 characters, not
# starting or ending with a hyphen; 253 characters in all.
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME = 253

_LOCAL_LINES = (
    "127.0.0.1\tlocalhost",
    "::1\tlocalhost ip6-localhost ip6-loopback",
    "fe00::0\tip6-localnet",
    "ff00::0\tip6-mcastprefix",
    "ff02::1\tip6-allnodes",
    "ff02::2\tip6-allrouters",
)


def validate_hostname(hostname: str) -> None:
    """Raise InvalidArgumentError unless `hostname` is a valid RFC 1123 host name."""
    labels = hostname.split(".")
    if len(hostname) > MAX_HOSTNAME or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgumentError(
            f"invalid hostname {hostname!r}: use dot-separated labels of letters, digits "
            "and hyphens, at most 63 characters each"
        )


def hosts_file(hostname: str, address: str | None) -> str:
    """Return /etc/hosts text: loopback and IPv6 names, then `address` with `hostname`.

    Without an address (the none network mode) the host name gets no entry.
    """
    validate_hostname(hostname)
    lines = list(_LOCAL_LINES)
    if address:
        short = hostname.split(".", 1)[0]
        names = hostname if short == hostname else f"{hostname} {short}"
        lines.append(f"{address}\t{names}")
    return "\n".join(lines) + "\n"


def hostname_file(hostname: str) -> str:
    validate_hostname(hostname)
    return hostname + "\n"
