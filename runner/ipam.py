"""IPv4 address management for container networks, stored in LMDB.

Keys. `networks` maps a network name (also its bridge name, such as lstore0) to
{subnet, gateway, bridge, last}. `ipam` maps "<network>/<address>" to {container}. Every
allocation and release runs inside one LMDB write transaction, and LMDB allows one writer at
a time across processes, so concurrent runs never receive the same subnet or address.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from lstore.errors import InvalidArgumentError, NotFoundError, StoreError
from lstore.store.meta import Meta, Transaction

log = logging.getLogger(__name__)

# 198.18.0.0/15 is reserved for benchmarking (RFC 2544, RFC 6890) and is rarely routed on
# real networks, so container subnets taken from it seldom clash with the host's.
DEFAULT_POOL = IPv4Network("198.18.0.0/15")
SUBNET_PREFIX = 24
DEFAULT_NETWORK = "lstore0"
BRIDGE_PREFIX = "lstore"


@dataclass(frozen=True)
class Network:
    """A container network: one bridge, one subnet, the gateway address on the bridge."""

    name: str
    subnet: IPv4Network
    gateway: IPv4Address

    @property
    def bridge(self) -> str:
        return self.name

    def to_record(self) -> dict[str, Any]:
        return {"subnet": str(self.subnet), "gateway": str(self.gateway), "bridge": self.bridge}

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> Network:
        return cls(name, IPv4Network(record["subnet"]), IPv4Address(record["gateway"]))


def parse_subnet(text: str) -> IPv4Network:
    """Parse a --subnet value such as 198.18.7.0/24; host bits must be zero."""
    try:
        subnet = IPv4Network(text)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"invalid subnet {text!r}: expected an IPv4 network such as 198.18.7.0/24"
        ) from exc
    if subnet.prefixlen > 30:
        raise InvalidArgumentError(f"subnet {text} is too small: use a prefix of /30 or shorter")
    return subnet


def choose_subnet(
    pool: IPv4Network, prefix: int, taken: Iterable[IPv4Network]
) -> IPv4Network | None:
    """Return the first /`prefix` of `pool` that overlaps none of `taken`, or None."""
    taken = list(taken)
    for candidate in pool.subnets(new_prefix=prefix):
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    return None


def is_network_key(key: str) -> bool:
    # The networks database also contains endpoint records under "endpoint/<container>".
    return "/" not in key


def _networks(txn: Transaction) -> dict[str, Network]:
    return {
        key: Network.from_record(key, record)
        for key, record in txn.items("networks")
        if is_network_key(key)
    }


def ensure_network(
    meta: Meta,
    subnet: IPv4Network | None,
    routes: Iterable[IPv4Network],
    pool: IPv4Network = DEFAULT_POOL,
) -> Network:
    """Return the network for `subnet` (None: the default network), creating its record.

    A new default network takes the first /24 of `pool` that overlaps no route of the
    current network namespace (`routes`, excluding lstore's own bridges) and no other
    network. A requested subnet gets its own bridge (lstore1, lstore2, ...) unless a network
    already uses it. Concurrent-safe: the choice and the record share one write transaction.
    """
    routes = list(routes)
    with meta.write() as txn:
        networks = _networks(txn)
        existing = _find_network(networks, subnet)
        if existing is not None:
            return existing

        network = _new_network(networks, subnet, routes, pool)
        txn.put("networks", network.name, network.to_record())
    log.info("created network %s with subnet %s", network.name, network.subnet)
    return network


def _find_network(networks: dict[str, Network], subnet: IPv4Network | None) -> Network | None:
    if subnet is None:
        return networks.get(DEFAULT_NETWORK)
    for network in networks.values():
        if network.subnet == subnet:
            return network
    return None


def _new_network(
    networks: dict[str, Network],
    subnet: IPv4Network | None,
    routes: list[IPv4Network],
    pool: IPv4Network,
) -> Network:
    used = [n.subnet for n in networks.values()]
    if subnet is None:
        chosen = choose_subnet(pool, SUBNET_PREFIX, used + routes)
        if chosen is None:
            raise StoreError(f"no free /{SUBNET_PREFIX} left in the address pool {pool}")
        return Network(DEFAULT_NETWORK, chosen, next(chosen.hosts()))

    clash = [other for other in used + routes if subnet.overlaps(other)]
    if clash:
        raise InvalidArgumentError(
            f"subnet {subnet} overlaps {clash[0]}, which is already routed or used by "
            "another lstore network; choose another --subnet"
        )
    return Network(_free_bridge_name(networks), subnet, next(subnet.hosts()))


def _free_bridge_name(networks: dict[str, Network]) -> str:
    index = 1
    while f"{BRIDGE_PREFIX}{index}" in networks:
        index += 1
    return f"{BRIDGE_PREFIX}{index}"


def address_key(network: str, address: IPv4Address) -> str:
    return f"{network}/{address}"


def allocate(txn: Transaction, network: Network, container_id: str) -> IPv4Address:
    """Reserve a free address of `network` for `container_id` inside the caller's write
    transaction, so the caller can store its own record in the same commit.

    Addresses are handed out round-robin after the last one allocated, so an address freed
    a moment ago is not reused at once (neighbours may still cache its MAC address).
    Concurrent-safe because LMDB runs one write transaction at a time.
    """
    record = txn.get("networks", network.name)
    if record is None:
        raise NotFoundError(f"network {network.name} has no record; it was removed")
    used = {key for key, _ in txn.items("ipam", network.name + "/")}
    address = _next_free(network, used, record.get("last"))
    txn.put("ipam", address_key(network.name, address), {"container": container_id})
    txn.put("networks", network.name, {**record, "last": str(address)})
    return address


def _next_free(network: Network, used: set[str], last: str | None) -> IPv4Address:
    hosts = [h for h in network.subnet.hosts() if h != network.gateway]
    start = 0
    if last is not None and IPv4Address(last) in network.subnet:
        start = next((i + 1 for i, h in enumerate(hosts) if str(h) == last), 0)
    for address in hosts[start:] + hosts[:start]:
        if address_key(network.name, address) not in used:
            return address
    raise StoreError(f"network {network.name} ({network.subnet}) has no free address left")


def release(txn: Transaction, network: str, address: str) -> bool:
    """Free `address` inside the caller's write transaction; return whether it was held."""
    return txn.delete("ipam", address_key(network, ipaddress.IPv4Address(address)))


def allocations(meta: Meta, network: str) -> dict[str, str]:
    """Return address -> container id for every address held in `network`."""
    with meta.read() as txn:
        return {
            key.split("/", 1)[1]: record["container"]
            for key, record in txn.items("ipam", network + "/")
        }
