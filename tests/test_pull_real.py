"""`lstore pull` against the real distribution registry, compared with umoci's unpack."""

from __future__ import annotations

import json
import signal
import time
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lstore.store.store import Store
from tests.realimages import assert_same_tree, umoci_rootfs

pytestmark = [pytest.mark.registry, pytest.mark.root]

# ELF e_machine values (elf.h) of the busybox binaries in the multi-platform test image.
EM_X86_64 = 62
EM_AARCH64 = 183


@contextmanager
def mounted(lstore, ref: str, target: str) -> Iterator[str]:
    os.makedirs(target, exist_ok=True)
    lstore("mount", ref, target)
    try:
        yield target
    finally:
        lstore("umount", target)


def pull_json(lstore, *args: str) -> dict:
    done = lstore("pull", "--json", *args)
    return json.loads(done.stdout.strip().splitlines()[-1])


def elf_machine(path: str) -> int:
    with open(path, "rb") as handle:
        header = handle.read(20)
    return int.from_bytes(header[18:20], "little")


@pytest.mark.parametrize("tag", ["oci", "v2s2", "zstd"])
def test_nginx_pull_matches_umoci(registry, oci_layouts, lstore, store_root, tmp_path, tag):
    ref = registry.ref(f"debian-nginx:{tag}")

    result = pull_json(lstore, ref)

    assert result["layers"] >= 3
    assert result["layers_fetched"] == result["layers"]
    expected = umoci_rootfs(oci_layouts["debian-nginx"], "final", str(tmp_path / "umoci"))
    with mounted(lstore, ref, str(tmp_path / "mnt")) as rootfs:
        assert_same_tree(expected, rootfs)
        with open(os.path.join(rootfs, "var/www/html/index.html")) as handle:
            assert handle.read() == "lstore-ok\n"
    assert lstore("check", "--content").returncode == 0


def test_pull_by_digest(registry, lstore):
    digest = registry.digests["debian-nginx:oci"]
    ref = f"{registry.host}/debian-nginx@{digest}"

    result = pull_json(lstore, ref)

    assert result["digest"] == digest
    assert result["name"] == ref


def test_index_pull_picks_platform(registry, lstore, tmp_path):
    ref = registry.ref("busybox:latest")

    pull_json(lstore, "--platform", "linux/arm64", ref)
    with mounted(lstore, ref, str(tmp_path / "arm64")) as rootfs:
        assert elf_machine(os.path.join(rootfs, "bin/busybox")) == EM_AARCH64

    pull_json(lstore, "--platform", "linux/amd64", ref)
    with mounted(lstore, ref, str(tmp_path / "amd64")) as rootfs:
        assert elf_machine(os.path.join(rootfs, "bin/busybox")) == EM_X86_64


def test_index_pull_without_match_fails(registry, lstore):
    done = lstore.fails("pull", "--platform", "linux/s390x", registry.ref("busybox:latest"))

    assert "linux/s390x" in done.stderr
    assert "linux/amd64" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_second_pull_fetches_nothing(registry, lstore):
    ref = registry.ref("debian-nginx:oci")
    first = pull_json(lstore, ref)

    second = pull_json(lstore, ref)

    assert first["bytes_fetched"] > 0
    assert second["bytes_fetched"] == 0
    assert second["layers_fetched"] == 0


def test_shared_layers_are_fetched_once(registry, lstore):
    pull_json(lstore, registry.ref("debian-nginx:oci"))

    # skopeo copied the same layer blobs into the v2s2 tag, only its manifest differs.
    v2s2 = pull_json(lstore, registry.ref("debian-nginx:v2s2"))
    by_digest = registry.digests["debian-nginx:oci"]
    again = pull_json(lstore, f"{registry.host}/debian-nginx@{by_digest}")

    assert v2s2["bytes_fetched"] == 0
    assert v2s2["layers_fetched"] == 0
    assert again["bytes_fetched"] == 0


def test_concurrent_pulls_fetch_each_blob_once(registry, store_root):
    ref = registry.ref("debian-nginx:oci")
    command = [sys.executable, "-m", "lstore.cli", "--root", store_root, "pull", "--json", ref]

    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]

    assert [process.returncode for process in processes] == [0, 0]
    results = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    image = Store(store_root).lookup_image(ref)
    assert sum(result["bytes_fetched"] for result in results) == image.size
    assert Store(store_root).check(verify_content=True).clean


def test_rmi_and_gc_empty_the_store(registry, lstore):
    ref = registry.ref("busybox:latest")
    pull_json(lstore, ref)

    lstore("rmi", ref)
    lstore("gc")

    usage = json.loads(lstore("df", "--json").stdout)
    assert usage["images"] == 0
    assert usage["blobs"] == 0
    assert usage["snapshots"] == 0


def test_unknown_tag_is_one_line_error(registry, lstore):
    ref = registry.ref("busybox:no-such-tag")

    done = lstore.fails("pull", ref)

    assert ref in done.stderr or "no-such-tag" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_mount_needs_existing_directory(registry, lstore, tmp_path):
    ref = registry.ref("busybox:latest")
    pull_json(lstore, ref)

    done = lstore.fails("mount", ref, str(tmp_path / "missing"))

    assert "does not exist" in done.stderr
    assert not (tmp_path / "missing").exists()


def test_umount_refuses_foreign_mounts(lstore, tmp_path):
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        done = lstore.fails("umount", str(target))

        assert "not mounted by 'lstore mount'" in done.stderr
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_mounted_image_keeps_its_layers(registry, lstore, tmp_path):
    ref = registry.ref("busybox:latest")
    pull_json(lstore, ref)
    with mounted(lstore, ref, str(tmp_path / "mnt")) as rootfs:
        refused = lstore.fails("rmi", ref)
        assert "is mounted at" in refused.stderr

        lstore("rmi", "--force", ref)
        lstore("gc")

        assert os.path.isfile(os.path.join(rootfs, "bin/busybox"))
    lstore("gc")
    usage = json.loads(lstore("df", "--json").stdout)
    assert usage["snapshots"] == 0


def test_mount_twice_is_refused(registry, lstore, tmp_path):
    ref = registry.ref("busybox:latest")
    pull_json(lstore, ref)
    with mounted(lstore, ref, str(tmp_path / "mnt")) as rootfs:
        done = lstore.fails("mount", ref, rootfs)

        assert "already" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_pull_leaves_clean_store(registry, store_root, lstore, signum):
    ref = registry.ref("debian-nginx:oci")
    command = [sys.executable, "-m", "lstore.cli", "--root", store_root, "pull", ref]
    snapshots = os.path.join(store_root, "snapshots")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isdir(snapshots) and any(n.startswith("tmp-") for n in os.listdir(snapshots)):
            break
        time.sleep(0.01)

    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    if process.returncode == 0:
        pytest.skip("the pull finished before the signal arrived")
    assert process.returncode == 130, stderr
    assert stderr.strip() == f"lstore: pull {ref} interrupted"
    assert not [n for n in os.listdir(snapshots) if n.startswith("tmp-")]
    assert lstore("check").returncode == 0
    assert pull_json(lstore, ref)["layers"] >= 3


def test_explicit_platform_must_match(registry, lstore):
    ref = registry.ref("debian-nginx:oci")
    pull_json(lstore, ref)

    done = lstore.fails("pull", "--platform", "linux/arm64", ref)

    assert "does not match the requested platform" in done.stderr
    assert "linux/amd64" in done.stderr


def test_unknown_platform_is_rejected(registry, lstore):
    done = lstore.fails("pull", "--platform", "junk", registry.ref("busybox:latest"))

    assert "invalid platform 'junk'" in done.stderr


def test_pull_reports_index_digest(registry, lstore):
    result = pull_json(lstore, registry.ref("busybox:latest"))

    assert result["digest"] == registry.digests["busybox:latest"]
    assert result["manifest"] != result["digest"]


def test_usage_error_is_one_line(lstore):
    done = lstore.fails("pull")

    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "see 'lstore pull --help'" in done.stderr


def test_pull_many_at_once(registry, lstore):
    refs = [registry.ref(name) for name in ("debian-nginx:oci", "debian-nginx:zstd")]
    missing = registry.ref("busybox:no-such-tag")

    done = lstore("pull", "--json", *refs, missing, check=False)

    assert done.returncode == 1
    assert missing in done.stderr
    results = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [result["name"] for result in results] == refs
    # Both tags have the same layer contents, so the snapshots are unpacked once.
    usage = json.loads(lstore("df", "--json").stdout)
    assert usage["snapshots"] == 3
    assert lstore("check", "--content").returncode == 0


def test_killed_pull_leaves_store_that_checks_clean(registry, store_root, lstore):
    ref = registry.ref("debian-nginx:oci")
    command = [sys.executable, "-m", "lstore.cli", "--root", store_root, "pull", ref]
    snapshots = os.path.join(store_root, "snapshots")
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isdir(snapshots) and any(n.startswith("tmp-") for n in os.listdir(snapshots)):
            break
        time.sleep(0.01)

    process.kill()
    process.wait(timeout=60)

    # A crash leaves only unrecorded leftovers: the store opens and checks clean.
    assert lstore("check").returncode == 0
    if process.returncode == -signal.SIGKILL:
        assert json.loads(lstore("images", "--json").stdout) == []
    result = pull_json(lstore, ref)
    assert result["layers"] >= 3
    assert lstore("check", "--content").returncode == 0
    lstore("gc")
    assert not [n for n in os.listdir(snapshots) if n.startswith("tmp-")]
    assert os.listdir(os.path.join(store_root, "ingest")) == []


def test_unknown_flag_names_the_command(lstore):
    done = lstore.fails("pull", "--bogus", "x")

    assert done.stderr.strip() == (
        "lstore: error: lstore pull: unrecognized arguments: --bogus; "
        "see 'lstore pull --help'"
    )
