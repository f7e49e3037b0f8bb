"""Layer cases from public bug reports of other container tools, checked on the unpacked layer
directories and on a read-only OverlayFS mount of them: the view a container gets.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from lstore.errors import IntegrityError, UnsafeLayerError
from tests import layers
from tests.layers import (
    Member,
    directory,
    file,
    gzip_member,
    hardlink,
    needs_root,  # noqa: F401 - fixture
    opaque,
    sha256,
    symlink,
    tar_bytes,
    tree,
    unpack,
    unpack_layers,
    whiteout,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_root")]


def merged_tree(layer_members: Sequence[Sequence[Member]], tmp_path: Path) -> dict[str, str]:
    """Unpack the layers (bottom first), mount them as overlay and describe the merged tree."""
    dirs = unpack_layers(layer_members, tmp_path / "layers")
    with layers.overlay(dirs, tmp_path / "merged") as merged:
        return tree(merged)


def has_whiteout_names(described: dict[str, str]) -> bool:
    return any(".wh." in path for path in described)


def opaque_flag(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "trusted.overlay.opaque")
    except OSError:
        return None


# Opaque directories and directory whiteouts: a directory deleted or made opaque and recreated
# must not bring back the lower layers' children, whatever the marker's position in the tar.

OPAQUE_LOWER = [
    directory("a"), directory("a/b"), directory("a/b/c"), file("a/b/c/bar", b"old"),
    file("a/keep", b"k1"), directory("x"), file("x/old", b"o"),
]
OPAQUE_UPPER = [
    directory("a"), opaque("a"), directory("a/b"), directory("a/b/c"), file("a/b/c/foo", b"new"),
    whiteout("x"), directory("x"), file("x/new", b"n"),
]
OPAQUE_UPPER_MARKER_LAST = [member for member in OPAQUE_UPPER if ".wh..wh." not in
                            member[0].name] + [opaque("a")]
OPAQUE_EXPECTED = {"a": "dir", "a/b": "dir", "a/b/c": "dir", "a/b/c/foo": "new",
                   "x": "dir", "x/new": "n"}


@pytest.mark.parametrize(
    "upper", [OPAQUE_UPPER, OPAQUE_UPPER_MARKER_LAST], ids=["marker-first", "marker-last"]
)
def test_opaque_directory_hides_lower_children(tmp_path: Path, upper: list[Member]) -> None:
    merged = merged_tree([OPAQUE_LOWER, upper], tmp_path)

    assert merged == OPAQUE_EXPECTED
    assert opaque_flag(tmp_path / "layers/1/a") == b"y"
    assert opaque_flag(tmp_path / "layers/1/x") == b"y"
    assert not has_whiteout_names(tree(tmp_path / "layers/1"))


def test_deleted_directory_recreated_two_layers_up(tmp_path: Path) -> None:
    merged = merged_tree(
        [[file("a/foo", b"foo"), file("b/bar", b"bar")], [whiteout("a")], [file("a/baz", b"z")]],
        tmp_path,
    )

    assert merged == {"a": "dir", "a/baz": "z", "b": "dir", "b/bar": "bar"}


def test_single_layer_opaque_marker_is_not_a_file(tmp_path: Path) -> None:
    members = [directory("root"), opaque("root"), file("root/f", b"f")]
    merged = merged_tree([members], tmp_path)

    assert merged == {"root": "dir", "root/f": "f"}
    assert tree(tmp_path / "layers/0") == {"root": "dir", "root/f": "f"}


# Hardlink aliases: overwriting one name in a later layer must not change the other names.


def test_hardlink_alias_keeps_old_content(tmp_path: Path) -> None:
    merged = merged_tree(
        [
            [file("t2", b"123\n")],
            [file("t1", b"123\n"), hardlink("t2", "t1"), hardlink("t3", "t1")],
            [file("t1", b"456\n")],
        ],
        tmp_path,
    )

    assert merged == {"t1": "456\n", "t2": "123\n", "t3": "123\n"}
    assert (tmp_path / "layers/1/t2").stat().st_nlink == 3


def test_hardlink_survives_deleted_target_name(tmp_path: Path) -> None:
    merged = merged_tree(
        [[file("LINK-A", b"data"), hardlink("LINK-Z", "LINK-A")], [whiteout("LINK-A")]],
        tmp_path,
    )

    assert merged == {"LINK-Z": "data"}
    assert (tmp_path / "layers/0/LINK-Z").stat().st_nlink == 2


# Absolute hardlink targets as kaniko writes them, and targets that climb out.

PERL = [
    directory("usr"), directory("usr/bin"),
    file("usr/bin/perlbug", b"#!/bin/sh\necho bug\n", mode=0o755),
    hardlink("usr/bin/perlthanks", "/usr/bin/perlbug"),
]


@pytest.mark.parametrize(
    "members", [PERL, [directory("/", mode=0o755), *PERL]], ids=["plain", "root-entry"]
)
def test_absolute_hardlink_target_resolves_in_layer(tmp_path: Path, members: list[Member]) -> None:
    merged = merged_tree([members], tmp_path)
    layer = tmp_path / "layers/0"

    assert merged["usr/bin/perlthanks"] == "#!/bin/sh\necho bug\n"
    assert (layer / "usr/bin/perlthanks").stat().st_ino == (layer / "usr/bin/perlbug").stat().st_ino
    assert (layer / "usr/bin/perlbug").stat().st_nlink == 2
    assert stat.S_IMODE(layer.stat().st_mode) == 0o755


@pytest.mark.parametrize("prefix", ["/", ""], ids=["absolute", "relative"])
def test_hardlink_climbing_out_of_the_store_is_rejected(tmp_path: Path, prefix: str) -> None:
    victim = tmp_path / "victim-file"
    victim.write_bytes(b"HOST-SECRET")
    dest = tmp_path / "store" / "snapshots" / "tmp-1"
    target = prefix + "../../../victim-file"

    with pytest.raises(UnsafeLayerError) as caught:
        unpack(tar_bytes([hardlink("victim", target)]), dest)

    assert caught.value.entry == "victim"
    assert victim.stat().st_nlink == 1
    for current, _, files in os.walk(tmp_path / "store"):
        for name in files:
            assert b"HOST-SECRET" not in Path(current, name).read_bytes()


# An upper layer replaces a lower symlink: the new node replaces the link, without following it.

BUSYBOX = [
    directory("bin"), file("bin/busybox", b"BUSYBOX", mode=0o755),
    directory("usr"), directory("usr/bin"), symlink("usr/bin/env", "/bin/busybox"),
]


def test_file_replaces_lower_symlink(tmp_path: Path) -> None:
    merged = merged_tree(
        [BUSYBOX, [file("usr/bin/env", b"COREUTILS-ENV", mode=0o755)]], tmp_path
    )

    assert merged["usr/bin/env"] == "COREUTILS-ENV"
    assert merged["bin/busybox"] == "BUSYBOX"
    assert (tmp_path / "layers/0/bin/busybox").read_bytes() == b"BUSYBOX"


def test_directory_replaces_lower_symlink(tmp_path: Path) -> None:
    merged = merged_tree([BUSYBOX, [directory("usr/bin/env"), file("usr/bin/env/x", b"x")]],
                         tmp_path)

    assert merged["usr/bin/env"] == "dir"
    assert merged["usr/bin/env/x"] == "x"
    assert merged["bin/busybox"] == "BUSYBOX"


def test_directory_replaces_lower_symlink_to_host(tmp_path: Path) -> None:
    outside = tmp_path / "lstore-outside"
    outside.mkdir()
    merged = merged_tree(
        [[symlink("etc", str(outside))], [directory("etc"), file("etc/passwd", b"root:x:0:0")]],
        tmp_path,
    )

    assert merged == {"etc": "dir", "etc/passwd": "root:x:0:0"}
    assert os.listdir(outside) == []


# Bytes after the tar end-of-archive marker belong to the diffID.

HELLO = tar_bytes([file("hello", b"hi\n")])
PADDED = HELLO + bytes(4096)


@pytest.mark.parametrize(
    "blob, compression",
    [(gzip.compress(PADDED), "gzip"), (gzip.compress(PADDED) + bytes(512), "gzip"),
     (PADDED, "none")],
    ids=["gzip", "gzip-nul-padding", "uncompressed"],
)
def test_trailing_zeros_count_in_diff_id(tmp_path: Path, blob: bytes, compression: str) -> None:
    dest = tmp_path / "layers/0"
    result = unpack(blob, dest, compression, expected_diff_id=sha256(PADDED))

    assert result.diff_id == sha256(PADDED)
    assert result.size == len(PADDED)
    with layers.overlay([dest], tmp_path / "merged") as merged:
        assert tree(merged) == {"hello": "hi\n"}


def test_diff_id_without_trailing_zeros_mismatches(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="diffID mismatch") as caught:
        unpack(gzip.compress(PADDED), tmp_path / "layer", "gzip", expected_diff_id=sha256(HELLO))

    assert caught.value.expected == sha256(HELLO)
    assert caught.value.actual == sha256(PADDED)


# Multi-member gzip: every member is part of the layer.

TWO_FILES = tar_bytes([file("a", b"A" * 1000), file("b", b"B" * 1000)])


@pytest.mark.parametrize(
    "blob",
    [
        gzip.compress(TWO_FILES[:1536]) + gzip.compress(TWO_FILES[1536:]),
        gzip.compress(TWO_FILES[:1536]) + gzip.compress(b"") + gzip.compress(TWO_FILES[1536:]),
        gzip_member(TWO_FILES, name=b"layer.tar", extra=b"AB\x02\x00xy", header_crc=True),
    ],
    ids=["two-members", "empty-middle-member", "header-fields"],
)
def test_every_gzip_member_is_unpacked(tmp_path: Path, blob: bytes) -> None:
    dest = tmp_path / "layers/0"
    result = unpack(blob, dest, "gzip", expected_diff_id=sha256(TWO_FILES))

    assert result.diff_id == sha256(TWO_FILES)
    with layers.overlay([dest], tmp_path / "merged") as merged:
        assert tree(merged) == {"a": "A" * 1000, "b": "B" * 1000}


def test_gzip_trailing_garbage_is_rejected(tmp_path: Path) -> None:
    blob = gzip.compress(TWO_FILES) + b"GARBAGE!GARBAGE!"

    with pytest.raises(IntegrityError, match="trailing garbage after gzip stream"):
        unpack(blob, tmp_path / "layer", "gzip", expected_diff_id=sha256(TWO_FILES))


# Duplicate paths in one layer: the last entry wins, content and metadata together.


def test_duplicate_paths_last_entry_wins(tmp_path: Path) -> None:
    members = [
        directory("etc/"), file("etc/conf", b"first", mode=0o644),
        file("etc/conf", b"second", mode=0o600),
        file("x", b"file"), directory("x/"), file("x/y", b"y"),
        directory("./d", mode=0o755, mtime=100), directory("d/", mode=0o700, mtime=200),
    ]
    tar = tar_bytes(members)
    dest = tmp_path / "layers/0"
    result = unpack(tar, dest, expected_diff_id=sha256(tar))

    with layers.overlay([dest], tmp_path / "merged") as merged:
        assert tree(merged) == {"etc": "dir", "etc/conf": "second", "x": "dir", "x/y": "y",
                                "d": "dir"}
        assert stat.S_IMODE((merged / "etc/conf").stat().st_mode) == 0o600
        assert stat.S_IMODE((merged / "d").stat().st_mode) == 0o700
        assert (merged / "d").stat().st_mtime_ns == 200 * 10**9
    assert result.entries == len(members)
