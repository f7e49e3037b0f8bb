"""`lstore run --userns` through the CLI: mapped ids, idmapped layers, volumes and cleanup.

Needs root and Linux 5.19 or later. Container root is host uid 100000 (runner/spec.py's
default range). The store lives in a directory under /tmp with mode 0711, because
pytest's 0700 tmp_path is not searchable by the mapped root. Containers use
`--network none`, so they touch no host network. busybox comes from the real registry that
the `registry` fixture starts on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

pytestmark = [pytest.mark.root, pytest.mark.registry]

MAPPED_ROOT = 100000
MAP_LINE = ["0", "100000", "65536"]
OVERFLOW_ID = 65534  # how host ids outside the mapping appear inside the container
RUNTIMES = ["builtin", "runc"]
COMMAND_TIMEOUT = 60.0


class Cli:
    """Runs `python -m lstore.cli --root ROOT ...` as a user would."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lstore.cli", "--root", self.root, *args]
        return subprocess.run(command, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, f"lstore {' '.join(args)}: {done.returncode}\n" \
            f"stdout: {done.stdout}\nstderr: {done.stderr}"
        return done.stdout

    def container_dir(self, name: str) -> str:
        container_id = json.loads(self.ok("inspect", name))[0]["Id"]
        return os.path.join(self.root, "containers", container_id)


def _mounts_under(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(prefix)]


def _owners(directory: str) -> dict[str, tuple[int, int]]:
    """Map every path under `directory` to its (uid, gid), without following symlinks."""
    owners = {}
    for parent, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(parent, name))
            owners[os.path.join(parent, name)] = (st.st_uid, st.st_gid)
    return owners


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """A directory that the mapped root may search, removed with everything in it."""
    path = tempfile.mkdtemp(prefix="lstore-userns-")
    os.chmod(path, 0o711)
    yield path
    assert _mounts_under(path) == []
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def pulled(registry, base) -> tuple[str, str]:
    """A store root with busybox pulled, and busybox's reference."""
    root = os.path.join(base, "root")
    ref = registry.ref("busybox:latest")
    Cli(root).ok("pull", "--plain-http", ref)
    return root, ref


@pytest.fixture
def cli(pulled) -> Iterator[Cli]:
    """The CLI on the shared root; containers a test leaves behind are removed after it."""
    runner = Cli(pulled[0])
    yield runner
    leftover = runner.ok("ps", "-a", "-q").split()
    if leftover:
        runner.ok("rm", "-f", *leftover)


@pytest.fixture
def busybox(pulled) -> str:
    return pulled[1]


@pytest.fixture
def snapshots(pulled) -> str:
    return os.path.join(pulled[0], "snapshots")


def run(cli: Cli, image: str, *args: str, flags: tuple[str, ...] = ()) -> str:
    return cli.ok("run", "--network", "none", "--userns", *flags, image, *args)


# ---------------------------------------------------------------------------- identity


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_userns_root_is_mapped(cli: Cli, busybox: str, runtime: str) -> None:
    script = "id -u; id -g; cat /proc/self/uid_map; cat /proc/self/gid_map"
    lines = run(cli, busybox, "sh", "-c", script, flags=("--rm", "--runtime", runtime))

    uid, gid, uid_map, gid_map = lines.splitlines()
    assert uid == "0"
    assert gid == "0"
    assert uid_map.split() == MAP_LINE
    assert gid_map.split() == MAP_LINE


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_userns_image_files_owned_by_root(cli: Cli, busybox: str, runtime: str) -> None:
    script = "stat -c %u:%g /bin/busybox /etc/passwd /; touch /etc/x && echo touched"
    lines = run(cli, busybox, "sh", "-c", script, flags=("--rm", "--runtime", runtime))

    assert lines.splitlines() == ["0:0", "0:0", "0:0", "touched"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_userns_copy_up_keeps_layers(cli: Cli, busybox: str, snapshots: str,
                                     runtime: str) -> None:
    before = _owners(snapshots)
    run(cli, busybox, "sh", "-c", "touch /etc/x; echo more >> /etc/passwd; mkdir /made",
        flags=("--name", "copier", "--runtime", runtime))
    upper = os.path.join(cli.container_dir("copier"), "upper")

    for path in ("etc/x", "etc/passwd", "made"):
        assert os.stat(os.path.join(upper, path)).st_uid == MAPPED_ROOT
        assert os.stat(os.path.join(upper, path)).st_gid == MAPPED_ROOT
    assert _owners(snapshots) == before
    assert set(before.values()) == {(0, 0)}


# ---------------------------------------------------------------------------- mounts


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_userns_rm_leaves_no_mounts(cli: Cli, busybox: str, runtime: str) -> None:
    cli.ok("run", "-d", "--network", "none", "--userns", "--runtime", runtime,
           "--name", "mounted", busybox, "sleep", "60")
    path = cli.container_dir("mounted")
    mounted = _mounts_under(path)

    assert os.path.join(path, "bundle", "rootfs") in mounted
    assert os.path.join(path, "idmapped", "0") in mounted
    assert cli.ok("exec", "mounted", "sh", "-c", "id -u; touch /etc/x && echo ok") == "0\nok\n"
    cli.ok("rm", "-f", "mounted")
    assert _mounts_under(cli.root) == []
    assert not os.path.exists(path)


def test_userns_create_crash_cleaned_by_rm(cli: Cli, busybox: str) -> None:
    # A CLI that dies right after mounting the idmapped layers, before the overlay, leaves
    # a record and mounts that only `rm -f` can find and remove.
    script = (
        "import os, sys\n"
        "from lstore.store.store import Store\n"
        "from lstore.runner import containers, idmap, lifecycle\n"
        "from lstore.runner.options import RunOptions\n"
        "store = Store(sys.argv[1])\n"
        "image = store.lookup_image(sys.argv[2])\n"
        "options = RunOptions(image=sys.argv[2], name='crashed', userns=True)\n"
        "container = lifecycle._new_record(store, options, image, 15)\n"
        "containers.reserve(store.meta, container)\n"
        "os.makedirs(container.path)\n"
        "idmap.mount_layers(container.path, image.layer_dirs, lifecycle.USERNS_RANGE)\n"
        "os._exit(9)\n"
    )
    crashed = subprocess.run([sys.executable, "-c", script, cli.root, busybox],
                             capture_output=True, text=True, check=False,
                             timeout=COMMAND_TIMEOUT)
    assert crashed.returncode == 9, crashed.stderr
    path = cli.container_dir("crashed")
    assert _mounts_under(path) == [os.path.join(path, "idmapped", "0")]

    cli.ok("rm", "-f", "crashed")

    assert _mounts_under(cli.root) == []
    assert not os.path.exists(path)
    assert cli.ok("ps", "-a", "-q") == ""


# ---------------------------------------------------------------------------- volumes


def test_userns_named_volume_owned_by_mapped_root(cli: Cli, busybox: str) -> None:
    output = run(cli, busybox, "sh", "-c", "stat -c %u /data; touch /data/made && echo made",
                 flags=("--rm", "-v", "shifted:/data"))
    data = os.path.join(cli.root, "volumes", "shifted", "_data")

    assert output.splitlines() == ["0", "made"]
    assert os.stat(data).st_uid == MAPPED_ROOT
    assert os.stat(os.path.join(data, "made")).st_uid == MAPPED_ROOT
    cli.ok("volume", "rm", "shifted")


def test_userns_filled_volume_owned_by_mapped_root(cli: Cli, busybox: str) -> None:
    # The fill copies the image's /etc as the container sees it, with shifted owners.
    output = run(cli, busybox, "sh", "-c", "stat -c %u /etc/passwd; echo x >> /etc/passwd",
                 flags=("--rm", "-v", "filled:/etc"))
    data = os.path.join(cli.root, "volumes", "filled", "_data")

    assert output.splitlines() == ["0"]
    assert os.stat(data).st_uid == MAPPED_ROOT
    assert os.stat(os.path.join(data, "passwd")).st_uid == MAPPED_ROOT
    cli.ok("volume", "rm", "filled")


def test_userns_bind_mount_keeps_host_owner(cli: Cli, busybox: str, base: str) -> None:
    host_dir = tempfile.mkdtemp(dir=base)
    os.chmod(host_dir, 0o755)
    script = "stat -c %u /host; touch /host/made 2>/dev/null || echo denied"
    output = run(cli, busybox, "sh", "-c", script, flags=("--rm", "-v", f"{host_dir}:/host"))

    assert output.splitlines() == [str(OVERFLOW_ID), "denied"]
    assert os.stat(host_dir).st_uid == 0
    assert os.listdir(host_dir) == []


# ---------------------------------------------------------------------------- errors


def test_userns_unsearchable_root_fails_clearly(registry, base: str) -> None:
    private = os.path.join(base, "private")
    os.mkdir(private, 0o700)
    cli = Cli(os.path.join(private, "root"))
    ref = registry.ref("busybox:latest")
    cli.ok("pull", "--plain-http", ref)

    done = cli("run", "--rm", "--network", "none", "--userns", ref, "true")

    assert done.returncode == 125
    assert f"cannot search {private}; allow it with 'chmod o+x {private}'" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert cli.ok("ps", "-a", "-q") == ""
    assert os.listdir(os.path.join(cli.root, "containers")) == []
