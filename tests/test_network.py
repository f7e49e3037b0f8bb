"""Bridge, none and host networking, port publishing and cleanup.

Everything that touches links, routes or iptables runs in a scenario: this file re-executed
by `unshare --net --mount` in a fresh network namespace with a private tmpfs on /run, so the
scenario's bridge, netns files and rules never reach the host. Each outer test compares the
host's routes, links and iptables before and after. Scenarios talk only to 127.0.0.1 and to
the 198.18.0.0/15 addresses they assign themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lstore.errors import AlreadyExistsError, InvalidArgumentError
from lstore.runner import ipam, network, portmap
from lstore.runner.portmap import PortMapping

# ---------------------------------------------------------------------------- pure parts

PUBLISH_CASES = [
    ("8080:80", [PortMapping(None, 8080, 80, "tcp")]),
    ("127.0.0.1:18080:8000", [PortMapping("127.0.0.1", 18080, 8000, "tcp")]),
    ("0.0.0.0:53:53/udp", [PortMapping(None, 53, 53, "udp")]),
    ("80", [PortMapping(None, 0, 80, "tcp")]),
    ("127.0.0.1::80", [PortMapping("127.0.0.1", 0, 80, "tcp")]),
    ("9000-9001:80-81", [PortMapping(None, 9000, 80), PortMapping(None, 9001, 81)]),
]


@pytest.mark.parametrize(("spec", "expected"), PUBLISH_CASES)
def test_parse_publish(spec: str, expected: list[PortMapping]) -> None:
    assert portmap.parse_publish(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "abc", "70000:80", "8080:80/sctp", "1.2.3:80:80", "[::1]:80:80", "1:2:3:4",
     "9000-9002:80-81", "1-2000:1-2000"],
)  # fmt: skip
def test_parse_publish_rejects_bad_spec(spec: str) -> None:
    with pytest.raises(InvalidArgumentError):
        portmap.parse_publish(spec)


CONFLICT_CASES = [
    (PortMapping(None, 80, 1), PortMapping("127.0.0.1", 80, 2), True),
    (PortMapping("127.0.0.1", 80, 1), PortMapping("127.0.0.2", 80, 2), False),
    (PortMapping(None, 80, 1, "tcp"), PortMapping(None, 80, 1, "udp"), False),
    (PortMapping(None, 80, 1), PortMapping(None, 81, 1), False),
]


@pytest.mark.parametrize(("first", "second", "conflict"), CONFLICT_CASES)
def test_port_conflicts(first: PortMapping, second: PortMapping, conflict: bool) -> None:
    assert first.conflicts_with(second) is conflict
    assert second.conflicts_with(first) is conflict


def test_port_rules_dnat_to_container() -> None:
    dnat, hairpin = portmap.port_rules(PortMapping("127.0.0.1", 18080, 80), "198.18.0.2")

    assert (dnat.table, dnat.chain) == ("nat", "LSTORE")
    assert dnat.spec[:2] == ("-d", "127.0.0.1/32")
    assert dnat.spec[-2:] == ("--to-destination", "198.18.0.2:80")
    assert hairpin.chain == "LSTORE-POSTROUTING"
    assert hairpin.spec[-1] == "MASQUERADE"


@pytest.mark.parametrize("mapping", [
    PortMapping("127.0.0.1", 18080, 80, "tcp"),
    PortMapping(None, 5353, 53, "udp"),
])
def test_published_ports_keep_container_port(mapping: PortMapping) -> None:
    dnat, _ = portmap.port_rules(mapping, "198.18.0.2")
    listing = "-N LSTORE\n" + "-A LSTORE " + " ".join(dnat.spec) + "\n"

    assert portmap.parse_published(listing) == [mapping]


def test_attachment_record_round_trip() -> None:
    attachment = network.Attachment(
        "c1", "bridge", "/run/netns/lstore-c1", "lstore0", "198.18.0.2", "198.18.0.1", 24,
        "lsvc1", [PortMapping(None, 8080, 80)],
        portmap.port_rules(PortMapping(None, 8080, 80), "198.18.0.2"),
    )  # fmt: skip

    assert network.Attachment.from_record(attachment.to_record()) == attachment


def test_unknown_mode_is_rejected(tmp_path: Path) -> None:
    from lstore.store.meta import Meta

    with pytest.raises(InvalidArgumentError, match="invalid network mode"):
        network.attach(Meta(str(tmp_path / "meta")), "c1", "macvlan", [])


def test_host_mode_creates_nothing(tmp_path: Path) -> None:
    from lstore.store.meta import Meta

    attachment = network.attach(Meta(str(tmp_path / "meta")), "c1", "host", [])

    assert attachment.netns_path is None
    assert attachment.address is None


# ---------------------------------------------------------------------------- scenarios
# These run inside the private namespace; see run_scenario().

SCENARIOS: dict[str, Callable[[Path], None]] = {}


def scenario(function: Callable[[Path], None]) -> Callable[[Path], None]:
    SCENARIOS[function.__name__] = function
    return function


def in_netns(attachment: network.Attachment, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", network.netns_name(attachment.container_id), *argv]


def links() -> list[str]:
    output = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return sorted(re.findall(r"^\d+: ([^:@]+)", output.stdout, re.M))


def iptables_rules() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


def wait_for_port(address: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def assert_no_trace(meta, attachment: network.Attachment) -> None:
    assert network.endpoint(meta, attachment.container_id) is None
    assert attachment.host_veth not in links()
    assert not os.path.exists(network._netns_path(attachment.container_id))
    assert attachment.address is None or attachment.address not in iptables_rules()
    assert attachment.container_id not in ipam.allocations(meta, "lstore0").values()


PING_SERVER = """
import socket
server = socket.socket()
server.bind(("0.0.0.0", 9000))
server.listen()
print("listening", flush=True)
connection, _ = server.accept()
connection.sendall(b"pong " + connection.recv(16))
"""
PING_CLIENT = """
import socket, sys
client = socket.create_connection((sys.argv[1], 9000), timeout=5)
client.sendall(b"from-b")
print(client.recv(64).decode())
"""


@scenario
def bridge_connectivity(root: Path) -> None:
    from lstore.store.meta import Meta

    meta = Meta(str(root / "meta"))
    a = network.attach(meta, "a" * 64, "bridge", [])
    b = network.attach(meta, "b" * 64, "bridge", [])

    assert a.address != b.address
    assert a.network == b.network == "lstore0"
    assert a.gateway == "198.18.0.1"
    assert ipam.allocations(meta, "lstore0") == {a.address: a.container_id,
                                                 b.address: b.container_id}  # fmt: skip

    server = subprocess.Popen(in_netns(a, sys.executable, "-c", PING_SERVER),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout is not None
    assert server.stdout.readline() == "listening\n"
    reply = subprocess.run(in_netns(b, sys.executable, "-c", PING_CLIENT, a.address),
                           capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    server.wait(timeout=10)
    assert reply.stdout.strip() == "pong from-b"

    busybox = shutil.which("busybox")
    assert busybox, "this test needs busybox (apt-get install busybox)"
    ping = subprocess.run(in_netns(b, busybox, "ping", "-c", "1", "-W", "2", a.address),
                          capture_output=True, text=True, timeout=20)  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr

    inside = subprocess.run(in_netns(a, "ip", "-o", "-4", "addr", "show", "eth0"),
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert f"{a.address}/24" in inside.stdout

    network.detach(meta, a.container_id)
    network.detach(meta, b.container_id)
    network.detach(meta, b.container_id)
    assert_no_trace(meta, a)
    assert_no_trace(meta, b)
    assert links() == ["lo", "lstore0"]


@scenario
def localhost_port_mapping(root: Path) -> None:
    from lstore.store.meta import Meta

    meta = Meta(str(root / "meta"))
    site = root / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from the container\n")
    a = network.attach(meta, "a" * 64, "bridge", ["127.0.0.1:18080:8000"])

    server = subprocess.Popen(
        in_netns(a, sys.executable, "-m", "http.server", "8000", "--directory", str(site)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(a.address, 8000)
        with urllib.request.urlopen("http://127.0.0.1:18080/hello.txt", timeout=10) as reply:
            body = reply.read().decode()
    finally:
        server.kill()
        server.wait()

    assert body == "hello from the container\n"
    assert a.ports == [PortMapping("127.0.0.1", 18080, 8000, "tcp")]
    assert "--dport 18080" in iptables_rules()
    network.detach(meta, a.container_id)
    assert_no_trace(meta, a)
    assert "--dport 18080" not in iptables_rules()


@scenario
def port_conflicts(root: Path) -> None:
    from lstore.store.meta import Meta

    meta = Meta(str(root / "meta"))
    a = network.attach(meta, "a" * 64, "bridge", ["127.0.0.1:18080:80"])
    links_before, rules_before = links(), iptables_rules()
    allocations_before = ipam.allocations(meta, "lstore0")

    try:
        network.attach(meta, "c" * 64, "bridge", ["18080:80"])
        raise AssertionError("a port published by another container was accepted")
    except AlreadyExistsError as exc:
        assert "18080" in str(exc)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 18081))
        listener.listen()
        try:
            network.check_ports(["127.0.0.1:18081:80"])
            raise AssertionError("a port bound by a process was accepted")
        except AlreadyExistsError as exc:
            assert "18081" in str(exc)

    assert links() == links_before
    assert iptables_rules() == rules_before
    assert ipam.allocations(meta, "lstore0") == allocations_before
    assert network.endpoint(meta, "c" * 64) is None
    assert not os.path.exists(network._netns_path("c" * 64))
    network.detach(meta, a.container_id)
    assert_no_trace(meta, a)


CRASHING_ATTACH = """
import os, sys
from lstore.runner import network
from lstore.store.meta import Meta
network.attach(Meta(sys.argv[1]), "d" * 64, "bridge", ["127.0.0.1:18082:80"])
os._exit(0)
"""


@scenario
def detach_after_crash(root: Path) -> None:
    from lstore.store.meta import Meta

    subprocess.run([sys.executable, "-c", CRASHING_ATTACH, str(root / "meta")], check=True)
    meta = Meta(str(root / "meta"))
    attachment = network.endpoint(meta, "d" * 64)
    assert attachment is not None
    assert attachment.host_veth in links()

    network.detach(meta, "d" * 64)

    assert_no_trace(meta, attachment)
    assert "--dport 18082" not in iptables_rules()


@scenario
def none_mode_creates_nothing(root: Path) -> None:
    from lstore.store.meta import Meta

    meta = Meta(str(root / "meta"))
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout

    attachment = network.attach(meta, "e" * 64, "none", [])

    # The runtime creates the namespace and sets its loopback up (see test_runtime.py).
    assert attachment.netns_path is None
    assert network.endpoint(meta, "e" * 64) is None
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert links_after == links_before
    network.detach(meta, "e" * 64)


@scenario
def subnet_skips_routed_addresses(root: Path) -> None:
    from lstore.store.meta import Meta

    # A route over the first /24 of the pool makes the default network take the next one.
    subprocess.run(["ip", "link", "add", "lst-taken", "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "198.18.0.1/24", "dev", "lst-taken"], check=True)
    subprocess.run(["ip", "link", "set", "lst-taken", "up"], check=True)
    meta = Meta(str(root / "meta"))

    a = network.attach(meta, "f" * 64, "bridge", [])
    custom = network.attach(meta, "g" * 64, "bridge", [], subnet="198.18.9.0/24")

    assert a.gateway == "198.18.1.1"
    assert a.address == "198.18.1.2"
    assert custom.network == "lstore1"
    assert custom.address == "198.18.9.2"
    try:
        network.attach(meta, "h" * 64, "bridge", [], subnet="198.18.0.0/16")
        raise AssertionError("an overlapping subnet was accepted")
    except InvalidArgumentError as exc:
        assert "overlaps" in str(exc)
    network.detach(meta, a.container_id)
    network.detach(meta, custom.container_id)


# ---------------------------------------------------------------------------- outer tests


def _enter_private_namespace() -> None:
    """Check that this process runs in its own netns, then give it a private /run."""
    host_netns = os.environ.get("LSTORE_TEST_HOST_NETNS")
    if not host_netns or os.stat("/proc/self/ns/net").st_ino == int(host_netns):
        raise SystemExit("refusing to run a network scenario in the host's network namespace")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def host_network_state() -> dict[str, str]:
    def read(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    rules = re.sub(r"^#.*\n|\[\d+:\d+\]", "", read("iptables-save"), flags=re.M)
    return {"rules": rules, "routes": read("ip", "route", "show", "table", "all"),
            "links": read("ip", "-o", "link")}  # fmt: skip


@pytest.fixture
def host_unchanged() -> Iterator[None]:
    for tool in ("unshare", "ip", "iptables", "iptables-save", "mount"):
        assert shutil.which(tool), f"the network tests need {tool} on PATH"
    before = host_network_state()
    yield
    assert host_network_state() == before


def run_scenario(name: str, root: Path) -> None:
    command = ["unshare", "--net", "--mount", "--propagation", "private",
               sys.executable, __file__, name, str(root)]  # fmt: skip
    env = {**os.environ, "LSTORE_TEST_HOST_NETNS": str(os.stat("/proc/self/ns/net").st_ino)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"scenario {name} failed:\n{result.stdout}{result.stderr}"


@pytest.mark.root
@pytest.mark.net
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_network_scenario(name: str, tmp_path: Path, host_unchanged: None) -> None:
    run_scenario(name, tmp_path)


if __name__ == "__main__":
    _enter_private_namespace()
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
