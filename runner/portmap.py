"""Published ports and the iptables rules of bridge networks.

All rules live in lstore's own chains so they are easy to find and remove:
  nat LSTORE              DNAT of published host ports, jumped to from PREROUTING and OUTPUT
                          for packets addressed to a local address;
  nat LSTORE-POSTROUTING  MASQUERADE of container traffic leaving the bridge, of loopback
                          clients reaching a container, and of a container reaching itself;
  filter LSTORE-FORWARD   ACCEPT for traffic from the bridge, replies to it, and DNATed flows.

Localhost. A client on 127.0.0.1 reaches a published port through the OUTPUT DNAT. The
kernel then routes a packet with a loopback source out of the bridge only when the bridge
has route_localnet=1 (set by network.py). The MASQUERADE of 127.0.0.0/8 rewrites that source
to the bridge address so the container's reply comes back. lstore uses these rules instead of
a userland proxy process per port, so no process must outlive the run and the container sees
real client addresses for remote clients.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from lstore.errors import AlreadyExistsError, ContainerError, InvalidArgumentError

log = logging.getLogger(__name__)

DNAT_CHAIN = "LSTORE"
POSTROUTING_CHAIN = "LSTORE-POSTROUTING"
FORWARD_CHAIN = "LSTORE-FORWARD"
PROTOCOLS = ("tcp", "udp")

# A range adds one rule per port; the cap keeps a typo like 1-65535 from adding 65535 rules.
MAX_RANGE = 1000
# Tries to get a kernel-picked host port that no LSTORE rule forwards yet.
EPHEMERAL_ATTEMPTS = 10


@dataclass(frozen=True)
class PortMapping:
    """One published port: host address and port to container port, for one protocol.

    `host_ip` None means every address of the host. `host_port` 0 means "pick a free port",
    which check_ports() replaces by a real one.
    """

    host_ip: str | None
    host_port: int
    container_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return (
            f"{self.host_ip or '0.0.0.0'}:{self.host_port}->{self.container_port}/{self.protocol}"
        )

    def to_record(self) -> dict:
        return asdict(self)

    def conflicts_with(self, other: PortMapping) -> bool:
        same_address = (
            self.host_ip is None or other.host_ip is None or self.host_ip == other.host_ip
        )
        return (self.protocol, self.host_port) == (other.protocol, other.host_port) and same_address


@dataclass(frozen=True)
class Rule:
    """One iptables rule: table, chain and the match/target arguments after the chain."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def to_record(self) -> dict:
        return {"table": self.table, "chain": self.chain, "spec": list(self.spec)}

    @classmethod
    def from_record(cls, record: dict) -> Rule:
        return cls(record["table"], record["chain"], tuple(record["spec"]))


# ---------------------------------------------------------------------------- parsing


def _port_range(text: str, spec: str) -> list[int]:
    first, _, last = text.partition("-")
    try:
        start, end = int(first), int(last or first)
    except ValueError as exc:
        raise InvalidArgumentError(f"invalid port {text!r} in --publish {spec!r}") from exc
    if not 0 < start <= end <= 65535 or end - start >= MAX_RANGE:
        raise InvalidArgumentError(
            f"invalid port {text!r} in --publish {spec!r}: use 1-65535, ranges up to "
            f"{MAX_RANGE} ports"
        )
    return list(range(start, end + 1))


def _host_ip(text: str, spec: str) -> str | None:
    if text in ("", "0.0.0.0"):
        return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise InvalidArgumentError(
            f"invalid host address {text!r} in --publish {spec!r}: only IPv4 is supported"
        ) from exc


def parse_publish(spec: str) -> list[PortMapping]:
    """Parse one `-p [ip:][host_port:]container_port[/tcp|udp]` value, ranges included."""
    ports, _, protocol = spec.partition("/")
    protocol = protocol or "tcp"
    if protocol not in PROTOCOLS:
        raise InvalidArgumentError(f"invalid protocol {protocol!r} in --publish {spec!r}")

    parts = ports.split(":")
    if len(parts) > 3:
        raise InvalidArgumentError(f"invalid --publish {spec!r}: expected [ip:]host:container")
    host_ip = _host_ip(parts[0], spec) if len(parts) == 3 else None
    host_text = parts[-2] if len(parts) >= 2 else ""
    container_ports = _port_range(parts[-1], spec)
    host_ports = _port_range(host_text, spec) if host_text else [0] * len(container_ports)

    if len(host_ports) != len(container_ports):
        raise InvalidArgumentError(f"invalid --publish {spec!r}: port ranges differ in length")
    return [PortMapping(host_ip, h, c, protocol) for h, c in zip(host_ports, container_ports)]


def parse_all(specs: Iterable[str]) -> list[PortMapping]:
    return [mapping for spec in specs for mapping in parse_publish(spec)]


# ---------------------------------------------------------------------------- checks


def check_ports(publish: Iterable[str | PortMapping]) -> list[PortMapping]:
    """Check that every published host port is free; return the mappings, with free ports
    picked for those given without a host port.

    A port is taken when a process has bound it (found by binding it here) or when an
    LSTORE rule already forwards it. Raises AlreadyExistsError naming the port; creates
    nothing. Two runs checking at once can both pass, so network.attach() checks again
    under its lock.
    """
    mappings = [m for item in publish for m in _as_mappings(item)]
    published = published_ports()
    result: list[PortMapping] = []
    for mapping in mappings:
        result.append(_free_mapping(mapping, published + result))
    return result


def _free_mapping(mapping: PortMapping, taken: list[PortMapping]) -> PortMapping:
    # A kernel-picked port is free of sockets but may be forwarded by a rule: pick again.
    for _attempt in range(EPHEMERAL_ATTEMPTS):
        resolved = _bind_check(mapping)
        clash = next((other for other in taken if resolved.conflicts_with(other)), None)
        if clash is None:
            return resolved
        if mapping.host_port:
            raise AlreadyExistsError(
                f"host port {mapping.host_port}/{mapping.protocol} is already published "
                f"({clash}); choose another host port"
            )
    raise ContainerError(f"no free host port found for {mapping}")


def _as_mappings(item: str | PortMapping) -> list[PortMapping]:
    return [item] if isinstance(item, PortMapping) else parse_publish(item)


def _bind_check(mapping: PortMapping) -> PortMapping:
    """Bind the host port once to prove it is free; with port 0 the kernel picks a free one."""
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        # SO_REUSEADDR ignores TIME_WAIT leftovers; a listener on the port still fails.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((mapping.host_ip or "0.0.0.0", mapping.host_port))
        except OSError as exc:
            raise _bind_error(mapping, exc) from exc
        port = probe.getsockname()[1]
    return PortMapping(mapping.host_ip, port, mapping.container_port, mapping.protocol)


def _bind_error(mapping: PortMapping, exc: OSError) -> Exception:
    if exc.errno == errno.EADDRINUSE:
        return AlreadyExistsError(
            f"host port {mapping.host_port}/{mapping.protocol} on "
            f"{mapping.host_ip or '0.0.0.0'} is already in use by another process; "
            "choose another host port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidArgumentError(
            f"host address {mapping.host_ip} is not an address of this host"
        )
    return ContainerError(f"failed to check host port {mapping}: {exc.strerror}")


_DNAT_LINE = re.compile(
    r"^-A LSTORE(?: -d (?P<ip>[\d.]+)/32)? -p (?P<proto>tcp|udp)\b.*?--dport (?P<port>\d+)"
    r"(?:.*?--to-destination [\d.]+:(?P<container_port>\d+))?"
)


def published_ports() -> list[PortMapping]:
    """Return the ports that LSTORE DNAT rules forward in the current netns.

    The container port is 0 for a rule that has no "--to-destination IP:PORT".
    """
    result = iptables("-t", "nat", "-S", DNAT_CHAIN, check=False)
    return parse_published(result.stdout)


def parse_published(rules: str) -> list[PortMapping]:
    """Parse the mappings out of `iptables -t nat -S LSTORE` output."""
    mappings = []
    for line in rules.splitlines():
        match = _DNAT_LINE.match(line)
        if match:
            ip, port = match.group("ip"), int(match.group("port"))
            container_port = int(match.group("container_port") or 0)
            mappings.append(PortMapping(ip, port, container_port, match.group("proto")))
    return mappings


# ---------------------------------------------------------------------------- iptables


def iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run iptables, waiting for the xtables lock that other firewall tools may hold."""
    binary = shutil.which("iptables")
    if binary is None:
        raise ContainerError("iptables not found: install the iptables package for bridge networks")
    result = subprocess.run([binary, "-w", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ContainerError(f"iptables {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def rule_exists(rule: Rule) -> bool:
    return iptables("-t", rule.table, "-C", rule.chain, *rule.spec, check=False).returncode == 0


def ensure_chain(table: str, chain: str) -> None:
    if iptables("-t", table, "-S", chain, check=False).returncode != 0:
        iptables("-t", table, "-N", chain)


def add_rule(rule: Rule, *, first: bool = False) -> None:
    """Add `rule` unless an identical rule is there; `first` inserts it at the top."""
    if rule_exists(rule):
        return
    position = ("-I", rule.chain, "1") if first else ("-A", rule.chain)
    iptables("-t", rule.table, *position, *rule.spec)


def delete_rule(rule: Rule) -> None:
    """Delete every copy of `rule`; a missing rule or chain is not an error."""
    while rule_exists(rule):
        iptables("-t", rule.table, "-D", rule.chain, *rule.spec)


def network_rules(subnet: str, bridge: str) -> list[Rule]:
    """Return the rules one bridge network needs, shared by all its containers."""
    return [
        Rule("nat", "PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", DNAT_CHAIN)),
        Rule("nat", "OUTPUT", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", DNAT_CHAIN)),
        Rule("nat", "POSTROUTING", ("-j", POSTROUTING_CHAIN)),
        Rule("nat", POSTROUTING_CHAIN, ("-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE")),
        Rule("nat", POSTROUTING_CHAIN, ("-s", "127.0.0.0/8", "-o", bridge, "-j", "MASQUERADE")),
        Rule("filter", "FORWARD", ("-j", FORWARD_CHAIN)),
        Rule("filter", FORWARD_CHAIN, ("-i", bridge, "-j", "ACCEPT")),
        Rule("filter", FORWARD_CHAIN, _forward_state(bridge, "RELATED,ESTABLISHED")),
        Rule("filter", FORWARD_CHAIN, _forward_state(bridge, "DNAT")),
    ]


def _forward_state(bridge: str, state: str) -> tuple[str, ...]:
    return ("-o", bridge, "-m", "conntrack", "--ctstate", state, "-j", "ACCEPT")


def ensure_network_rules(subnet: str, bridge: str) -> None:
    """Create lstore's chains and the shared rules of one network; idempotent.

    The jump to LSTORE-FORWARD goes first in FORWARD so a host whose FORWARD policy or
    rules drop traffic still passes container traffic.
    """
    for table, chain in (
        ("nat", DNAT_CHAIN),
        ("nat", POSTROUTING_CHAIN),
        ("filter", FORWARD_CHAIN),
    ):
        ensure_chain(table, chain)
    for rule in network_rules(subnet, bridge):
        add_rule(rule, first=rule.chain == "FORWARD")


def port_rules(mapping: PortMapping, container_ip: str) -> list[Rule]:
    """Return the DNAT rule of one published port and the MASQUERADE for hairpin traffic
    (the container reaching itself through its own published port).

    NOTE: another container on the same bridge reaching this port through a host address
    gets replies straight over the bridge, bypassing the DNAT, unless br_netfilter is loaded.
    """
    destination = ("-d", f"{mapping.host_ip}/32") if mapping.host_ip else ()
    port = str(mapping.host_port)
    dnat = (
        *destination, "-p", mapping.protocol, "-m", mapping.protocol, "--dport", port,
        "-j", "DNAT", "--to-destination", f"{container_ip}:{mapping.container_port}",
    )  # fmt: skip
    hairpin = (
        "-s", container_ip, "-d", container_ip, "-p", mapping.protocol, "-m", mapping.protocol,
        "--dport", str(mapping.container_port), "-j", "MASQUERADE",
    )  # fmt: skip
    return [Rule("nat", DNAT_CHAIN, dnat), Rule("nat", POSTROUTING_CHAIN, hairpin)]
