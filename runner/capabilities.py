"""Linux capabilities by name, and the calls that set a process's capability sets.

Numbers are from linux/capability.h. capset(2) takes two 32-bit words per set with
_LINUX_CAPABILITY_VERSION_3, which covers capabilities 0 to 63.
"""

from __future__ import annotations

import ctypes

from lstore.errors import InvalidArgumentError
from lstore.runner.nsutil import check

CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2

_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def mask(names: list[str]) -> int:
    """Return the bit mask of capability names such as "CAP_CHOWN".

    Raises InvalidArgumentError for a name this module does not know.
    """
    bits = 0
    for name in names:
        if name not in CAPABILITIES:
            raise InvalidArgumentError(
                f"unknown capability {name!r}; expected a name such as "
                "CAP_CHOWN from capabilities(7)"
            )
        bits |= 1 << CAPABILITIES[name]
    return bits


def last_capability() -> int:
    """Return the highest capability number that the running kernel supports."""
    with open("/proc/sys/kernel/cap_last_cap") as last:
        return int(last.read())


def prctl(option: int, argument: int = 0, argument3: int = 0) -> None:
    """Call prctl(2) with up to two arguments; raise OSError on failure."""
    result = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(argument),
        ctypes.c_ulong(argument3),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    check(result, f"prctl {option}")


def drop_bounding(keep: int) -> None:
    """Remove every capability not in `keep` from the bounding set (needs CAP_SETPCAP).

    The bounding set limits what any later exec can gain, including file capabilities.
    """
    for number in range(last_capability() + 1):
        if not keep & (1 << number):
            prctl(PR_CAPBSET_DROP, number)


def set_capabilities(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's effective, permitted and inheritable sets with capset(2)."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for index in range(2):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    check(_libc.capset(ctypes.byref(header), data), "capset")


def raise_ambient(ambient: int) -> None:
    """Add each capability in `ambient` to the ambient set; it must be permitted and
    inheritable already."""
    for number in range(64):
        if ambient & (1 << number):
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number)
