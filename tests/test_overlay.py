"""Overlay options and real overlay mounts, including images with more layers than fit in
one mount(2) page."""

from __future__ import annotations

import errno
import os

import pytest

from lstore.errors import InvalidArgumentError, StoreError
from lstore.store.overlay import mount_overlay, mount_overlay_classic, overlay_options, unmount

LAYER_COUNT = 200


@pytest.mark.parametrize(
    ("lowerdirs", "upperdir", "workdir", "expected"),
    [
        (["/s/1"], None, None, ["lowerdir=/s/1"]),
        (["/s/1", "/s/2", "/s/3"], None, None, ["lowerdir=/s/3:/s/2:/s/1"]),
        (
            ["/s/1", "/s/2"],
            "/c/upper",
            "/c/work",
            ["lowerdir=/s/2:/s/1", "upperdir=/c/upper", "workdir=/c/work"],
        ),
        (["/s/a:b", "/s/c,d"], None, None, [r"lowerdir=/s/c\,d:/s/a\:b"]),
        ([r"/s/back\slash"], None, None, [r"lowerdir=/s/back\\slash"]),
    ],
)
def test_overlay_options_table(lowerdirs, upperdir, workdir, expected):
    assert overlay_options(lowerdirs, upperdir, workdir) == expected


@pytest.mark.parametrize(
    ("lowerdirs", "upperdir", "workdir"),
    [([], None, None), (["/s/1"], "/c/upper", None), (["/s/1"], None, "/c/work")],
)
def test_overlay_options_reject_incomplete_sets(lowerdirs, upperdir, workdir):
    with pytest.raises(InvalidArgumentError):
        overlay_options(lowerdirs, upperdir, workdir)


def _make_layers(base, count: int, name_width: int = 0) -> list[str]:
    """Create `count` layer dirs under base/snapshots, each adding file-<i>; bottom first."""
    layers = []
    for index in range(count):
        layer = base / "snapshots" / str(index + 1).rjust(name_width, "0")
        layer.mkdir(parents=True)
        (layer / f"file-{index}").write_text(str(index))
        layers.append(str(layer))
    return layers


def _mounts_at(target: str) -> list[list[str]]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [fields for fields in map(str.split, mountinfo) if fields[4] == target]


def _super_options(target: str) -> str:
    mounts = _mounts_at(target)
    assert mounts, f"{target} is not in /proc/self/mountinfo"
    return mounts[-1][-1]


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "merged"
    path.mkdir()
    yield str(path)
    while _mounts_at(str(path)):
        unmount(str(path))


def _upper_and_work(tmp_path) -> tuple[str, str]:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    return str(upper), str(work)


@pytest.mark.root
def test_mount_shows_every_one_of_200_layers(tmp_path, target):
    layers = _make_layers(tmp_path, LAYER_COUNT)
    upper, work = _upper_and_work(tmp_path)
    assert len(",".join(overlay_options([os.path.abspath(d) for d in layers]))) > 4096

    mount_overlay(target, layers, upper, work)

    assert sorted(os.listdir(target)) == sorted(f"file-{i}" for i in range(LAYER_COUNT))
    with open(os.path.join(target, "file-199")) as top:
        assert top.read() == "199"
    with open(os.path.join(target, "file-0")) as bottom:
        assert bottom.read() == "0"
    assert "lowerdir+=" in _super_options(target)


@pytest.mark.root
def test_upper_layer_wins_and_receives_writes(tmp_path, target):
    layers = _make_layers(tmp_path, 2)
    (tmp_path / "snapshots" / "1" / "shared").write_text("bottom")
    (tmp_path / "snapshots" / "2" / "shared").write_text("top")
    upper, work = _upper_and_work(tmp_path)

    mount_overlay(target, layers, upper, work)
    with open(os.path.join(target, "shared")) as shared:
        assert shared.read() == "top"
    with open(os.path.join(target, "new"), "w") as new:
        new.write("written")

    assert (tmp_path / "upper" / "new").read_text() == "written"
    assert not (tmp_path / "snapshots" / "2" / "new").exists()


@pytest.mark.root
def test_classic_mount_uses_relative_names_for_200_layers(tmp_path, target):
    layers = _make_layers(tmp_path, LAYER_COUNT)
    upper, work = _upper_and_work(tmp_path)
    cwd = os.getcwd()

    mount_overlay_classic(target, layers, upper, work)

    assert len(os.listdir(target)) == LAYER_COUNT
    assert os.getcwd() == cwd


@pytest.mark.root
def test_classic_mount_rejects_options_over_one_page(tmp_path, target):
    layers = _make_layers(tmp_path, LAYER_COUNT, name_width=30)

    with pytest.raises(StoreError) as info:
        mount_overlay_classic(target, layers)

    assert target in str(info.value)
    assert not _mounts_at(target)


@pytest.mark.root
def test_readonly_overlay_rejects_writes(tmp_path, target):
    layers = _make_layers(tmp_path, 3)
    upper, work = _upper_and_work(tmp_path)

    mount_overlay(target, layers, upper, work, readonly=True)

    with pytest.raises(OSError) as info:
        open(os.path.join(target, "new"), "w")
    assert info.value.errno == errno.EROFS


@pytest.mark.root
def test_single_lower_is_read_only_bind(tmp_path, target):
    layers = _make_layers(tmp_path, 1)

    mount_overlay(target, layers)

    assert os.listdir(target) == ["file-0"]
    with pytest.raises(OSError) as info:
        open(os.path.join(target, "new"), "w")
    assert info.value.errno == errno.EROFS
    assert "lowerdir" not in _super_options(target)


@pytest.mark.root
def test_missing_layer_error_names_target_and_leaves_nothing(tmp_path, target):
    layers = _make_layers(tmp_path, 2) + [str(tmp_path / "absent")]
    upper, work = _upper_and_work(tmp_path)

    with pytest.raises(StoreError) as info:
        mount_overlay(target, layers, upper, work)

    assert target in str(info.value)
    assert str(tmp_path / "absent") in str(info.value)
    assert not _mounts_at(target)


@pytest.mark.root
def test_unmount_ignores_plain_directory(tmp_path, target):
    mount_overlay(target, _make_layers(tmp_path, 2))

    unmount(target)
    unmount(target)

    assert not _mounts_at(target)
