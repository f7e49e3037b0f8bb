"""Volume, bind and tmpfs mounts: parsing, filling named volumes from the image, removal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lstore.errors import InvalidArgumentError, NotFoundError
from lstore.runner import volumes
from lstore.runner.volumes import VolumeSpec
from lstore.store.meta import Meta

VOLUME_CASES = [
    ("data:/srv/data", VolumeSpec("volume", "data", "/srv/data", ())),
    ("data:/srv/data:ro", VolumeSpec("volume", "data", "/srv/data", ("ro",))),
    ("/tmp:/mnt/host:rw", VolumeSpec("bind", "/tmp", "/mnt/host", ("rw",))),
    ("/var/lib/x", VolumeSpec("volume", None, "/var/lib/x", ())),
    ("cache:/c/:nocopy", VolumeSpec("volume", "cache", "/c", ("nocopy",))),
    ("/tmp:/m:ro,rslave", VolumeSpec("bind", "/tmp", "/m", ("ro", "rslave"))),
]


@pytest.mark.parametrize(("spec", "expected"), VOLUME_CASES)
def test_parse_volume(spec: str, expected: VolumeSpec) -> None:
    assert volumes.parse_volume(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data:relative", "must be absolute"),
        ("data:/", "cannot mount over /"),
        ("./rel:/x", "invalid volume name"),
        ("a:/x", "invalid volume name"),
        ("data:/x:rx", "invalid volume option rx"),
        ("data:/x:ro,rw", "invalid volume option"),
        ("a:b:c:d", "expected SOURCE:/PATH"),
    ],
)
def test_parse_volume_rejects(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        volumes.parse_volume(spec)


TMPFS_CASES = [
    ("/run", ["nosuid", "nodev", "noexec"]),
    ("/run:size=64m,mode=1777", ["nosuid", "nodev", "noexec", "size=64m", "mode=1777"]),
    ("/scratch:exec", ["nosuid", "nodev", "exec"]),
    ("/x:suid,dev,noexec", ["suid", "dev", "noexec"]),
]


@pytest.mark.parametrize(("spec", "options"), TMPFS_CASES)
def test_parse_tmpfs(spec: str, options: list[str]) -> None:
    mount = volumes.parse_tmpfs(spec)

    assert mount["type"] == "tmpfs"
    assert mount["destination"] == spec.split(":", 1)[0]
    assert mount["options"] == options


@pytest.mark.parametrize("spec", ["/run:bogus", "/run:size", "relative", "/run:uid=0,shell=x"])
def test_parse_tmpfs_rejects(spec: str) -> None:
    with pytest.raises(InvalidArgumentError):
        volumes.parse_tmpfs(spec)


@pytest.fixture
def meta(tmp_path: Path) -> Meta:
    return Meta(str(tmp_path / "meta"))


@pytest.fixture
def volumes_dir(tmp_path: Path) -> str:
    path = tmp_path / "volumes"
    path.mkdir()
    return str(path)


def test_bind_source_must_exist(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    missing = tmp_path / "absent"

    with pytest.raises(NotFoundError, match=str(missing)) as caught:
        volumes.prepare_mounts(meta, volumes_dir, [f"{missing}:/x"], [], str(tmp_path))

    assert caught.value.path == str(missing)


def test_bind_mount_options(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    mounts = volumes.prepare_mounts(meta, volumes_dir, [f"{tmp_path}:/host:ro"], ["/run"],
                                    str(tmp_path))  # fmt: skip

    assert mounts[0] == {"destination": "/host", "type": "bind", "source": str(tmp_path),
                         "options": ["rbind", "ro"]}  # fmt: skip
    assert mounts[1]["destination"] == "/run"


def test_duplicate_destination_is_rejected(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="duplicate mount point /x"):
        volumes.prepare_mounts(meta, volumes_dir, ["a1:/x"], ["/x"], str(tmp_path))


def make_image_rootfs(root: Path) -> None:
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha")
    (data / "sub" / "b.txt").write_text("beta")
    os.link(data / "a.txt", data / "a-link.txt")
    os.symlink("a.txt", data / "sym")
    os.mkfifo(data / "fifo")
    os.chown(data / "a.txt", 1234, 5678)
    os.chmod(data / "a.txt", 0o640)
    os.setxattr(data / "sub" / "b.txt", "user.origin", b"image")
    os.utime(data / "sub" / "b.txt", ns=(1_000_000_000, 2_000_000_000))
    os.chown(data, 42, 43)
    os.chmod(data, 0o750)


@pytest.mark.root
def test_named_volume_filled_from_image(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    make_image_rootfs(rootfs)

    mounts = volumes.prepare_mounts(meta, volumes_dir, ["vol1:/data"], [], str(rootfs))
    data = Path(mounts[0]["source"])

    assert data == Path(volumes_dir, "vol1", "_data")
    assert mounts[0]["options"] == ["rbind", "rw"]
    assert (data / "a.txt").read_text() == "alpha"
    assert (data / "sub" / "b.txt").read_text() == "beta"
    assert os.stat(data / "a.txt").st_ino == os.stat(data / "a-link.txt").st_ino
    assert os.readlink(data / "sym") == "a.txt"
    assert stat.S_ISFIFO(os.lstat(data / "fifo").st_mode)
    a_stat = os.stat(data / "a.txt")
    assert (a_stat.st_uid, a_stat.st_gid, stat.S_IMODE(a_stat.st_mode)) == (1234, 5678, 0o640)
    assert os.getxattr(data / "sub" / "b.txt", "user.origin") == b"image"
    assert os.stat(data / "sub" / "b.txt").st_mtime_ns == 2_000_000_000
    root_stat = os.stat(data)
    assert (root_stat.st_uid, root_stat.st_gid, stat.S_IMODE(root_stat.st_mode)) == (42, 43, 0o750)
    assert volumes.list_volumes(meta)[0]["populated"] is True


@pytest.mark.root
def test_volume_is_filled_only_once(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    make_image_rootfs(rootfs)
    volumes.prepare_mounts(meta, volumes_dir, ["vol1:/data"], [], str(rootfs))
    data = Path(volumes_dir, "vol1", "_data")
    (data / "a.txt").unlink()
    (rootfs / "data" / "late.txt").write_text("late")

    volumes.prepare_mounts(meta, volumes_dir, ["vol1:/data"], [], str(rootfs))

    assert not (data / "a.txt").exists()
    assert not (data / "late.txt").exists()


def test_nocopy_and_missing_path_leave_volume_empty(
    meta: Meta, volumes_dir: str, tmp_path: Path
) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "data").mkdir(parents=True)
    (rootfs / "data" / "f").write_text("x")

    volumes.prepare_mounts(meta, volumes_dir, ["v1:/data:nocopy", "v2:/absent"], [], str(rootfs))

    assert os.listdir(Path(volumes_dir, "v1", "_data")) == []
    assert os.listdir(Path(volumes_dir, "v2", "_data")) == []


def test_image_symlinks_resolve_inside_rootfs(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "marker").write_text("image etc")
    (rootfs / "run" / "app").mkdir(parents=True)
    (rootfs / "run" / "app" / "pid").write_text("1")
    (rootfs / "var").mkdir()
    os.symlink("/etc", rootfs / "escape")  # would be the host's /etc if followed naively
    os.symlink("../run", rootfs / "var" / "run")

    volumes.prepare_mounts(meta, volumes_dir, ["e1:/escape", "r1:/var/run/app"], [], str(rootfs))

    assert os.listdir(Path(volumes_dir, "e1", "_data")) == ["marker"]
    assert Path(volumes_dir, "r1", "_data", "pid").read_text() == "1"


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


@pytest.mark.root
def test_layered_fill_applies_whiteouts(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    lower, upper = tmp_path / "l1", tmp_path / "l2"
    for path, text in [("data/old", "o"), ("data/keep", "k"), ("data/dir/x", "x"),
                       ("data/replaced", "lower")]:  # fmt: skip
        (lower / path).parent.mkdir(parents=True, exist_ok=True)
        (lower / path).write_text(text)
    (upper / "data" / "dir").mkdir(parents=True)
    whiteout(upper / "data" / "old")
    (upper / "data" / "new").write_text("n")
    (upper / "data" / "replaced").write_text("upper")
    os.setxattr(upper / "data" / "dir", "trusted.overlay.opaque", b"y")
    (upper / "data" / "dir" / "y").write_text("y")

    volumes.prepare_mounts(meta, volumes_dir, ["v1:/data"], [], [str(lower), str(upper)])
    data = Path(volumes_dir, "v1", "_data")

    assert sorted(os.listdir(data)) == ["dir", "keep", "new", "replaced"]
    assert os.listdir(data / "dir") == ["y"]
    assert (data / "replaced").read_text() == "upper"
    assert "trusted.overlay.opaque" not in os.listxattr(data / "dir")


@pytest.mark.root
def test_layered_fill_stops_at_whiteout_dir(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    lower, upper = tmp_path / "l1", tmp_path / "l2"
    (lower / "data").mkdir(parents=True)
    (lower / "data" / "f").write_text("f")
    upper.mkdir()
    whiteout(upper / "data")

    volumes.prepare_mounts(meta, volumes_dir, ["v1:/data"], [], [str(lower), str(upper)])

    assert os.listdir(Path(volumes_dir, "v1", "_data")) == []


def test_anonymous_volume_gets_random_name(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    mounts = volumes.prepare_mounts(meta, volumes_dir, ["/cache"], [], str(tmp_path))

    records = volumes.list_volumes(meta)
    assert len(records) == 1
    assert records[0]["anonymous"] is True
    assert len(records[0]["name"]) == 64
    assert mounts[0]["source"] == records[0]["path"]


def test_remove_volume(meta: Meta, volumes_dir: str, tmp_path: Path) -> None:
    volumes.prepare_mounts(meta, volumes_dir, ["keep1:/a", "gone1:/b"], [], str(tmp_path))

    with pytest.raises(InvalidArgumentError, match="in use"):
        volumes.remove_volume(meta, volumes_dir, "keep1", in_use={"keep1"})
    volumes.remove_volume(meta, volumes_dir, "gone1", in_use={"keep1"})

    assert [v["name"] for v in volumes.list_volumes(meta)] == ["keep1"]
    assert not Path(volumes_dir, "gone1").exists()
    assert Path(volumes_dir, "keep1", "_data").is_dir()
    with pytest.raises(NotFoundError, match="volume gone1 not found"):
        volumes.remove_volume(meta, volumes_dir, "gone1")
