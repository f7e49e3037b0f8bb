"""Real containers from a busybox root filesystem, run by the built-in runtime and by runc.

Every test mounts an overlay of the busybox tree at BUNDLE/rootfs, writes config.json with
build_spec and starts it, as the lifecycle code does. Nothing talks to the network.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass

import pytest

from lstore.errors import ContainerError
from lstore.runner import cgroups, devices, runtime
from lstore.runner.nsutil import MountOptions, parse_mount_options, resolve_in_root
from lstore.runner.options import RunOptions
from lstore.runner.spec import build_spec
from lstore.runner import runc
from lstore.store.overlay import mount_overlay, unmount
from lstore.tools.rootfs import busybox_applets, populate_busybox

BUSYBOX = "/usr/bin/busybox"
DOCKER_DEFAULT_CAPS = "00000000a80425fb"
RUNTIMES = ["builtin", "runc"]
USERNS_HOST_ID = 100000

pytestmark = pytest.mark.root


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; install it (see tools/setup.sh)")
    return path


def _build_base(path: str, owner: int = 0) -> None:
    os.makedirs(path)
    populate_busybox(path, _require(BUSYBOX), busybox_applets(BUSYBOX))
    with open(os.path.join(path, "etc", "passwd"), "a") as passwd:
        passwd.write("user:x:1000:1000:user:/home/user:/bin/sh\n")
    with open(os.path.join(path, "etc", "group"), "a") as group:
        group.write("user:x:1000:\n")
    if owner:
        for directory, dirs, files in os.walk(path):
            for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
                os.lchown(name, owner, owner)


@pytest.fixture(scope="module")
def base_rootfs(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("base") / "rootfs")
    _build_base(path)
    return path


@pytest.fixture(scope="module")
def userns_rootfs(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("base-userns") / "rootfs")
    _build_base(path, owner=USERNS_HOST_ID)
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


class Bundle:
    """An overlay root filesystem and config.json in a temporary bundle directory."""

    def __init__(self, tmp_path, base: str, owner: int = 0) -> None:
        self.dir = str(tmp_path / "bundle")
        self.rootfs = os.path.join(self.dir, "rootfs")
        self.upper = str(tmp_path / "upper")
        self.base = base
        self.container_id = "t" + uuid.uuid4().hex[:12]
        for path in (self.rootfs, self.upper, str(tmp_path / "work")):
            os.makedirs(path)
        os.chown(self.upper, owner, owner)
        mount_overlay(self.rootfs, [base], self.upper, str(tmp_path / "work"))
        self.out_path, self.err_path = str(tmp_path / "out"), str(tmp_path / "err")
        # runc would otherwise create cgroups at the root of each hierarchy.
        self.cgroups_path = cgroups.container_cgroup_path(
            self.container_id, None, cgroups.detect_layout()
        )

    def write_spec(
        self, opts: RunOptions, mounts: list | None = None, netns_path: str | None = None
    ) -> dict:
        spec = build_spec(
            {"config": {"Env": ["IMAGE_VAR=from-image"]}},
            opts,
            rootfs="rootfs",
            hostname="c0ffee",
            mounts=mounts or [],
            netns_path=netns_path,
            cgroups_path=self.cgroups_path,
            resources={},
            layer_dirs=[self.base],
        )
        with open(os.path.join(self.dir, "config.json"), "w") as config:
            json.dump(spec, config)
        return spec

    def start(self, runtime_name: str, cgroup=None) -> runtime.ContainerProcess:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            return runtime.start(
                self.dir,
                self.container_id,
                runtime=runtime_name,
                stdin=os.open(os.devnull, os.O_RDONLY),
                stdout=out.fileno(),
                stderr=err.fileno(),
                cgroup=cgroup,
            )

    def output(self, code: int) -> Result:
        with open(self.out_path) as out, open(self.err_path) as err:
            return Result(code, out.read(), err.read())

    def close(self) -> None:
        # runc keeps a stopped container's state until it is deleted.
        runc.delete(self.container_id, runtime.DEFAULT_RUNC_ROOT)
        unmount(self.rootfs)


@pytest.fixture
def bundle(tmp_path, base_rootfs):
    created = Bundle(tmp_path, base_rootfs)
    yield created
    created.close()


def run(bundle: Bundle, runtime_name: str, command: list[str], **options) -> Result:
    mounts = options.pop("mounts", None)
    netns_path = options.pop("netns_path", None)
    options.setdefault("network", "none")
    bundle.write_spec(RunOptions(image="busybox", command=command, **options), mounts, netns_path)
    process = bundle.start(runtime_name)
    return bundle.output(process.wait())


def sh(bundle: Bundle, runtime_name: str, script: str, **options) -> Result:
    return run(bundle, runtime_name, ["sh", "-c", script], **options)


# ---------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["nosuid", "noexec", "nodev"], MountOptions(0x2 | 0x8 | 0x4, [], "")),
        (["rbind", "ro", "rprivate"], MountOptions(0x1000 | 0x4000 | 0x1, [0x40000 | 0x4000], "")),
        (
            ["mode=755", "size=65536k", "strictatime"],
            MountOptions(0x1000000, [], "mode=755,size=65536k"),
        ),
        (["ro", "rw"], MountOptions(0, [], "")),
    ],
)
def test_mount_options_table(options, expected):
    assert parse_mount_options(options) == expected


@pytest.mark.parametrize(
    ("links", "path", "expected"),
    [
        ({}, "/etc/hosts", "etc/hosts"),
        ({"etc": "/host-etc"}, "/etc/hosts", "host-etc/hosts"),
        ({"etc": "../../../../"}, "/etc/hosts", "hosts"),
        ({"proc": "/"}, "/proc/../../x", "x"),
        ({"a": "b", "b": "/c"}, "/a/d", "c/d"),
    ],
)
def test_resolve_in_root_stays_inside(tmp_path, links, path, expected):
    for name, target in links.items():
        os.symlink(target, tmp_path / name)

    assert resolve_in_root(str(tmp_path), path) == os.path.join(tmp_path, expected)


def test_resolve_in_root_rejects_symlink_loop(tmp_path):
    os.symlink("/loop", tmp_path / "loop")

    with pytest.raises(OSError):
        resolve_in_root(str(tmp_path), "/loop/x")


# ---------------------------------------------------------------------------- containers


@pytest.mark.parametrize("runtime_name", RUNTIMES)
@pytest.mark.parametrize(
    ("command", "expected_code"),
    [(["true"], 0), (["sh", "-c", "exit 3"], 3), (["nosuch"], 127), (["/etc/passwd"], 126)],
)
def test_exit_codes(bundle, runtime_name, command, expected_code):
    assert run(bundle, runtime_name, command).code == expected_code


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["nosuch"], "lstore: exec nosuch: not found in $PATH"),
        (["/no/such"], "lstore: exec /no/such: no such file or directory"),
        (["/etc/passwd"], "lstore: exec /etc/passwd: permission denied"),
    ],
)
def test_exec_failure_message(bundle, command, message):
    result = run(bundle, "builtin", command)

    assert result.err.strip() == message


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_environment_reaches_process(bundle, runtime_name):
    result = run(bundle, runtime_name, ["env"], env=["FLAG_VAR=from-flag"])
    env = dict(line.split("=", 1) for line in result.out.splitlines())

    assert env["IMAGE_VAR"] == "from-image"
    assert env["FLAG_VAR"] == "from-flag"
    assert env["HOSTNAME"] == "c0ffee"
    assert env["HOME"] == "/root"
    assert env["PATH"].startswith("/usr/local/sbin")


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_working_dir_is_created(bundle, runtime_name):
    result = sh(bundle, runtime_name, "pwd; stat -c %u:%g .", workdir="/srv/app", user="1000:1000")

    assert result.out.split() == ["/srv/app", "0:0"]


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_user_ids(bundle, runtime_name):
    result = sh(bundle, runtime_name, "id -u; id -g; id -G", user="user")

    assert result.out.split() == ["1000", "1000", "1000"]


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_hostname_and_pid_one(bundle, runtime_name):
    result = sh(bundle, runtime_name, "hostname; echo $$")

    assert result.out.split() == ["c0ffee", "1"]


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_only_container_processes_visible(bundle, runtime_name):
    result = sh(bundle, runtime_name, "ps -o pid,args; true")
    rows = result.out.splitlines()[1:]

    assert len(rows) == 2
    assert rows[0].split()[0] == "1"


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_docker_default_capabilities(bundle, runtime_name):
    result = run(bundle, runtime_name, ["cat", "/proc/self/status"])
    status = dict(line.split(":\t", 1) for line in result.out.splitlines() if ":\t" in line)

    assert status["CapEff"].strip() == DOCKER_DEFAULT_CAPS
    assert status["CapBnd"].strip() == DOCKER_DEFAULT_CAPS
    assert status["CapInh"].strip() == "0" * 16
    assert status["NoNewPrivs"].strip() == "1"


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_non_root_user_has_no_effective_caps(bundle, runtime_name):
    result = sh(bundle, runtime_name, "grep -E 'CapEff|CapBnd' /proc/self/status", user="1000")

    assert result.out.split() == ["CapEff:", "0" * 16, "CapBnd:", DOCKER_DEFAULT_CAPS]


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_read_only_rootfs_blocks_writes(bundle, runtime_name):
    result = sh(bundle, runtime_name, "touch /new-file", read_only=True)

    assert result.code != 0
    assert "Read-only file system" in result.err
    assert not os.path.exists(os.path.join(bundle.upper, "new-file"))


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_masked_and_readonly_paths(bundle, runtime_name):
    result = sh(
        bundle,
        runtime_name,
        "wc -c < /proc/keys; ls /sys/firmware | wc -l; echo 1 > /proc/sys/vm/drop_caches",
    )

    with open("/proc/keys") as host_keys:
        assert host_keys.read()
    assert os.listdir("/sys/firmware")
    assert result.out.split() == ["0", "0"]
    assert "Read-only file system" in result.err


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_bind_volume_is_visible(bundle, tmp_path, runtime_name):
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "greeting").write_text("hello from the host")
    mounts = [
        {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "ro"]}
    ]

    result = sh(bundle, runtime_name, "cat /data/greeting; touch /data/x", mounts=mounts)

    assert result.out == "hello from the host"
    assert "Read-only file system" in result.err


def test_mount_target_symlink_cannot_escape(tmp_path, base_rootfs):
    outside = tmp_path / "outside"
    outside.mkdir()
    bundle = Bundle(tmp_path, base_rootfs)
    try:
        os.symlink(str(outside), os.path.join(bundle.rootfs, "escape"))
        mounts = [{"destination": "/escape/tmp", "type": "tmpfs", "source": "tmpfs", "options": []}]
        result = sh(bundle, "builtin", "echo x > /escape/tmp/file", mounts=mounts)
    finally:
        bundle.close()

    assert result.code == 0
    assert os.listdir(outside) == []


@pytest.fixture
def netns():
    ip = _require("ip")
    name = "lstore-test-" + uuid.uuid4().hex[:8]
    subprocess.run([ip, "netns", "add", name], check=True)
    yield f"/run/netns/{name}"
    subprocess.run([ip, "netns", "delete", name], check=True)


@pytest.mark.net
@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_network_namespace_by_path_is_joined(bundle, netns, runtime_name):
    result = run(
        bundle,
        runtime_name,
        ["stat", "-L", "-c", "%i", "/proc/self/ns/net"],
        network="bridge",
        netns_path=netns,
    )

    assert int(result.out) == os.stat(netns).st_ino


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_network_none_has_only_loopback(bundle, runtime_name):
    result = run(bundle, runtime_name, ["ls", "/sys/class/net"])
    flags = run(bundle, runtime_name, ["cat", "/sys/class/net/lo/flags"])

    assert result.out.split() == ["lo"]
    # IFF_UP: docker's none mode has its loopback up.
    assert int(flags.out, 16) & 0x1


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_signal_kills_container(bundle, runtime_name):
    bundle.write_spec(RunOptions(command=["sleep", "60"], network="none"))
    process = bundle.start(runtime_name)
    assert process.poll() is None

    process.signal(signal.SIGKILL)

    assert process.wait() == 128 + signal.SIGKILL
    assert process.poll() == 128 + signal.SIGKILL


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_exec_joins_running_container(bundle, tmp_path, runtime_name):
    spec = bundle.write_spec(RunOptions(command=["sleep", "60"], network="none"))
    container = bundle.start(runtime_name)
    process = dict(
        spec["process"],
        args=["sh", "-c", "hostname; ps -o args; id -u; pwd"],
        user={"uid": 1000, "gid": 1000},
        cwd="/tmp",
    )
    try:
        with open(tmp_path / "exec-out", "wb") as out:
            code = runtime.exec_process(container.pid, process, stdout=out.fileno()).wait()
    finally:
        container.signal(signal.SIGKILL)
        container.wait()
    lines = (tmp_path / "exec-out").read_text().splitlines()

    assert code == 0
    assert lines[0] == "c0ffee"
    assert "sleep 60" in lines[2]
    assert lines[-2:] == ["1000", "/tmp"]


def test_exec_into_missing_container_fails():
    with pytest.raises(ContainerError):
        runtime.exec_process(2**22 + 1, {"args": ["true"], "cwd": "/"})


def test_setup_error_raises_and_leaves_no_process(bundle, tmp_path):
    mounts = [
        {
            "destination": "/data",
            "type": "bind",
            "source": str(tmp_path / "absent"),
            "options": ["rbind"],
        }
    ]
    bundle.write_spec(RunOptions(command=["true"], network="none"), mounts)
    children_before = _children()

    with pytest.raises(ContainerError) as info:
        bundle.start("builtin")

    assert str(tmp_path / "absent") in str(info.value)
    assert _children() == children_before


def _children() -> set[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as children:
        return {int(pid) for pid in children.read().split()}


def test_cgroup_is_joined_before_exec(bundle):
    cgroup = cgroups.create(bundle.container_id, None, {})
    try:
        bundle.write_spec(RunOptions(command=["cat", "/proc/self/cgroup"], network="none"))
        code = bundle.start("builtin", cgroup=cgroup).wait()
    finally:
        cgroup.destroy()
    memory = [line for line in bundle.output(code).out.splitlines() if ":memory:" in line]

    assert len(memory) == 1
    assert memory[0].split(":", 2)[2] == cgroup.spec_path


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"allow": False, "access": "rwm"}, ("devices.deny", "a rwm")),
        ({"allow": True, "type": "c", "access": "m"}, ("devices.allow", "c *:* m")),
        (
            {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            ("devices.allow", "c 1:3 rwm"),
        ),
        (
            {"allow": True, "type": "c", "major": 136, "access": "rw"},
            ("devices.allow", "c 136:* rw"),
        ),
    ],
)
def test_device_rule_lines_table(rule, expected):
    assert devices.rule_lines([rule]) == [expected]


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_device_outside_allowlist_is_unusable(bundle, runtime_name):
    # /dev/loop-control (10:237) opens for root on the host without capabilities, and
    # neither docker's nor runc's allowlist includes it.
    os.close(os.open("/dev/loop-control", os.O_RDWR))
    script = (
        "mknod /tmp/loop-control c 10 237 && (: <> /tmp/loop-control) && echo opened; "
        "head -c 1 /dev/zero | wc -c"
    )

    result = sh(bundle, runtime_name, script)

    assert "Operation not permitted" in result.err
    assert result.out.split() == ["1"]


def test_device_cgroup_removed_after_exit(bundle):
    bundle.write_spec(RunOptions(command=["true"], network="none"))
    directory = os.path.join("/sys/fs/cgroup/devices", bundle.cgroups_path.lstrip("/"))

    process = bundle.start("builtin")
    assert os.path.isdir(directory)
    process.wait()

    assert not os.path.exists(directory)


@pytest.mark.parametrize("runtime_name", RUNTIMES)
def test_user_namespace_maps_root(userns_rootfs, runtime_name):
    # Container root (host uid 100000) must be able to search every directory above the
    # bundle, and pytest's temporary directories are private to host root.
    work = pathlib.Path(tempfile.mkdtemp(prefix="lstore-userns-"))
    os.chmod(work, 0o711)
    bundle = Bundle(work, userns_rootfs, owner=USERNS_HOST_ID)
    try:
        result = sh(bundle, runtime_name, "cat /proc/self/uid_map; id -u; touch /made", userns=True)
        made = os.stat(os.path.join(bundle.upper, "made"))
    finally:
        bundle.close()
        shutil.rmtree(work)

    assert result.out.split() == ["0", str(USERNS_HOST_ID), "65536", "0"]
    assert made.st_uid == USERNS_HOST_ID


def test_terminal_comes_from_container_devpts(bundle):
    script = "tty; echo $TERM; cut -d ' ' -f 7 /proc/self/stat; stty size; ls -l /dev/console"
    bundle.write_spec(RunOptions(command=["sh", "-c", script], network="none", tty=True))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        process = runtime.start(bundle.dir, bundle.container_id, stdin=null, stdout=null,
                                stderr=null, console_size=(33, 111))
    finally:
        os.close(null)
    assert process.console is not None
    try:
        code = process.wait()
        output = _read_all(process.console)
    finally:
        os.close(process.console)

    assert code == 0
    lines = output.splitlines()
    assert lines[:2] == ["/dev/pts/0", "xterm"]
    assert int(lines[2]) != 0  # tty_nr: the process has a controlling terminal
    assert lines[3] == "33 111"
    assert lines[4].split()[4:6] == ["136,", "0"]  # /dev/console is /dev/pts/0


def _read_all(master: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO once every slave descriptor is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
