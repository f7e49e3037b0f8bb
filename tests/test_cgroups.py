"""Cgroup drivers: layout detection, resource files, OOM accounting and teardown.

Pure tests use hand-built layouts and a directory tree that imitates the kernel's files.
The `real_layout` tests create cgroups on the host under this process's own cgroup; each
runs once per cgroup version and skips, with the reason, when the host uses the other one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lstore.errors import ContainerError, InvalidArgumentError
from lstore.runner import cgroups
from lstore.runner.cgroups import Hierarchy, Layout

MiB = 1 << 20

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
4:memory:/jobs/a1
2:cpu,cpuacct:/
0::/
"""


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def detect(tmp_path: Path, mountinfo: str, proc_cgroup: str) -> Layout:
    write(tmp_path / "mountinfo", mountinfo)
    write(tmp_path / "cgroup", proc_cgroup)
    return cgroups.detect_layout(str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))


def v1_layout(owns: dict[str, str]) -> Layout:
    hierarchies = {
        controller: Hierarchy(1, frozenset([controller]), f"/cg/{controller}", "/", own)
        for controller, own in owns.items()
    }
    return Layout(1, hierarchies)


# ---------------------------------------------------------------------------- layout


def test_detect_hybrid_host_uses_v1(tmp_path: Path) -> None:
    layout = detect(tmp_path, HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP)

    assert layout.version == 1
    assert layout.hierarchies["memory"].own == "/jobs/a1"
    assert layout.hierarchies["cpu"].mountpoint == "/sys/fs/cgroup/cpu,cpuacct"
    assert layout.hierarchies["cpuacct"] is layout.hierarchies["cpu"]
    assert len(layout.unique()) == 4


def test_detect_unified_host_uses_v2(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    write(mount / "user.slice" / "cgroup.controllers", "cpuset cpu io memory pids\n")
    mountinfo = f"41 31 0:38 / {mount} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"

    layout = detect(tmp_path, mountinfo, "0::/user.slice\n")

    assert layout.version == 2
    assert set(layout.hierarchies) == {"memory", "cpu", "pids", "io"}
    assert layout.hierarchies["memory"].own == "/user.slice"


def test_detect_rejects_empty_cgroup2(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    write(mount / "cgroup.controllers", "hugetlb\n")
    mountinfo = f"41 31 0:38 / {mount} rw,relatime - cgroup2 cgroup2 rw\n"

    with pytest.raises(cgroups.UnsupportedError, match="memory controller"):
        detect(tmp_path, mountinfo, "0::/\n")


def test_detect_maps_bind_mounted_subtree(tmp_path: Path) -> None:
    # Inside a container without a cgroup namespace the mount root is the container's path.
    mountinfo = (
        "35 31 0:32 /docker/c1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "32 31 0:29 /docker/c1 /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n"
        "39 31 0:36 /docker/c1 /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    )
    proc = "8:pids:/docker/c1\n4:memory:/docker/c1/app\n2:cpu,cpuacct:/docker/c1\n"

    layout = detect(tmp_path, mountinfo, proc)
    memory = layout.hierarchies["memory"]

    assert memory.directory("/docker/c1/app/lstore/x") == "/sys/fs/cgroup/memory/app/lstore/x"


# ---------------------------------------------------------------------------- paths

PATH_CASES = [
    # (own paths per controller, parent, expected path or error)
    ({"memory": "/jobs/a1", "cpu": "/"}, None, "/jobs/a1/lstore/c1"),
    ({"memory": "/jobs/a1", "cpu": "/"}, "batch", "/jobs/a1/batch/c1"),
    ({"memory": "/jobs/a1", "cpu": "/"}, "/jobs/a1/batch", "/jobs/a1/batch/c1"),
    ({"memory": "/jobs/a1", "cpu": "/"}, "/jobs/other", ContainerError),
    ({"memory": "/jobs/a1", "cpu": "/"}, "/", ContainerError),
    ({"memory": "/jobs/a1", "cpu": "/"}, "../escape", InvalidArgumentError),
    ({"memory": "/jobs/a1", "cpu": "/jobs/b2"}, None, ContainerError),
    ({"memory": "/", "cpu": "/"}, None, "/lstore/c1"),
]


@pytest.mark.parametrize(("owns", "parent", "expected"), PATH_CASES)
def test_container_path_stays_in_own_subtree(
    owns: dict[str, str], parent: str | None, expected: object
) -> None:
    layout = v1_layout(owns)

    if isinstance(expected, str):
        assert cgroups.container_cgroup_path("c1", parent, layout) == expected
    else:
        with pytest.raises(expected):  # type: ignore[call-overload]
            cgroups.container_cgroup_path("c1", parent, layout)


def test_container_path_rejects_bad_name() -> None:
    with pytest.raises(InvalidArgumentError, match="invalid cgroup name"):
        cgroups.container_cgroup_path("a/b", None, v1_layout({"memory": "/"}))


def test_create_outside_subtree_creates_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "memory"
    (mount / "jobs" / "a1").mkdir(parents=True)
    layout = Layout(1, {"memory": Hierarchy(1, frozenset({"memory"}), str(mount), "/", "/jobs/a1")})

    with pytest.raises(ContainerError, match="outside this process's cgroup /jobs/a1"):
        cgroups.create("c1", "/jobs/b2", {}, layout=layout)

    assert sorted(os.listdir(mount / "jobs")) == ["a1"]


# ---------------------------------------------------------------------------- resources

OPTION_CASES = [
    ({"memory": 32 * MiB}, {"memory": {"limit": 32 * MiB}}),
    ({"cpus": 1.5}, {"cpu": {"quota": 150_000, "period": 100_000}}),
    ({"cpu_quota": 20_000, "cpu_period": 50_000}, {"cpu": {"quota": 20_000, "period": 50_000}}),
    ({"cpu_quota": 20_000}, {"cpu": {"quota": 20_000, "period": 100_000}}),
    ({"pids_limit": 64}, {"pids": {"limit": 64}}),
    ({}, {}),
]


@pytest.mark.parametrize(("options", "expected"), OPTION_CASES)
def test_resources_from_options(options: dict, expected: dict) -> None:
    assert cgroups.resources_from_options(**options) == expected


def test_resources_reject_cpus_with_quota() -> None:
    with pytest.raises(InvalidArgumentError, match="--cpus cannot be combined"):
        cgroups.resources_from_options(cpus=1.0, cpu_quota=1000)


def test_device_rate_reads_device_numbers() -> None:
    device = _block_device()
    st = os.stat(device)

    entry = cgroups.parse_device_rate(f"{device}:1mb")

    assert entry == {"major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev), "rate": MiB}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/dev/null:1mb", "not a block device"),
        ("/dev/nonexistent:1mb", "not found"),
        ("1mb", "expected DEVICE:RATE"),
    ],
)
def test_device_rate_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        cgroups.parse_device_rate(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("64k", 64 << 10), ("1.5mb", 3 << 19), ("2G", 2 << 30), ("1MiB", MiB)],
)
def test_parse_bytes(text: str, size: int) -> None:
    assert cgroups.parse_bytes(text) == size


def _block_device() -> str:
    for name in sorted(os.listdir("/sys/block")):
        if os.path.exists(f"/dev/{name}") and not name.startswith(("loop", "ram")):
            return f"/dev/{name}"
    raise AssertionError("this test needs a block device under /dev (none found in /sys/block)")


# ---------------------------------------------------------------------------- v2 files


V2_CONTAINER_FILES = [
    "cgroup.procs",
    "cgroup.kill",
    "cgroup.subtree_control",
    "memory.max",
    "memory.swap.max",
    "memory.current",
    "memory.events",
    "cpu.max",
    "cpu.stat",
    "pids.max",
    "pids.current",
    "io.max",
    "io.stat",
]


@pytest.fixture
def v2_tree(tmp_path: Path) -> tuple[Path, Layout]:
    """Imitate a cgroup2 mount where this process sits at /user.slice/job (files, no kernel)."""
    mount = tmp_path / "cgroup2"
    hierarchy = Hierarchy(2, frozenset(cgroups.V2_CONTROLLERS), str(mount), "/", "/user.slice/job")
    for directory in ("user.slice/job", "user.slice/job/lstore", "user.slice/job/lstore/c1"):
        for name in V2_CONTAINER_FILES:
            write(mount / directory / name)
    return mount, Layout(2, {c: hierarchy for c in cgroups.V2_CONTROLLERS})


def test_v2_create_writes_resource_files(v2_tree: tuple[Path, Layout]) -> None:
    mount, layout = v2_tree
    resources = cgroups.resources_from_options(memory=32 * MiB, cpus=0.5, pids_limit=64)
    resources["blockIO"] = {"throttleWriteBpsDevice": [{"major": 254, "minor": 0, "rate": MiB}]}

    cgroup = cgroups.create("c1", None, resources, layout=layout)
    leaf = mount / "user.slice/job/lstore/c1"

    assert cgroup.version == 2
    assert cgroup.spec_path == "/user.slice/job/lstore/c1"
    assert (leaf / "memory.max").read_text() == str(32 * MiB)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "pids.max").read_text() == "64"
    assert (leaf / "io.max").read_text() == f"254:0 wbps={MiB}"


def test_v2_create_delegates_controllers(v2_tree: tuple[Path, Layout]) -> None:
    mount, layout = v2_tree

    cgroups.create("c1", None, {}, layout=layout)

    for directory in ("user.slice/job", "user.slice/job/lstore"):
        control = (mount / directory / "cgroup.subtree_control").read_text()
        assert control == "+memory +cpu +pids +io"
    assert (mount / "user.slice/job/lstore/c1/cgroup.subtree_control").read_text() == ""


def test_v2_oom_reads_own_memory_events(v2_tree: tuple[Path, Layout]) -> None:
    mount, layout = v2_tree
    write(mount / "user.slice/job/lstore/memory.events", "oom 4\noom_kill 4\n")
    cgroup = cgroups.create("c1", None, {}, layout=layout)
    events = mount / "user.slice/job/lstore/c1/memory.events"

    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
    assert not cgroup.oom_killed()

    events.write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert cgroup.oom_killed()
    assert cgroup.oom_kill_count() == 1


def test_v2_stats_parse_kernel_files(v2_tree: tuple[Path, Layout]) -> None:
    mount, layout = v2_tree
    cgroup = cgroups.create("c1", None, {"memory": {"limit": 64 * MiB}}, layout=layout)
    leaf = mount / "user.slice/job/lstore/c1"
    write(leaf / "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    write(leaf / "memory.current", "4096\n")
    write(leaf / "pids.current", "3\n")
    write(leaf / "io.stat", "254:0 rbytes=100 wbytes=20 rios=1 wios=1\n8:0 rbytes=1 wbytes=2\n")

    stats = cgroup.stats()

    assert stats["cpu_usage_ns"] == 1_500_000
    assert stats["memory_bytes"] == 4096
    assert stats["memory_limit_bytes"] == 64 * MiB
    assert stats["pids"] == 3
    assert stats["io_read_bytes"] == 101
    assert stats["io_write_bytes"] == 22


def test_v2_missing_controller_file_fails(v2_tree: tuple[Path, Layout]) -> None:
    mount, layout = v2_tree
    (mount / "user.slice/job/lstore/c1/pids.max").unlink()

    with pytest.raises(ContainerError, match="pids.max"):
        cgroups.create("c1", None, {"pids": {"limit": 5}}, layout=layout)


def test_record_round_trip(v2_tree: tuple[Path, Layout]) -> None:
    _mount, layout = v2_tree
    cgroup = cgroups.create("c1", None, {}, layout=layout)

    reopened = cgroups.open(cgroup.to_record())

    assert type(reopened) is type(cgroup)
    assert reopened.to_record() == cgroup.to_record()


# ---------------------------------------------------------------------------- real host


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def real_layout(request: pytest.FixtureRequest) -> Layout:
    if os.geteuid() != 0:
        pytest.fail("the real cgroup tests need root")
    layout = cgroups.detect_layout()
    if layout.version != request.param:
        pytest.skip(
            f"this host uses cgroup v{layout.version}; the v{request.param} tests need a "
            f"cgroup v{request.param} hierarchy with the memory controller"
        )
    return layout


@pytest.fixture
def make_cgroup(real_layout: Layout):
    made: list[cgroups.Cgroup] = []

    def make(resources: dict) -> cgroups.Cgroup:
        cgroup = cgroups.create(
            f"test-{uuid.uuid4().hex[:12]}", None, resources, layout=real_layout
        )
        made.append(cgroup)
        return cgroup

    yield make
    for cgroup in made:
        cgroup.destroy()


def start_in(cgroup: cgroups.Cgroup, code: str) -> subprocess.Popen:
    """Start python running `code` once it has been moved into `cgroup`."""
    gate_read, gate_write = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.read(0, 1)\n{code}"],
        stdin=gate_read,
        stdout=subprocess.PIPE,
        text=True,
    )
    os.close(gate_read)
    cgroup.add(child.pid)
    os.write(gate_write, b"x")
    os.close(gate_write)
    return child


@pytest.mark.root
def test_memory_limit_oom_kills_and_counts(make_cgroup) -> None:
    cgroup = make_cgroup({"memory": {"limit": 32 * MiB}})

    # Multiplying bytes writes every page, so all 100 MiB are charged to the cgroup.
    child = start_in(cgroup, "data = b'x' * (100 << 20)\nprint('survived')")
    output, _ = child.communicate(timeout=60)

    assert child.returncode == -signal.SIGKILL
    assert output == ""
    assert cgroup.oom_killed()
    assert cgroup.oom_kill_count() >= 1


@pytest.mark.root
def test_sigkill_is_not_oom(make_cgroup) -> None:
    cgroup = make_cgroup({"memory": {"limit": 32 * MiB}})
    child = start_in(cgroup, "import time\ntime.sleep(60)")

    child.kill()
    child.wait(timeout=10)

    assert child.returncode == -signal.SIGKILL
    assert not cgroup.oom_killed()


FORK_BOMB = """
import os, time
forked = 0
while forked < 100:
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked += 1
print(forked, flush=True)
"""


@pytest.mark.root
def test_pids_limit_bounds_forks_and_destroy_kills(make_cgroup) -> None:
    cgroup = make_cgroup({"pids": {"limit": 8}})

    child = start_in(cgroup, FORK_BOMB)
    assert child.stdout is not None
    output = child.stdout.readline()  # the forked children keep stdout open: no EOF
    child.wait(timeout=30)
    leftovers = cgroup.pids()
    cgroup.destroy()

    assert int(output) == 7  # the limit counts the forking parent too
    assert len(leftovers) == 7
    for pid in leftovers:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie_of_other(pid)
    for directory in cgroup.directories.values():
        assert not os.path.exists(directory)


def _is_zombie_of_other(pid: int) -> bool:
    # An orphaned child is reparented to a subreaper or init and reaped asynchronously.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.root
def test_resource_files_and_stats(make_cgroup, real_layout: Layout) -> None:
    device = _block_device()
    resources = cgroups.resources_from_options(
        memory=64 * MiB, cpus=0.5, pids_limit=16, device_write_bps=[f"{device}:1mb"]
    )
    cgroup = make_cgroup(resources)

    child = start_in(cgroup, "x = sum(range(3_000_000))\nprint(x)")
    child.communicate(timeout=30)
    stats = cgroup.stats()

    assert stats["cpu_usage_ns"] > 0
    assert stats["memory_limit_bytes"] == 64 * MiB
    assert stats["memory_bytes"] is not None
    assert stats["pids"] == 0
    if real_layout.version == 1:
        assert Path(cgroup.directories["cpu"], "cpu.cfs_quota_us").read_text() == "50000\n"
        rdev = os.stat(device).st_rdev
        throttle = Path(cgroup.directories["blkio"], "blkio.throttle.write_bps_device")
        assert throttle.read_text() == f"{os.major(rdev)}:{os.minor(rdev)} {MiB}\n"
    else:
        assert Path(cgroup.directories["cpu"], "cpu.max").read_text() == "50000 100000\n"


@pytest.mark.root
def test_destroy_is_idempotent(make_cgroup) -> None:
    cgroup = make_cgroup({})
    child = start_in(cgroup, "import time\ntime.sleep(60)")

    cgroup.destroy()
    child.wait(timeout=10)
    cgroup.destroy()

    assert child.returncode == -signal.SIGKILL
    for directory in cgroup.directories.values():
        assert not os.path.exists(directory)


@pytest.mark.root
def test_spec_path_is_inside_own_cgroup(make_cgroup, real_layout: Layout) -> None:
    cgroup = make_cgroup({})

    for controller, hierarchy in real_layout.hierarchies.items():
        assert cgroup.spec_path.startswith(hierarchy.own.rstrip("/") + "/"), controller
        assert cgroup.directories[controller] == hierarchy.directory(cgroup.spec_path)
        assert os.path.isdir(cgroup.directories[controller])


@pytest.mark.root
def test_shared_parent_removed_by_last_destroy(make_cgroup, real_layout: Layout) -> None:
    first = make_cgroup({})
    second = make_cgroup({})
    memory = real_layout.hierarchies["memory"]
    shared = memory.directory(memory.own.rstrip("/") + "/lstore")

    first.destroy()
    assert os.path.isdir(shared)
    second.destroy()

    assert not os.path.exists(shared)
    # Ancestors above this process's own memory path may be shared with other processes.
    own_mirrors = [d for d in first.parents + second.parents if memory.own in d]
    assert own_mirrors
    for directory in own_mirrors:
        assert not os.path.exists(directory)
