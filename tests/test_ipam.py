"""Subnet choice and address allocation in LMDB, including concurrent allocation."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from lstore.errors import InvalidArgumentError, StoreError
from lstore.runner import ipam
from lstore.store.meta import Meta

SUBNET_CASES = [
    # (taken networks, expected first free /24 of 198.18.0.0/15)
    ([], "198.18.0.0/24"),
    (["198.18.0.0/24"], "198.18.1.0/24"),
    (["198.18.0.7/32", "198.18.1.128/25"], "198.18.2.0/24"),
    (["198.18.0.0/16"], "198.19.0.0/24"),
    (["10.0.0.0/8", "192.0.2.0/24"], "198.18.0.0/24"),
]


@pytest.mark.parametrize(("taken", "expected"), SUBNET_CASES)
def test_choose_subnet_skips_taken(taken: list[str], expected: str) -> None:
    chosen = ipam.choose_subnet(ipam.DEFAULT_POOL, 24, [IPv4Network(t) for t in taken])

    assert chosen == IPv4Network(expected)


def test_choose_subnet_returns_none_when_pool_is_full() -> None:
    assert ipam.choose_subnet(ipam.DEFAULT_POOL, 24, [IPv4Network("198.16.0.0/12")]) is None


@pytest.mark.parametrize("text", ["198.18.0.1/24", "not-a-subnet", "198.18.0.0/31", "::1/128"])
def test_parse_subnet_rejects_bad_input(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        ipam.parse_subnet(text)


def test_default_network_avoids_routes(tmp_path: Path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    routes = [IPv4Network("198.18.0.0/24")]

    network = ipam.ensure_network(meta, None, routes)
    again = ipam.ensure_network(meta, None, [])

    assert network.name == "lstore0"
    assert network.subnet == IPv4Network("198.18.1.0/24")
    assert network.gateway == IPv4Address("198.18.1.1")
    assert again == network


def test_requested_subnet_gets_own_bridge(tmp_path: Path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    default = ipam.ensure_network(meta, None, [])

    custom = ipam.ensure_network(meta, IPv4Network("198.18.50.0/24"), [])
    same = ipam.ensure_network(meta, IPv4Network("198.18.50.0/24"), [])

    assert default.name == "lstore0"
    assert custom.name == "lstore1"
    assert same == custom


@pytest.mark.parametrize("subnet", ["198.18.0.0/23", "192.0.2.0/25"])
def test_requested_subnet_must_not_overlap(tmp_path: Path, subnet: str) -> None:
    meta = Meta(str(tmp_path / "meta"))
    ipam.ensure_network(meta, None, [])

    with pytest.raises(InvalidArgumentError, match="overlaps"):
        ipam.ensure_network(meta, IPv4Network(subnet), [IPv4Network("192.0.2.0/24")])


def allocate(meta: Meta, network: ipam.Network, container_id: str) -> IPv4Address:
    with meta.write() as txn:
        return ipam.allocate(txn, network, container_id)


def release(meta: Meta, network: ipam.Network, address: IPv4Address) -> bool:
    with meta.write() as txn:
        return ipam.release(txn, network.name, str(address))


def test_allocation_is_round_robin(tmp_path: Path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    network = ipam.ensure_network(meta, None, [])

    first = allocate(meta, network, "c1")
    second = allocate(meta, network, "c2")
    assert release(meta, network, first)
    third = allocate(meta, network, "c3")

    assert (str(first), str(second), str(third)) == ("198.18.0.2", "198.18.0.3", "198.18.0.4")
    assert ipam.allocations(meta, "lstore0") == {"198.18.0.3": "c2", "198.18.0.4": "c3"}
    assert not release(meta, network, first)


def test_exhausted_network_raises(tmp_path: Path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    network = ipam.ensure_network(meta, IPv4Network("198.18.60.0/30"), [])

    only = allocate(meta, network, "c1")

    assert str(only) == "198.18.60.2"
    with pytest.raises(StoreError, match="no free address"):
        allocate(meta, network, "c2")


def test_freed_address_is_reused_after_wrap(tmp_path: Path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    network = ipam.ensure_network(meta, IPv4Network("198.18.61.0/29"), [])
    addresses = [allocate(meta, network, f"c{i}") for i in range(5)]

    release(meta, network, addresses[1])

    assert allocate(meta, network, "late") == addresses[1]


WORKER = """
import sys
from lstore.runner import ipam
from lstore.store.meta import Meta
meta = Meta(sys.argv[1])
network = ipam.ensure_network(meta, None, [])
for i in range(20):
    with meta.write() as txn:
        print(ipam.allocate(txn, network, f"{sys.argv[2]}-{i}"), flush=True)
"""


def test_concurrent_processes_get_distinct_addresses(tmp_path: Path) -> None:
    meta_path = str(tmp_path / "meta")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, meta_path, f"w{n}"], stdout=subprocess.PIPE, text=True
        )  # fmt: skip
        for n in range(4)
    ]
    outputs = [worker.communicate(timeout=60)[0].split() for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0, 0, 0]
    addresses = [address for output in outputs for address in output]
    assert len(addresses) == 80
    assert len(set(addresses)) == 80
    assert len(ipam.allocations(Meta(meta_path), "lstore0")) == 80
