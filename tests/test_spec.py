"""OCI config.json building: docker's command, environment, user and default rules."""

from __future__ import annotations

import os
import resource

import pytest

from lstore.errors import InvalidArgumentError
from lstore.runner.options import RunOptions
from lstore.runner.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    MASKED_PATHS,
    READONLY_PATHS,
    ExecUser,
    build_spec,
    command_args,
    environment,
    read_env_file,
    read_image_file,
    resolve_user,
    working_dir,
)

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
alice:x:1000:1000:Alice:/home/alice:/bin/sh
broken line
"""
GROUP = """root:x:0:
wheel:x:10:root,alice
alice:x:1000:
staff:x:50:alice
users:x:100:
"""


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return str(root)


def _spec(rootfs: str, opts: RunOptions, config: dict | None = None, **overrides) -> dict:
    image_config = {"config": config if config is not None else {"Cmd": ["sh"]}}
    arguments = dict(
        rootfs=rootfs,
        hostname="c0ffee",
        mounts=[],
        netns_path=None,
        cgroups_path="/lstore/c0ffee",
        resources={},
    )
    arguments.update(overrides)
    return build_spec(image_config, opts, **arguments)


@pytest.mark.parametrize(
    ("image_entrypoint", "image_cmd", "entrypoint", "command", "expected"),
    [
        (None, ["sh"], None, [], ["sh"]),
        (None, ["sh"], None, ["echo", "hi"], ["echo", "hi"]),
        (["/init"], ["serve"], None, [], ["/init", "serve"]),
        (["/init"], ["serve"], None, ["debug"], ["/init", "debug"]),
        (["/init"], ["serve"], ["/bin/sh"], [], ["/bin/sh"]),
        (["/init"], ["serve"], ["/bin/sh"], ["-c", "true"], ["/bin/sh", "-c", "true"]),
        (["/init"], ["serve"], [], ["ls"], ["ls"]),
        (["/init"], ["serve"], [""], ["ls"], ["ls"]),
    ],
)
def test_command_combines_like_docker(image_entrypoint, image_cmd, entrypoint, command, expected):
    config = {"Entrypoint": image_entrypoint, "Cmd": image_cmd}
    opts = RunOptions(image="img", entrypoint=entrypoint, command=command)

    assert command_args(config, opts) == expected


@pytest.mark.parametrize(
    ("config", "entrypoint"),
    [({}, None), ({"Entrypoint": ["/init"], "Cmd": ["serve"]}, [])],
)
def test_command_missing_is_rejected(config, entrypoint):
    with pytest.raises(InvalidArgumentError) as info:
        command_args(config, RunOptions(image="img", entrypoint=entrypoint))

    assert "img" in str(info.value)


def test_environment_order_and_overrides(tmp_path, monkeypatch):
    env_file = tmp_path / "env"
    env_file.write_text("# comment\n\nFROM_FILE=1\nSHARED=file\n")
    monkeypatch.setenv("FROM_CALLER", "caller")
    monkeypatch.delenv("ABSENT", raising=False)
    config = {"Env": ["PATH=/image/bin", "SHARED=image", "IMAGE_ONLY=x"]}
    opts = RunOptions(
        env_files=[str(env_file)], env=["SHARED=flag", "FROM_CALLER", "ABSENT", "EMPTY="]
    )

    env = environment(config, opts, "c0ffee", "/root")

    assert env == [
        "PATH=/image/bin",
        "HOSTNAME=c0ffee",
        "SHARED=flag",
        "IMAGE_ONLY=x",
        "FROM_FILE=1",
        "FROM_CALLER=caller",
        "EMPTY=",
        "HOME=/root",
    ]


@pytest.mark.parametrize(
    ("tty", "config_env", "flags", "expected"),
    [
        (False, [], [], ["PATH=" + DEFAULT_PATH, "HOSTNAME=h", "HOME=/home/x"]),
        (True, [], [], ["PATH=" + DEFAULT_PATH, "HOSTNAME=h", "TERM=xterm", "HOME=/home/x"]),
        (
            True,
            [],
            ["TERM=dumb", "HOSTNAME=mine", "HOME=/tmp"],
            ["PATH=" + DEFAULT_PATH, "HOSTNAME=mine", "TERM=dumb", "HOME=/tmp"],
        ),
        (False, ["A=b=c"], [], ["PATH=" + DEFAULT_PATH, "HOSTNAME=h", "A=b=c", "HOME=/home/x"]),
    ],
)
def test_environment_defaults(tty, config_env, flags, expected):
    opts = RunOptions(tty=tty, env=flags)

    assert environment({"Env": config_env}, opts, "h", "/home/x") == expected


def test_environment_rejects_empty_name():
    with pytest.raises(InvalidArgumentError):
        environment({}, RunOptions(env=["=value"]), "h", "/")


def test_env_file_keeps_values_literally(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text('  QUOTED="a b"\nSPACES= x \n#C=1\nBARE\n')

    assert read_env_file(str(env_file)) == ['QUOTED="a b"', "SPACES= x ", "BARE"]


def test_env_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\n=nameless\n")

    with pytest.raises(InvalidArgumentError) as info:
        read_env_file(str(bad))
    assert str(bad) in str(info.value)
    assert "line 2" in str(info.value)

    with pytest.raises(InvalidArgumentError) as info:
        read_env_file(str(tmp_path / "missing.env"))
    assert "missing.env" in str(info.value)


@pytest.mark.parametrize(
    ("workdir", "image_dir", "expected"),
    [
        (None, None, "/"),
        (None, "/app", "/app"),
        ("/data/", "/app", "/data"),
        (None, "app", "/app"),
        ("/a/../b", None, "/b"),
    ],
)
def test_working_dir_table(workdir, image_dir, expected):
    config = {"WorkingDir": image_dir} if image_dir else {}

    assert working_dir(config, RunOptions(workdir=workdir)) == expected


def test_working_dir_must_be_absolute():
    with pytest.raises(InvalidArgumentError) as info:
        working_dir({}, RunOptions(workdir="relative"))

    assert "relative" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", ExecUser(0, 0, [10], "/root")),
        ("root", ExecUser(0, 0, [10], "/root")),
        ("1000", ExecUser(1000, 1000, [10, 50], "/home/alice")),
        ("alice", ExecUser(1000, 1000, [10, 50], "/home/alice")),
        ("1000:1000", ExecUser(1000, 1000, [], "/home/alice")),
        ("alice:staff", ExecUser(1000, 50, [], "/home/alice")),
        ("alice:999", ExecUser(1000, 999, [], "/home/alice")),
        ("5000", ExecUser(5000, 0, [], "/")),
        ("5000:users", ExecUser(5000, 100, [], "/")),
        ("daemon", ExecUser(1, 1, [], "/usr/sbin")),
    ],
)
def test_user_resolution_table(rootfs, spec, expected):
    assert resolve_user(spec, [rootfs]) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bob", "unable to find user bob"),
        ("alice:nogroup", "unable to find group nogroup"),
        ("99999999999", "unable to find user 99999999999"),
    ],
)
def test_unknown_user_or_group_is_rejected(rootfs, spec, message):
    with pytest.raises(InvalidArgumentError) as info:
        resolve_user(spec, [rootfs])

    assert message in str(info.value)


def test_numeric_user_works_without_passwd(tmp_path):
    assert resolve_user("1000:1000", [str(tmp_path)]) == ExecUser(1000, 1000, [], "/")


def _layer(base, name: str, files: dict[str, str]) -> str:
    layer = base / name
    layer.mkdir()
    for path, text in files.items():
        (layer / path).parent.mkdir(parents=True, exist_ok=True)
        (layer / path).write_text(text)
    return str(layer)


def test_image_file_from_top_layer(tmp_path):
    bottom = _layer(tmp_path, "1", {"etc/passwd": "old"})
    top = _layer(tmp_path, "2", {"etc/passwd": "new", "etc/other": "x"})

    assert read_image_file([bottom, top], "/etc/passwd") == "new"
    assert read_image_file([bottom], "/etc/passwd") == "old"
    assert read_image_file([bottom, top], "/etc/missing") is None


@pytest.mark.root
def test_image_file_whiteout_hides_lower(tmp_path):
    bottom = _layer(tmp_path, "1", {"etc/passwd": "old"})
    top = _layer(tmp_path, "2", {"etc/keep": ""})
    os.mknod(os.path.join(top, "etc", "passwd"), 0o600 | 0o020000, os.makedev(0, 0))

    assert read_image_file([bottom, top], "/etc/passwd") is None


@pytest.mark.root
def test_image_file_opaque_dir_hides_lower(tmp_path):
    bottom = _layer(tmp_path, "1", {"etc/passwd": "old"})
    top = _layer(tmp_path, "2", {"etc/group": "g"})
    os.setxattr(os.path.join(top, "etc"), "trusted.overlay.opaque", b"y")

    assert read_image_file([bottom, top], "/etc/passwd") is None
    assert read_image_file([bottom, top], "/etc/group") == "g"


def test_image_file_symlink_resolves_in_union(tmp_path):
    bottom = _layer(tmp_path, "1", {"usr/share/passwd": "linked"})
    top = _layer(tmp_path, "2", {})
    (tmp_path / "2" / "etc").mkdir()
    os.symlink("../usr/share/passwd", tmp_path / "2" / "etc" / "passwd")
    outside = _layer(tmp_path, "3", {})
    os.symlink("/../../../../etc/hostname", os.path.join(outside, "escape"))

    assert read_image_file([bottom, top], "/etc/passwd") == "linked"
    assert read_image_file([bottom, outside], "/escape") is None


def test_spec_process_defaults(rootfs):
    spec = _spec(rootfs, RunOptions(image="img", user="alice"))
    process = spec["process"]

    assert spec["ociVersion"].startswith("1.")
    assert process["args"] == ["sh"]
    assert process["cwd"] == "/"
    assert process["terminal"] is False
    assert process["noNewPrivileges"] is True
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 50]}
    assert "HOME=/home/alice" in process["env"]
    hard = min(1048576, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": hard}]
    for kind in ("bounding", "effective", "permitted"):
        assert process["capabilities"][kind] == DEFAULT_CAPABILITIES
    assert "inheritable" not in process["capabilities"]
    assert "ambient" not in process["capabilities"]


def test_spec_user_falls_back_to_image_user(rootfs):
    spec = _spec(rootfs, RunOptions(), {"Cmd": ["sh"], "User": "daemon"})

    assert spec["process"]["user"] == {"uid": 1, "gid": 1}


def test_spec_reads_users_from_layers(tmp_path):
    bottom = _layer(tmp_path, "1", {"etc/passwd": PASSWD})
    top = _layer(tmp_path, "2", {"etc/group": GROUP})

    spec = _spec("rootfs", RunOptions(user="alice"), layer_dirs=[bottom, top])

    assert spec["root"]["path"] == "rootfs"
    assert spec["process"]["user"]["additionalGids"] == [10, 50]


def test_spec_root_hostname_and_cgroup(rootfs):
    spec = _spec(rootfs, RunOptions(read_only=True))

    assert spec["root"] == {"path": rootfs, "readonly": True}
    assert spec["hostname"] == "c0ffee"
    assert spec["linux"]["cgroupsPath"] == "/lstore/c0ffee"
    assert spec["linux"]["maskedPaths"] == MASKED_PATHS
    assert spec["linux"]["readonlyPaths"] == READONLY_PATHS


def test_spec_default_mounts(rootfs):
    mounts = {m["destination"]: m for m in _spec(rootfs, RunOptions())["mounts"]}

    assert list(mounts) == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/sys",
        "/sys/fs/cgroup",
        "/dev/mqueue",
        "/dev/shm",
    ]
    assert mounts["/proc"]["type"] == "proc"
    assert "ro" in mounts["/sys"]["options"]
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert "newinstance" in mounts["/dev/pts"]["options"]
    assert "ptmxmode=0666" in mounts["/dev/pts"]["options"]
    assert mounts["/dev"]["type"] == "tmpfs"


def test_spec_given_mounts_replace_defaults_and_sort(rootfs):
    given = [
        {"destination": "/data/cache", "type": "tmpfs", "source": "tmpfs", "options": []},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "tmpfs", "options": ["size=1g"]},
        {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind"]},
    ]

    mounts = _spec(rootfs, RunOptions(), mounts=given)["mounts"]
    destinations = [m["destination"] for m in mounts]

    assert destinations.count("/dev/shm") == 1
    assert destinations[-3:] == ["/data", "/data/cache", "/dev/shm"]
    assert mounts[-1]["options"] == ["size=1g"]


@pytest.mark.parametrize(
    ("network", "netns_path", "userns", "expected"),
    [
        (
            "bridge",
            "/run/netns/c1",
            False,
            [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": "/run/netns/c1"},
            ],
        ),
        (
            "none",
            None,
            False,
            [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network"},
            ],
        ),
        (
            "host",
            None,
            False,
            [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        ),
        (
            "none",
            None,
            True,
            [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network"},
                {"type": "user"},
            ],
        ),
    ],
)
def test_spec_namespaces_table(rootfs, network, netns_path, userns, expected):
    spec = _spec(rootfs, RunOptions(network=network, userns=userns), netns_path=netns_path)

    assert spec["linux"]["namespaces"] == expected


def test_spec_userns_maps_root_to_subordinate_range(rootfs):
    linux = _spec(rootfs, RunOptions(userns=True), userns_range=(200000, 65536))["linux"]

    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 200000, "size": 65536}]
    assert linux["gidMappings"] == linux["uidMappings"]


def test_spec_without_userns_has_no_mappings(rootfs):
    linux = _spec(rootfs, RunOptions())["linux"]

    assert "uidMappings" not in linux
    assert "gidMappings" not in linux


def test_spec_sysctls_only_with_own_netns(rootfs):
    bridge = _spec(rootfs, RunOptions(network="bridge"), netns_path="/run/netns/c1")
    host = _spec(rootfs, RunOptions(network="host"))

    assert bridge["linux"]["sysctl"]["net.ipv4.ip_unprivileged_port_start"] == "0"
    assert "sysctl" not in host["linux"]


def test_spec_userns_skips_ping_group_range(rootfs):
    sysctl = _spec(rootfs, RunOptions(network="none", userns=True))["linux"]["sysctl"]

    assert "net.ipv4.ping_group_range" not in sysctl
    assert sysctl["net.ipv4.ip_unprivileged_port_start"] == "0"


def test_spec_resources_keep_given_and_default_devices(rootfs):
    resources = {"memory": {"limit": 64 << 20}, "pids": {"limit": 100}}

    linux = _spec(rootfs, RunOptions(), resources=resources)["linux"]

    assert linux["resources"]["memory"] == {"limit": 64 << 20}
    assert linux["resources"]["pids"] == {"limit": 100}
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in linux[
        "resources"
    ]["devices"]
    assert resources == {"memory": {"limit": 64 << 20}, "pids": {"limit": 100}}


def test_spec_tty_sets_terminal_and_term(rootfs):
    process = _spec(rootfs, RunOptions(tty=True))["process"]

    assert process["terminal"] is True
    assert "TERM=xterm" in process["env"]


def test_env_file_rejects_whitespace_in_name(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("GOOD=1\nexport D=4\n")

    with pytest.raises(InvalidArgumentError) as caught:
        read_env_file(str(env_file))

    assert "line 2" in str(caught.value)
    assert "'export D'" in str(caught.value)
