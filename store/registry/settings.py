"""Settings of the registry client and the rules that choose a registry's transport.

Only the standard library is imported here, so the warm-pull path and the CLI can read
settings without importing the HTTP client.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from lstore.errors import InvalidArgumentError
from lstore.store.registry.retry import RetryPolicy

DEFAULT_CONFIG_PATH = "/etc/lstore/config.json"


def load_config() -> dict[str, Any]:
    """Read the lstore config file ($LSTORE_CONFIG or /etc/lstore/config.json), if any."""
    path = os.environ.get("LSTORE_CONFIG") or DEFAULT_CONFIG_PATH
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot read lstore config {path}: {exc}; fix or remove the file", path=path
        ) from exc
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"lstore config {path} must be a JSON object", path=path)
    return config


@dataclass(frozen=True)
class RegistrySettings:
    """Transport, auth and download settings of a RegistryClient.

    Registries are contacted over HTTPS. `plain_http` uses HTTP for every registry. Insecure
    registries (host, host:port or a CIDR such as 10.0.0.0/8) and loopback registries try
    HTTPS without certificate checks first and fall back to HTTP, as docker does.
    Blobs larger than `range_threshold` bytes are fetched as parallel Range requests of
    `range_chunk_size` bytes over `range_connections` connections.
    """

    plain_http: bool = False
    insecure_registries: tuple[str, ...] = ()
    docker_config: str | None = None
    trusted_realm_hosts: tuple[str, ...] = ()
    max_connections_per_host: int = 8
    range_threshold: int = 4 << 20
    range_chunk_size: int = 4 << 20
    range_connections: int = 8
    connect_timeout: float = 30.0
    read_timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_environment(cls, **overrides: object) -> "RegistrySettings":
        """Build settings from the config file and the environment, then apply `overrides`.

        The config file is $LSTORE_CONFIG or /etc/lstore/config.json; its
        "insecure-registries" list has the same form as docker's daemon.json key.
        LSTORE_INSECURE_REGISTRIES adds a comma-separated list of insecure registries.
        DOCKER_CONFIG names the directory of docker's config.json, as for docker.
        """
        insecure = os.environ.get("LSTORE_INSECURE_REGISTRIES", "")
        entries = [item.strip() for item in insecure.split(",") if item.strip()]
        entries += load_config().get("insecure-registries", [])
        settings = cls(insecure_registries=tuple(entries))
        return replace(settings, **overrides)  # type: ignore[arg-type]


def is_loopback(host: str) -> bool:
    """Tell whether a host name or address is this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def matches_registry_list(host: str, port: int | None, entries: tuple[str, ...]) -> bool:
    """Tell whether host and port match an entry: host:port, host (any port) or a CIDR."""
    host = host.lower()
    for entry in entries:
        entry = entry.strip().lower()
        if "/" in entry:
            if _in_network(host, entry):
                return True
            continue
        entry_host, entry_port = split_host_port(entry)
        same_port = entry_port is None or entry_port == port
        if entry_host == host and same_port:
            return True
    return False


def _in_network(host: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split "host", "host:port" or "[v6]:port" into a lowercase host and an optional port."""
    text = text.lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, int(port) if port.isdigit() else None
