"""Idmapped layer mounts for --userns containers, on real directories and real mounts.

Needs root and Linux 5.19 or later. The layer owners on disk are checked after every mount,
because image layers are shared by all containers and must keep their owners.
"""

from __future__ import annotations

import os
import pathlib
import stat
import tempfile
from collections.abc import Iterator

import pytest

from lstore.errors import ContainerError
from lstore.runner import idmap
from lstore.store.overlay import mount_overlay, unmount

pytestmark = pytest.mark.root

ID_RANGE = (100000, 65536)
OVERFLOW_ID = 65534  # /proc/sys/kernel/overflowuid: how unmapped ids appear


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo]


def _mounts_under(path: str) -> list[str]:
    return [point for point in _mount_points() if point.startswith(path.rstrip("/") + "/")]


@pytest.fixture
def layer(tmp_path) -> str:
    """A layer directory with files owned by root, uid 1000 and an unmapped uid."""
    path = tmp_path / "layer"
    path.mkdir()
    for name, owner in (("root-file", 0), ("user-file", 1000), ("unmapped-file", 70000)):
        (path / name).write_text(name)
        os.chown(path / name, owner, owner)
    return str(path)


@pytest.fixture
def container_dir(tmp_path) -> Iterator[str]:
    path = tmp_path / "container"
    path.mkdir()
    yield str(path)
    idmap.unmount_layers(str(path))


@pytest.mark.parametrize(("name", "on_disk", "through_mount"), [
    ("root-file", 0, 100000),
    ("user-file", 1000, 101000),
    ("unmapped-file", 70000, OVERFLOW_ID),
])
def test_idmapped_mount_shifts_owners(layer, container_dir, name, on_disk, through_mount):
    [mounted] = idmap.mount_layers(container_dir, [layer], ID_RANGE)

    assert os.stat(os.path.join(mounted, name)).st_uid == through_mount
    assert os.stat(os.path.join(mounted, name)).st_gid == through_mount
    assert os.stat(os.path.join(layer, name)).st_uid == on_disk


def test_mount_layers_orders_mounts_bottom_first(tmp_path, container_dir):
    layers = []
    for index in range(3):
        path = tmp_path / f"layer{index}"
        path.mkdir()
        (path / "index").write_text(str(index))
        layers.append(str(path))

    mounted = idmap.mount_layers(container_dir, layers, ID_RANGE)

    assert mounted == [os.path.join(container_dir, "idmapped", str(i)) for i in range(3)]
    assert [pathlib.Path(m, "index").read_text() for m in mounted] == ["0", "1", "2"]
    assert _mounts_under(container_dir) == mounted


def test_unmount_layers_removes_mounts_and_dirs(layer, container_dir):
    idmap.mount_layers(container_dir, [layer, layer], ID_RANGE)

    idmap.unmount_layers(container_dir)

    assert _mounts_under(container_dir) == []
    assert os.listdir(container_dir) == []
    assert os.listdir(layer) != []


def test_unmount_layers_is_idempotent(layer, container_dir):
    idmap.mount_layers(container_dir, [layer], ID_RANGE)
    idmap.unmount_layers(container_dir)

    idmap.unmount_layers(container_dir)

    assert os.listdir(container_dir) == []


def test_unmount_layers_cleans_half_made_staging(layer, container_dir):
    # A crash after mkdir and before the mount leaves an empty staging directory.
    idmap.mount_layers(container_dir, [layer], ID_RANGE)
    os.mkdir(os.path.join(container_dir, "idmapped", "1"))

    idmap.unmount_layers(container_dir)

    assert os.listdir(container_dir) == []


def test_overlay_copy_up_owned_by_mapped_root(layer, container_dir, tmp_path):
    upper, work, merged = (tmp_path / name for name in ("upper", "work", "merged"))
    for directory in (upper, work, merged):
        directory.mkdir()
        os.chown(directory, ID_RANGE[0], ID_RANGE[0])
    lowers = idmap.mount_layers(container_dir, [layer], ID_RANGE)
    mount_overlay(str(merged), lowers, str(upper), str(work))
    try:
        with open(merged / "root-file", "a") as changed:
            changed.write("more")
        copied = os.stat(upper / "root-file")
    finally:
        unmount(str(merged))

    assert copied.st_uid == ID_RANGE[0]
    assert os.stat(os.path.join(layer, "root-file")).st_uid == 0
    assert pathlib.Path(layer, "root-file").read_text() == "root-file"


def test_mount_idmapped_rejects_filesystem_without_idmap(tmp_path):
    # overlayfs cannot be idmapped itself, as a store on an overlay (in a container) is not.
    lower, upper, work, merged, target = (tmp_path / n for n in ("l", "u", "w", "m", "t"))
    for directory in (lower, upper, work, merged, target):
        directory.mkdir()
    mount_overlay(str(merged), [str(lower)], str(upper), str(work))
    userns_fd = idmap.open_userns(ID_RANGE)
    try:
        with pytest.raises(ContainerError, match=r"--userns needs idmapped mounts \(Linux 5.19"):
            idmap.mount_idmapped(str(merged), str(target), userns_fd)
    finally:
        os.close(userns_fd)
        unmount(str(merged))

    assert str(target) not in _mount_points()


def test_mount_layers_leaves_nothing_on_error(layer, container_dir, tmp_path):
    missing = str(tmp_path / "missing-layer")

    with pytest.raises(ContainerError, match="idmapped mount of layer .*missing-layer"):
        idmap.mount_layers(container_dir, [layer, missing], ID_RANGE)

    assert _mounts_under(container_dir) == []
    assert os.listdir(container_dir) == []


def test_open_userns_maps_the_range():
    userns_fd = idmap.open_userns(ID_RANGE)
    try:
        link = os.readlink(f"/proc/self/fd/{userns_fd}")
    finally:
        os.close(userns_fd)

    assert link.startswith("user:[")
    assert link != os.readlink("/proc/self/ns/user")


# ---------------------------------------------------------------------------- search access


@pytest.fixture
def searchable_base() -> Iterator[str]:
    """A directory under /tmp that everyone may search, unlike pytest's 0700 tmp_path."""
    base = tempfile.mkdtemp(prefix="lstore-idmap-")
    os.chmod(base, 0o711)
    yield base
    os.rmdir(os.path.join(base, "leaf"))
    os.rmdir(base)


@pytest.mark.parametrize(("mode", "owner", "allowed"), [
    (0o700, 0, False),
    (0o711, 0, True),
    (0o701, 0, True),
    (0o700, ID_RANGE[0], True),
    (0o071, ID_RANGE[0], False),  # the owner class applies, even when others may search
    (0o710, (0, ID_RANGE[0]), True),
])
def test_check_searchable_table(searchable_base, mode, owner, allowed):
    leaf = os.path.join(searchable_base, "leaf")
    os.mkdir(leaf)
    uid, gid = owner if isinstance(owner, tuple) else (owner, owner)
    os.chown(leaf, uid, gid)
    os.chmod(leaf, mode)

    if allowed:
        idmap.check_searchable(leaf, ID_RANGE)
    else:
        with pytest.raises(ContainerError, match=f"cannot search {leaf}; allow it"):
            idmap.check_searchable(leaf, ID_RANGE)


def test_make_searchable_adds_only_search_bits(searchable_base):
    leaf = os.path.join(searchable_base, "leaf")
    os.mkdir(leaf, 0o700)
    os.chmod(leaf, 0o700)

    idmap.make_searchable([leaf])

    assert stat.S_IMODE(os.stat(leaf).st_mode) == 0o711
