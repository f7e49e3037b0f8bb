"""Container resolv.conf, /etc/hosts and /etc/hostname generation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lstore.errors import InvalidArgumentError
from lstore.runner import etcfiles, resolvconf

STUB = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n"
UPSTREAM = "nameserver 198.18.53.2\nnameserver 198.18.53.3\nsearch corp.example\n"

# (case, network mode, host file or None when missing, systemd file or None,
#  expected lines in the generated file, lines that must not appear, fallback warning)
CASES = [
    (
        "F1 systemd stub",
        "bridge",
        STUB,
        UPSTREAM,
        [
            "nameserver 198.18.53.2",
            "nameserver 198.18.53.3",
            "search corp.example",
            "options edns0 trust-ad",
        ],
        ["nameserver 127.0.0.53"],
        False,
    ),
    (
        "F2 loopback only",
        "bridge",
        "nameserver 127.0.0.1\nnameserver ::1\n",
        None,
        ["nameserver 8.8.8.8", "nameserver 8.8.4.4"],
        ["nameserver 127.0.0.1", "nameserver ::1"],
        True,
    ),
    (
        "F3 host file missing",
        "bridge",
        None,
        None,
        ["nameserver 8.8.8.8", "nameserver 8.8.4.4"],
        [],
        True,
    ),
    (
        "F4 stub and upstream",
        "bridge",
        "nameserver 127.0.0.53\nnameserver 198.18.53.1\noptions ndots:2 timeout:1\n",
        None,
        ["nameserver 198.18.53.1", "options ndots:2 timeout:1"],
        ["nameserver 127.0.0.53", "nameserver 8.8.8.8"],
        False,
    ),
    (
        "F5 host networking",
        "host",
        STUB,
        UPSTREAM,
        ["nameserver 127.0.0.53", "options edns0 trust-ad", "search corp.example"],
        ["nameserver 198.18.53.2", "nameserver 198.18.53.3"],
        False,
    ),
    (
        "none mode drops loopback",
        "none",
        "nameserver 127.0.0.1\nnameserver 198.18.53.9\n",
        None,
        ["nameserver 198.18.53.9"],
        ["nameserver 127.0.0.1"],
        False,
    ),
    (
        "host mode missing file",
        "host",
        None,
        None,
        ["nameserver 8.8.8.8", "nameserver 8.8.4.4"],
        [],
        True,
    ),
]


def write_fixtures(tmp_path: Path, host: str | None, systemd: str | None) -> tuple[str, str]:
    host_path = tmp_path / "etc-resolv.conf"
    systemd_path = tmp_path / "systemd-resolv.conf"
    if host is not None:
        host_path.write_text(host)
    if systemd is not None:
        systemd_path.write_text(systemd)
    return str(host_path), str(systemd_path)


@pytest.mark.parametrize(
    ("mode", "host", "systemd", "present", "absent", "warns"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_resolv_conf_cases(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    host: str | None,
    systemd: str | None,
    present: list[str],
    absent: list[str],
    warns: bool,
) -> None:
    host_path, systemd_path = write_fixtures(tmp_path, host, systemd)

    with caplog.at_level(logging.WARNING, logger="lstore.runner.resolvconf"):
        lines = resolvconf.resolv_conf(mode, host_path, systemd_path).splitlines()

    for line in present:
        assert line in lines
    for line in absent:
        assert line not in lines
    assert ("fallback nameservers" in caplog.text) is warns
    if host is not None:
        assert Path(host_path).read_text() == host


def test_host_mode_keeps_stub_verbatim(tmp_path: Path) -> None:
    host_path, systemd_path = write_fixtures(tmp_path, STUB, UPSTREAM)

    assert resolvconf.resolv_conf("host", host_path, systemd_path) == STUB


def test_dns_option_replaces_nameservers(tmp_path: Path) -> None:
    host_path, systemd_path = write_fixtures(tmp_path, STUB, UPSTREAM)

    text = resolvconf.resolv_conf("bridge", host_path, systemd_path, dns=["198.18.53.7"])

    assert [line for line in text.splitlines() if line.startswith("nameserver")] == [
        "nameserver 198.18.53.7"
    ]
    assert "search corp.example" in text.splitlines()


def test_upstream_order_replaces_stub_in_place(tmp_path: Path) -> None:
    host = "nameserver 198.18.53.1\nnameserver 127.0.0.53\nnameserver 198.18.53.4\n"
    host_path, systemd_path = write_fixtures(tmp_path, host, UPSTREAM)

    text = resolvconf.resolv_conf("bridge", host_path, systemd_path)

    servers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver")]
    assert servers == ["198.18.53.1", "198.18.53.2", "198.18.53.3", "198.18.53.4"]


def test_hosts_file_maps_address_to_hostname() -> None:
    lines = etcfiles.hosts_file("web.corp.example", "198.18.0.2").splitlines()

    assert "127.0.0.1\tlocalhost" in lines
    assert "::1\tlocalhost ip6-localhost ip6-loopback" in lines
    assert lines[-1] == "198.18.0.2\tweb.corp.example web"


def test_hosts_file_without_address_has_no_hostname() -> None:
    text = etcfiles.hosts_file("box", None)

    assert "box" not in text
    assert text.startswith("127.0.0.1\tlocalhost\n")


@pytest.mark.parametrize("hostname", ["", "-lead", "a_b", "x" * 64, "a..b", "a" * 254])
def test_invalid_hostname_is_rejected(hostname: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid hostname"):
        etcfiles.hostname_file(hostname)


def test_hostname_file_ends_with_newline() -> None:
    assert etcfiles.hostname_file("c0ffee123456") == "c0ffee123456\n"
