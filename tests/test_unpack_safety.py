"""unpack_layer on hostile layers: nothing is created, changed or linked outside the snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lstore.errors import UnsafeLayerError
from tests import layers
from tests.layers import (
    Member,
    directory,
    file,
    hardlink,
    needs_root,  # noqa: F401 - fixture
    symlink,
    tar_bytes,
    unpack,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_root")]

SECRET = b"HOST-SECRET"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory beside the store, with a victim file on the same filesystem."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "victim-file").write_bytes(SECRET)
    return tmp_path


def snapshot_dir(host: Path) -> Path:
    # Three levels below `host`, as ROOT/snapshots/tmp-1 sits below the store's parent.
    return host / "store" / "snapshots" / "tmp-1"


def assert_host_untouched(host: Path) -> None:
    victim = host / "victim-file"
    assert victim.read_bytes() == SECRET
    assert victim.stat().st_nlink == 1
    assert os.listdir(host / "outside") == []
    assert not (host / "escaped").exists()


def assert_no_secret_in_store(host: Path) -> None:
    for current, _, files in os.walk(host / "store"):
        for name in files:
            path = Path(current, name)
            if path.is_file() and not path.is_symlink():
                assert SECRET not in path.read_bytes(), path


def unpack_hostile(members: list[Member], host: Path) -> UnsafeLayerError:
    with pytest.raises(UnsafeLayerError) as caught:
        unpack(tar_bytes(members), snapshot_dir(host))
    assert caught.value.digest == layers.LAYER_DIGEST
    assert layers.LAYER_DIGEST in str(caught.value)
    return caught.value


ESCAPING_NAMES = [
    "../escaped",
    "../../../escaped",
    "a/../../escaped",
    "/../escaped",
    "./../escaped",
    "a/b/../../../escaped",
]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_dotdot_names_are_rejected(host: Path, name: str, kind: str) -> None:
    member = {"file": file(name, b"x"), "directory": directory(name),
              "symlink": symlink(name, "/etc/passwd")}[kind]

    error = unpack_hostile([member], host)

    assert error.entry.rstrip("/") == name
    assert_host_untouched(host)


@pytest.mark.parametrize(
    "members",
    [
        [symlink("link", "{outside}"), file("link/file", b"x")],
        [symlink("link", "../../../outside"), file("link/file", b"x")],
        [symlink("link", "/"), file("link/escaped", b"x")],
        [symlink("l1", "l2"), symlink("l2", "{outside}"), file("l1/file", b"x")],
        [symlink("link", "{outside}"), directory("link/sub")],
        [symlink("link", "{outside}"), file("link/a/b", b"x")],
        [directory("d"), symlink("d/up", "../.."), file("d/up/escaped", b"x")],
    ],
    ids=["absolute", "relative", "root", "chain", "directory", "deep", "nested"],
)
def test_writes_through_symlinks_are_rejected(host: Path, members: list[Member]) -> None:
    for info, _ in members:
        info.linkname = info.linkname.format(outside=host / "outside")

    error = unpack_hostile(members, host)

    assert "symlink" in str(error)
    assert_host_untouched(host)


VICTIM_DEPTH = "../../../"

EVIL_HARDLINKS = [
    [hardlink("victim", f"/{VICTIM_DEPTH}victim-file")],
    [hardlink("v2", f"{VICTIM_DEPTH}victim-file")],
    [hardlink("v3", "/../../../../../../../victim-file")],
    [symlink("up", "../../.."), hardlink("v4", "up/victim-file")],
    [symlink("up", str(Path("/tmp"))), hardlink("v5", "up/victim-file")],
    [directory("a"), hardlink("v6", f"a/../{VICTIM_DEPTH}victim-file")],
]


@pytest.mark.parametrize("members", EVIL_HARDLINKS, ids=[m[-1][0].name for m in EVIL_HARDLINKS])
def test_hardlinks_out_of_the_layer_are_rejected(host: Path, members: list[Member]) -> None:
    error = unpack_hostile(members, host)

    assert error.entry == members[-1][0].name
    assert_host_untouched(host)
    assert_no_secret_in_store(host)


def test_hardlink_to_symlink_links_the_symlink(host: Path) -> None:
    # A hardlink to a symlink links the symlink itself (linkat without AT_SYMLINK_FOLLOW).
    dest = snapshot_dir(host)
    unpack(tar_bytes([symlink("s", str(host / "victim-file")), hardlink("h", "s")]), dest)

    assert os.readlink(dest / "h") == str(host / "victim-file")
    assert (dest / "h").lstat().st_ino == (dest / "s").lstat().st_ino
    assert_host_untouched(host)


@pytest.mark.parametrize(
    "members, reason",
    [
        ([hardlink("early", "later"), file("later", b"x")], "earlier entry"),
        ([directory("d"), hardlink("h", "d")], "directory"),
        ([hardlink("h", "/")], "not a file"),
        ([file("self", b"x"), hardlink("self", "self")], "not a file"),
        ([file("f", b"x"), hardlink("h", "f/x")], "non-directory"),
        ([file("f", b"x"), layers.whiteout("f"), hardlink("h", "missing")], "earlier entry"),
    ],
    ids=["not-yet-extracted", "directory", "root", "itself", "below-a-file", "missing"],
)
def test_invalid_hardlink_targets_are_rejected(
    host: Path, members: list[Member], reason: str
) -> None:
    error = unpack_hostile(members, host)

    assert reason in str(error)


def test_hardlink_to_whited_out_name_is_rejected(host: Path) -> None:
    error = unpack_hostile([layers.whiteout("gone"), hardlink("h", "gone")], host)

    assert "whiteout" in str(error)


@pytest.mark.parametrize("target", ["/usr/bin/perlbug", "usr/bin/perlbug", "./usr//bin/perlbug"])
def test_absolute_hardlink_target_resolves_in_layer(host: Path, target: str) -> None:
    dest = snapshot_dir(host)
    members = [directory("/", mode=0o755), directory("usr"), directory("usr/bin"),
               file("usr/bin/perlbug", b"#!/bin/sh\necho bug\n", mode=0o755),
               hardlink("usr/bin/perlthanks", target)]
    unpack(tar_bytes(members), dest)

    perlbug = (dest / "usr/bin/perlbug").stat()
    assert (dest / "usr/bin/perlthanks").stat().st_ino == perlbug.st_ino
    assert perlbug.st_nlink == 2
    assert (dest / "usr/bin/perlthanks").read_bytes() == b"#!/bin/sh\necho bug\n"


@pytest.mark.parametrize(
    "replacement",
    [file("link", b"REPLACED"), directory("link"), symlink("link", "elsewhere"),
     layers.device("link", b"3", 1, 3), layers.fifo("link")],
    ids=["file", "directory", "symlink", "device", "fifo"],
)
def test_symlink_leaf_is_replaced_not_followed(host: Path, replacement: Member) -> None:
    dest = snapshot_dir(host)
    members = [symlink("link", str(host / "victim-file")), replacement]
    unpack(tar_bytes(members), dest)

    assert not (dest / "link").is_symlink() or os.readlink(dest / "link") == "elsewhere"
    assert_host_untouched(host)


def test_symlink_to_outside_directory_replaced_by_directory(host: Path) -> None:
    dest = snapshot_dir(host)
    members = [symlink("etc", str(host / "outside")), directory("etc"), file("etc/passwd", b"p")]
    unpack(tar_bytes(members), dest)

    assert layers.tree(dest) == {"etc": "dir", "etc/passwd": "p"}
    assert_host_untouched(host)


def test_nul_byte_in_pax_name_is_rejected(host: Path) -> None:
    info, data = file("placeholder", b"x")
    info.pax_headers["path"] = "evil\x00name"

    error = unpack_hostile([(info, data)], host)

    assert "NUL" in str(error)
    assert_host_untouched(host)


def test_rejected_layer_leaves_earlier_entries_only_inside(host: Path) -> None:
    members = [file("ok", b"fine"), symlink("link", str(host / "outside")),
               file("link/pwned", b"x")]
    unpack_hostile(members, host)

    assert (snapshot_dir(host) / "ok").read_bytes() == b"fine"
    assert_host_untouched(host)
