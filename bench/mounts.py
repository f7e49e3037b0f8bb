"""Clean up mounts that a benchmarked tool left below a benchmark directory."""

from __future__ import annotations

import logging
import os

from lstore.store.overlay import unmount

log = logging.getLogger(__name__)


def mount_points_below(base: str, mountinfo: str) -> list[str]:
    """List the mount points strictly below `base` in a /proc/self/mountinfo text, deepest
    first, so that each can be unmounted before its parent."""
    prefix = os.path.abspath(base).rstrip("/") + "/"
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # Field 5 is the mount point with space, tab, newline and backslash octal-escaped.
        point = _unescape(fields[4])
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_below(base: str) -> None:
    """Unmount everything mounted below `base`, such as a container rootfs a crashed run
    left behind, so that deleting `base` never descends into a mounted tree."""
    with open("/proc/self/mountinfo") as mountinfo:
        points = mount_points_below(base, mountinfo.read())
    for point in points:
        log.warning("unmounting %s, left behind by a benchmarked tool", point)
        unmount(point)


def _unescape(text: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text
