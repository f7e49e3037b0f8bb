"""Pseudo-terminals of containers: opening a pty in a devpts instance, window sizes.

A container's terminal comes from the container's own devpts instance (mounted with
`newinstance` at /dev/pts), as runc allocates it. Then `tty` inside prints /dev/pts/N and
the name resolves there. A pty from the host's devpts works as a terminal too, but
ttyname(3) inside the container cannot find it.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

# Unlock a pty and read its number (linux/include/uapi/asm-generic/ioctls.h). Python's
# termios module has neither constant.
TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430

# struct winsize (tty_ioctl(4)): rows, columns, then width and height in pixels, which lstore
# leaves 0.
_WINSIZE_FORMAT = "HHHH"


def open_pty(devpts: str) -> tuple[int, int, str]:
    """Open a new pty pair in the devpts instance mounted at `devpts`.

    Returns (master, slave, path of the slave under `devpts`). Both descriptors are
    close-on-exec and not the caller's controlling terminal. Raises OSError when `devpts`
    has no ptmx node or the pty cannot be set up; nothing stays open then.
    """
    master = os.open(os.path.join(devpts, "ptmx"), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
        path = os.path.join(devpts, str(number))
        slave = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        raise
    return master, slave, path


def window_size(fd: int) -> tuple[int, int] | None:
    """Return the (rows, columns) of the terminal `fd`, or None when `fd` is no terminal."""
    if not os.isatty(fd):
        return None
    packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * struct.calcsize(_WINSIZE_FORMAT))
    rows, columns, _, _ = struct.unpack(_WINSIZE_FORMAT, packed)
    return rows, columns


def set_window_size(fd: int, size: tuple[int, int]) -> None:
    """Set the (rows, columns) of the pty that `fd` (master or slave) belongs to.

    When the size changes, the kernel sends SIGWINCH to the foreground process group of
    the terminal, so the program inside can redraw for the new size.
    """
    rows, columns = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack(_WINSIZE_FORMAT, rows, columns, 0, 0))


def first_window_size(*fds: int | None) -> tuple[int, int] | None:
    """Return the size of the first terminal among `fds` (None entries are skipped)."""
    for fd in fds:
        if fd is not None:
            size = window_size(fd)
            if size is not None:
                return size
    return None
