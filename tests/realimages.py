"""Compare directory trees, such as lstore's mounted image with the tree umoci unpacks.

A signature records what a container can observe of each entry: type, permission bits
(setuid, setgid and sticky included), owner, and the content (file size and sha256,
symlink target, device numbers). Whiteouts and opaque markers are absent from a merged
view, so they have no place in a signature.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator

# (type, mode, uid, gid, size, detail). The detail is the sha256 of a file, the target of a
# symlink, "major:minor" of a device, and "" for other types.
EntrySignature = tuple[str, int, int, int, int, str]
TreeSignature = dict[str, EntrySignature]

_TYPES = [
    (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
]


def tree_signature(root: str) -> TreeSignature:
    """Map each path under `root` ("/bin/sh", without `root` itself) to its signature.

    Symlinks are recorded, never followed. The root directory is left out because its
    mode and owner come from the mount point, not from the image.
    """
    return {path: entry_signature(full) for path, full in _walk(root)}


def _walk(root: str) -> Iterator[tuple[str, str]]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        relative = os.path.relpath(directory, root)
        prefix = "/" if relative == "." else f"/{relative}/"
        for name in sorted(dirnames + filenames):
            yield prefix + name, os.path.join(directory, name)


def entry_signature(path: str) -> EntrySignature:
    """Describe one entry without following it if it is a symlink."""
    info = os.lstat(path)
    kind = file_type(info.st_mode)
    size = info.st_size if kind in ("file", "symlink") else 0
    mode = stat.S_IMODE(info.st_mode)
    return kind, mode, info.st_uid, info.st_gid, size, _detail(path, kind, info)


def file_type(mode: int) -> str:
    for predicate, name in _TYPES:
        if predicate(mode):
            return name
    return "unknown"


def _detail(path: str, kind: str, info: os.stat_result) -> str:
    if kind == "file":
        return _sha256_file(path)
    if kind == "symlink":
        return os.readlink(path)
    if kind in ("char", "block"):
        return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return ""


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as content:
        while chunk := content.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe(signature: EntrySignature) -> str:
    kind, mode, uid, gid, size, detail = signature
    text = f"{kind} {mode:04o} {uid}:{gid}"
    if kind == "file":
        return f"{text} size={size} sha256={detail[:12]}"
    if detail:
        return f"{text} -> {detail}" if kind == "symlink" else f"{text} dev={detail}"
    return text


def tree_differences(expected: TreeSignature, actual: TreeSignature) -> list[str]:
    """List every difference as one readable line, in path order."""
    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        if want == got:
            continue
        if got is None:
            lines.append(f"missing {path}: expected {describe(want)}")  # type: ignore[arg-type]
        elif want is None:
            lines.append(f"unexpected {path}: {describe(got)}")
        else:
            lines.append(f"differs {path}: expected {describe(want)}, got {describe(got)}")
    return lines


def assert_same_tree(expected_root: str, actual_root: str, show: int = 20) -> None:
    """Fail with the first `show` differences when two trees differ in any signature."""
    differences = tree_differences(tree_signature(expected_root), tree_signature(actual_root))
    if not differences:
        return
    listed = "\n  ".join(differences[:show])
    more = f"\n  ... and {len(differences) - show} more" if len(differences) > show else ""
    raise AssertionError(f"{len(differences)} differences between {expected_root} (expected) "
                         f"and {actual_root}:\n  {listed}{more}")


def umoci_rootfs(layout_dir: str, tag: str, dest: str) -> str:
    """Unpack image `tag` of an OCI layout with umoci into the new bundle `dest`.

    Returns dest/rootfs. Raises AssertionError with umoci's output when it fails.
    """
    command = ["umoci", "unpack", "--image", f"{layout_dir}:{tag}", dest]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed with exit code {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return os.path.join(dest, "rootfs")
