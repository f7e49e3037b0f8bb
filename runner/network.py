"""Container networking: bridge, none and host modes.

Bridge mode gives each container a named network namespace (/run/netns/lstore-<id>) with a
veth pair. The host end joins the bridge, and the peer becomes eth0 in the namespace, with
an address from ipam.py and a default route via the bridge's gateway address. The host's
IPv4 forwarding is switched on, and portmap.py adds NAT and port forwarding rules. None mode
gives a namespace with only a loopback interface. Host mode creates nothing.

Records. Before anything is created, the endpoint record (namespace, veth, address, rules)
is written to the LMDB `networks` database under "endpoint/<container id>", in the same
transaction that reserves the address. detach() removes what the record lists, so it works
after a crash at any point of attach(), and it may run any number of times.

Only this module imports pyroute2 (netlink), so other commands start without it.

NOTE: bridges and rules belong to the host's network namespace, but the address records
belong to one store root. Two store roots attaching containers on one host would both use
lstore0 and could hand out the same address.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from lstore.errors import ContainerError, InvalidArgumentError
from lstore.runner import ipam, portmap
from lstore.runner.ipam import Network
from lstore.runner.portmap import PortMapping, Rule
from lstore.store.meta import Meta

log = logging.getLogger(__name__)

MODES = ("bridge", "none", "host")
NETNS_DIR = "/run/netns"
NETNS_PREFIX = "lstore-"
ENDPOINT_PREFIX = "endpoint/"
CONTAINER_IFNAME = "eth0"
SHORT_ID = 12  # veth names "lsv" + 12 characters fit IFNAMSIZ (15 characters)

check_ports = portmap.check_ports


@dataclass
class Attachment:
    """The network setup of one container, as stored in its endpoint record."""

    container_id: str
    mode: str
    netns_path: str | None = None
    network: str | None = None
    address: str | None = None
    gateway: str | None = None
    prefix_len: int | None = None
    host_veth: str | None = None
    ports: list[PortMapping] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {
            "container_id": self.container_id,
            "mode": self.mode,
            "netns_path": self.netns_path,
            "network": self.network,
            "address": self.address,
            "gateway": self.gateway,
            "prefix_len": self.prefix_len,
            "host_veth": self.host_veth,
            "ports": [p.to_record() for p in self.ports],
            "rules": [r.to_record() for r in self.rules],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Attachment:
        fields = dict(record)
        fields["ports"] = [PortMapping(**p) for p in record.get("ports", [])]
        fields["rules"] = [Rule.from_record(r) for r in record.get("rules", [])]
        return cls(**fields)


def _short(container_id: str) -> str:
    return container_id[:SHORT_ID]


def netns_name(container_id: str) -> str:
    return NETNS_PREFIX + _short(container_id)


def _endpoint_key(container_id: str) -> str:
    return ENDPOINT_PREFIX + container_id


# ---------------------------------------------------------------------------- attach


def attach(
    meta: Meta,
    container_id: str,
    mode: str,
    publish: list[str] | None = None,
    subnet: str | None = None,
) -> Attachment:
    """Set up the network of one container and record it; see the module docstring.

    Published ports are checked before anything is created (AlreadyExistsError names the
    port). On any error, everything created so far is removed again before raising.
    Concurrent-safe: setup of the shared bridge and rules is serialized by a lock file.
    """
    publish = publish or []
    if mode not in MODES:
        raise InvalidArgumentError(f"invalid network mode {mode!r}: use bridge, none or host")
    if mode != "bridge" and publish:
        log.warning("published ports are ignored in %s network mode: %s", mode, publish)
    if mode == "host":
        return Attachment(container_id, mode)

    try:
        if mode == "none":
            return _attach_none(meta, container_id)
        return _attach_bridge(meta, container_id, publish, subnet)
    except BaseException:
        _detach_quietly(meta, container_id)
        raise


def _attach_none(meta: Meta, container_id: str) -> Attachment:
    # The runtime creates the namespace itself (the spec lists a network namespace without
    # a path) and sets its loopback up, so none mode costs no netlink calls and no record.
    return Attachment(container_id, "none")


def _attach_bridge(
    meta: Meta, container_id: str, publish: list[str], subnet: str | None
) -> Attachment:
    mappings = check_ports(publish)
    requested = ipam.parse_subnet(subnet) if subnet else None
    network = ipam.ensure_network(meta, requested, _routes())

    with _network_lock(meta):
        _ensure_bridge(network)
        portmap.ensure_network_rules(str(network.subnet), network.bridge)
        # Checked again under the lock: a concurrent run may have published since.
        mappings = check_ports(mappings)
        attachment = _reserve(meta, container_id, network, mappings)
        _create_endpoint(attachment)
        for rule in attachment.rules:
            portmap.add_rule(rule)
    log.info("container %s attached to %s as %s", container_id, network.name, attachment.address)
    return attachment


def _reserve(
    meta: Meta, container_id: str, network: Network, mappings: list[PortMapping]
) -> Attachment:
    """Reserve an address and write the endpoint record, in one write transaction."""
    with meta.write() as txn:
        address = ipam.allocate(txn, network, container_id)
        attachment = Attachment(
            container_id,
            "bridge",
            netns_path=_netns_path(container_id),
            network=network.name,
            address=str(address),
            gateway=str(network.gateway),
            prefix_len=network.subnet.prefixlen,
            host_veth="lsv" + _short(container_id),
            ports=mappings,
            rules=[rule for m in mappings for rule in portmap.port_rules(m, str(address))],
        )
        txn.put("networks", _endpoint_key(container_id), attachment.to_record())
    return attachment


@contextlib.contextmanager
def _network_lock(meta: Meta) -> Iterator[None]:
    # Bridge, sysctl and iptables changes are check-then-act sequences: one process at a time.
    fd = os.open(os.path.join(meta.path, "network.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _netns_path(container_id: str) -> str:
    return os.path.join(NETNS_DIR, netns_name(container_id))


# ---------------------------------------------------------------------------- netlink


def _routes() -> list[IPv4Network]:
    """Return the IPv4 destinations routed in this netns, except defaults and lstore bridges."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        own = {
            link["index"]
            for link in ipr.get_links()
            if (link.get("ifname") or "").startswith(ipam.BRIDGE_PREFIX)
        }
        routes = []
        for route in ipr.get_routes(family=2):  # pyroute2 returns every table by default
            destination = route.get("dst")
            if destination and route["dst_len"] and route.get("oif") not in own:
                routes.append(IPv4Network(f"{destination}/{route['dst_len']}", strict=False))
    return routes


def _write_sysctl(name: str, value: str) -> None:
    # /proc/sys/net shows the network namespace of the process that opens it.
    with open(f"/proc/sys/{name.replace('.', '/')}", "w") as f:
        f.write(value)


def _ensure_bridge(network: Network) -> None:
    """Create the bridge with the gateway address, bring it up, set the sysctls; idempotent."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=network.bridge):
            ipr.link("add", ifname=network.bridge, kind="bridge")
        index = ipr.link_lookup(ifname=network.bridge)[0]
        addresses = {a.get("address") for a in ipr.get_addr(index=index, family=2)}
        if str(network.gateway) not in addresses:
            ipr.addr("add", index=index, address=str(network.gateway),
                     prefixlen=network.subnet.prefixlen)  # fmt: skip
        ipr.link("set", index=index, state="up")

    _write_sysctl("net.ipv4.ip_forward", "1")
    _write_sysctl(f"net.ipv4.conf.{network.bridge}.route_localnet", "1")


def _default_signals_in_helpers() -> None:
    """Make the children that pyroute2 forks restore the default SIGINT and SIGTERM actions.

    NetNS and the netns helpers fork a child to open a socket in another network namespace
    and end it with SIGTERM. With this process's handlers the child would run lstore code
    instead of dying: the CLI's SIGTERM handler raises KeyboardInterrupt, which unwinds
    through the caller's cleanup in the child. pyroute2 0.9.7 checks this setting in fork
    mode too.
    """
    from pyroute2 import config

    config.disable_mp_signal = True


def _create_netns(name: str) -> None:
    """Create the named netns, replacing a stale one of the same name, and bring lo up."""
    from pyroute2 import NetNS, netns

    _default_signals_in_helpers()
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        log.warning("removing stale network namespace %s", name)
        _remove_netns(name)
    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def _create_endpoint(attachment: Attachment) -> None:
    """Create the netns and the veth pair, and configure eth0 inside the netns."""
    from pyroute2 import IPRoute

    name = netns_name(attachment.container_id)
    peer = "lsp" + _short(attachment.container_id)
    _create_netns(name)
    with IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=attachment.network)[0]
        ipr.link("add", ifname=attachment.host_veth, kind="veth",
                 peer={"ifname": peer, "net_ns_fd": name})  # fmt: skip
        host_end = ipr.link_lookup(ifname=attachment.host_veth)[0]
        ipr.link("set", index=host_end, master=bridge, state="up")
    _configure_container_end(name, peer, attachment)


def _configure_container_end(name: str, peer: str, attachment: Attachment) -> None:
    from pyroute2 import NetNS

    _default_signals_in_helpers()
    with NetNS(name) as ns:
        index = ns.link_lookup(ifname=peer)[0]
        ns.link("set", index=index, ifname=CONTAINER_IFNAME)
        ns.addr("add", index=index, address=attachment.address, prefixlen=attachment.prefix_len)
        ns.link("set", index=index, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=attachment.gateway)


# ---------------------------------------------------------------------------- detach


def endpoint(meta: Meta, container_id: str) -> Attachment | None:
    """Return the recorded attachment of `container_id`, or None when it has none."""
    with meta.read() as txn:
        record = txn.get("networks", _endpoint_key(container_id))
    return None if record is None else Attachment.from_record(record)


def detach(meta: Meta, container_id: str) -> None:
    """Remove the rules, veth, netns and address recorded for `container_id`.

    Idempotent, and works from the record alone (after a crash of the attaching process).
    The record goes last, so an interrupted detach can be repeated.
    """
    attachment = endpoint(meta, container_id)
    if attachment is None:
        return

    for rule in attachment.rules:
        portmap.delete_rule(rule)
    if attachment.host_veth:
        _delete_link(attachment.host_veth)
    if attachment.netns_path:
        _remove_netns(os.path.basename(attachment.netns_path))

    with meta.write() as txn:
        if attachment.network and attachment.address:
            ipam.release(txn, attachment.network, attachment.address)
        txn.delete("networks", _endpoint_key(container_id))
    log.info("container %s detached from its network", container_id)


def _detach_quietly(meta: Meta, container_id: str) -> None:
    try:
        detach(meta, container_id)
    except Exception:
        log.exception("cleanup after a failed network attach of %s failed", container_id)


def _delete_link(ifname: str) -> None:
    # Deleting one end of a veth pair deletes the other one too.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            ipr.link("del", index=index)


def _remove_netns(name: str) -> None:
    from pyroute2 import netns

    _default_signals_in_helpers()
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ContainerError(
            f"failed to remove network namespace {name}: {exc}", path=f"{NETNS_DIR}/{name}"
        ) from exc
