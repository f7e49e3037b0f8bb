"""The test infrastructure itself: the real registry, the seeded images and the tree helpers."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from typing import Any

import pytest
import zstandard
from conftest import SeededRegistry
from lstore.store import digest as mt
from lstore.store.digest import Digest
from lstore.tools import rootfs
from lstore.tools.command import ToolError, run
from lstore.tools.images import ensure_layout
from lstore.tools.recipes import NGINX_INDEX_HTML, Recipe
from lstore.tools.registry import start_registry
from lstore.tools.rootfs import whiteout_layer
from realimages import (
    assert_same_tree,
    entry_signature,
    tree_differences,
    tree_signature,
    umoci_rootfs,
)

ACCEPT_ALL = ", ".join([mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_MANIFEST_LIST,
                        mt.DOCKER_MANIFEST])

# ELF e_machine values (System V gABI, "ELF Header").
EM_X86_64 = 62
EM_AARCH64 = 183


def inspect_raw(registry: SeededRegistry, name: str) -> bytes:
    done = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.ref(name)}"], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def get_manifest(registry: SeededRegistry, repository: str, reference: str
                 ) -> tuple[str, dict[str, Any]]:
    """GET a manifest and return the Content-Type the registry sent and the parsed body."""
    request = urllib.request.Request(f"{registry.url}/v2/{repository}/manifests/{reference}",
                                     headers={"Accept": ACCEPT_ALL})
    with urllib.request.urlopen(request) as response:
        return response.headers["Content-Type"], json.load(response)


def get_blob(registry: SeededRegistry, repository: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"{registry.url}/v2/{repository}/blobs/{digest}") as response:
        return response.read()


def layer_tar(registry: SeededRegistry, repository: str, layer: dict[str, str]
              ) -> tarfile.TarFile:
    data = get_blob(registry, repository, layer["digest"])
    if mt.layer_compression(layer["mediaType"]) == mt.COMPRESSION_ZSTD:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    else:
        data = gzip.decompress(data)
    return tarfile.open(fileobj=io.BytesIO(data))


def entry_names(tar: tarfile.TarFile) -> list[str]:
    return [member.name.rstrip("/") for member in tar.getmembers()]


# Registry.

def test_registry_serves_v2(registry: SeededRegistry) -> None:
    with urllib.request.urlopen(f"{registry.url}/v2/") as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert registry.host.startswith("127.0.0.1:")


def test_registry_allows_deletes(registry: SeededRegistry) -> None:
    # With deletes disabled the registry returns 405 UNSUPPORTED before looking the digest up.
    missing = "sha256:" + "0" * 64
    request = urllib.request.Request(f"{registry.url}/v2/busybox/manifests/{missing}",
                                     method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 404


def test_registry_stop_ends_process(tmp_path: str) -> None:
    process = start_registry(os.path.join(tmp_path, "data"))
    port = process.port
    process.stop()

    assert process.process.poll() is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_registry_cli_serves_until_sigterm(tmp_path: str) -> None:
    command = [sys.executable, "-m", "lstore.tools.registry", "--data",
               os.path.join(tmp_path, "data")]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        host = cli.stdout.readline().strip()
        with urllib.request.urlopen(f"http://{host}/v2/") as response:
            assert response.status == 200
    finally:
        cli.send_signal(signal.SIGTERM)
        code = cli.wait(timeout=15)

    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(tuple(host.rsplit(":", 1)), timeout=2).close()


# Seeded tags.

TAG_TYPES = [
    ("busybox:latest", mt.OCI_INDEX, mt.OCI_MANIFEST, mt.OCI_LAYER_GZIP),
    ("busybox:1", mt.OCI_INDEX, mt.OCI_MANIFEST, mt.OCI_LAYER_GZIP),
    ("busybox:v2s2", mt.DOCKER_MANIFEST_LIST, mt.DOCKER_MANIFEST, mt.DOCKER_LAYER_GZIP),
    ("busybox:zstd", mt.OCI_INDEX, mt.OCI_MANIFEST, mt.OCI_LAYER_ZSTD),
    ("debian-nginx:oci", mt.OCI_MANIFEST, mt.OCI_MANIFEST, mt.OCI_LAYER_GZIP),
    ("debian-nginx:v2s2", mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST, mt.DOCKER_LAYER_GZIP),
    ("debian-nginx:zstd", mt.OCI_MANIFEST, mt.OCI_MANIFEST, mt.OCI_LAYER_ZSTD),
]


@pytest.mark.registry
@pytest.mark.parametrize("name, top_type, manifest_type, layer_type", TAG_TYPES)
def test_seeded_tag_media_types(registry: SeededRegistry, name: str, top_type: str,
                                manifest_type: str, layer_type: str) -> None:
    repository, tag = name.split(":")
    content_type, top = get_manifest(registry, repository, tag)
    assert content_type == top_type

    manifests = [top]
    if top_type in mt.INDEX_TYPES:
        children = top["manifests"]
        assert {child["mediaType"] for child in children} == {manifest_type}
        manifests = [get_manifest(registry, repository, child["digest"])[1]
                     for child in children]
    for manifest in manifests:
        layers = manifest["layers"]
        assert layers
        assert {layer["mediaType"] for layer in layers} == {layer_type}


@pytest.mark.registry
@pytest.mark.parametrize("name", [row[0] for row in TAG_TYPES])
def test_seeded_digest_matches_raw_manifest(registry: SeededRegistry, name: str) -> None:
    raw = inspect_raw(registry, name)
    assert Digest.of_bytes(raw) == registry.digests[name]


def test_busybox_tags_share_one_index(registry: SeededRegistry) -> None:
    assert registry.digests["busybox:latest"] == registry.digests["busybox:1"]


# debian-nginx.

@pytest.mark.registry
@pytest.mark.parametrize("tag", ["oci", "v2s2", "zstd"])
def test_nginx_last_layer_contents(registry: SeededRegistry, tag: str) -> None:
    manifest = get_manifest(registry, "debian-nginx", tag)[1]
    layers = manifest["layers"]
    assert len(layers) >= 3

    tar = layer_tar(registry, "debian-nginx", layers[-1])
    names = entry_names(tar)
    html = [n for n in names if n == "var/www/html" or n.startswith("var/www/html/")]
    whiteouts = [n for n in names if os.path.basename(n).startswith(".wh.")]
    assert sorted(html) == ["var/www/html", "var/www/html/.wh..wh..opq",
                            "var/www/html/index.html"]
    assert set(names) == set(html) | set(whiteouts)
    assert "var/cache/apt/.wh.archives" in whiteouts
    assert any(n.startswith("usr/share/doc/nginx") and "/.wh.changelog" in n
               for n in whiteouts)
    assert tar.extractfile("var/www/html/index.html").read() == NGINX_INDEX_HTML


def test_nginx_whiteouts_hide_lower_content(registry: SeededRegistry) -> None:
    layers = get_manifest(registry, "debian-nginx", "oci")[1]["layers"]
    lower = {m.name.rstrip("/"): m for m in layer_tar(registry, "debian-nginx",
                                                      layers[1]).getmembers()}

    # The directory whiteout hides a real directory with files in it, not an empty path.
    assert lower["var/cache/apt/archives"].isdir()
    assert any(name.startswith("var/cache/apt/archives/") and name.endswith(".deb")
               for name in lower)


def test_nginx_config(registry: SeededRegistry) -> None:
    manifest = get_manifest(registry, "debian-nginx", "oci")[1]
    config = json.loads(get_blob(registry, "debian-nginx",
                                 manifest["config"]["digest"]))

    assert config["architecture"] == "amd64"
    assert config["config"]["ExposedPorts"] == {"80/tcp": {}}
    assert config["config"]["Cmd"] == ["nginx", "-g", "daemon off;"]
    assert config["config"]["StopSignal"] == "SIGQUIT"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])


# busybox.

@pytest.mark.registry
@pytest.mark.parametrize("tag", ["latest", "v2s2", "zstd"])
def test_busybox_index_has_amd64_and_arm64(registry: SeededRegistry, tag: str) -> None:
    index = get_manifest(registry, "busybox", tag)[1]
    platforms = {(m["platform"]["os"], m["platform"]["architecture"])
                 for m in index["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}


@pytest.mark.registry
@pytest.mark.parametrize("architecture, machine", [("amd64", EM_X86_64),
                                                    ("arm64", EM_AARCH64)])
def test_busybox_binary_matches_platform(registry: SeededRegistry, architecture: str,
                                         machine: int) -> None:
    index = get_manifest(registry, "busybox", "latest")[1]
    child = next(m for m in index["manifests"]
                 if m["platform"]["architecture"] == architecture)
    manifest = get_manifest(registry, "busybox", child["digest"])[1]
    config = json.loads(get_blob(registry, "busybox",
                                 manifest["config"]["digest"]))
    tar = layer_tar(registry, "busybox", manifest["layers"][0])

    elf = tar.extractfile("bin/busybox").read(20)
    assert elf[:4] == b"\x7fELF"
    assert int.from_bytes(elf[18:20], "little") == machine
    assert tar.getmember("bin/sh").linkname == "busybox"
    assert config["architecture"] == architecture
    assert config["config"]["Cmd"] == ["sh"]


def test_images_cli_prints_digests(registry: SeededRegistry, image_cache: str) -> None:
    # Pushing again is idempotent: the same content lands under the same digests.
    done = subprocess.run([sys.executable, "-m", "lstore.tools.images", "--registry",
                           registry.host, "--cache", image_cache], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr

    printed = dict(line.split() for line in done.stdout.splitlines())
    expected = {registry.ref(name): digest for name, digest in registry.digests.items()}
    assert printed == expected


# Layout cache.

def test_cached_layout_is_not_rebuilt(oci_layouts: dict[str, str], image_cache: str) -> None:
    index_json = os.path.join(oci_layouts["busybox"], "index.json")
    before = os.stat(index_json).st_mtime_ns
    recipe = Recipe("busybox", os.path.basename(oci_layouts["busybox"]),
                    build=_build_must_not_run, pushed_tag="index")

    assert ensure_layout(recipe, image_cache) == oci_layouts["busybox"]
    assert os.stat(index_json).st_mtime_ns == before


def _build_must_not_run(work: str, cache_dir: str) -> None:
    raise AssertionError("a cached layout was rebuilt")


def test_failed_build_leaves_nothing(tmp_path: str) -> None:
    recipe = Recipe("broken", "broken-1", build=_build_fails, pushed_tag="latest")

    with pytest.raises(ToolError, match="recipe step failed"):
        ensure_layout(recipe, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock"]


def _build_fails(work: str, cache_dir: str) -> None:
    os.makedirs(os.path.join(work, "layout", "blobs"))
    raise ToolError("recipe step failed")


# External commands and apt sources.

def test_missing_tool_names_setup_script() -> None:
    with pytest.raises(ToolError, match="'no-such-program' not found: run tools/setup.sh"):
        run(["no-such-program", "--version"])


def test_failed_command_keeps_output() -> None:
    with pytest.raises(ToolError) as error:
        run(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"])

    assert "exit code 3" in error.value.message
    assert "to-stdout" in error.value.output
    assert "to-stderr" in error.value.output


DEB822_SOURCES = """Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://mirror.example/source
Suites: bookworm
Components: main

Types: deb
# a comment line
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
"""

MIRROR_CASES = [
    ("debian.sources", DEB822_SOURCES, "http://mirror.example/debian"),
    ("debian.list", "deb [arch=amd64] http://mirror.example/one bookworm main\n",
     "http://mirror.example/one"),
    ("debian.list", "# deb http://off.example/ bookworm main\n"
                    "deb http://mirror.example/two bookworm contrib main\n",
     "http://mirror.example/two"),
]


@pytest.mark.parametrize("file_name, content, mirror", MIRROR_CASES)
def test_debian_mirror_from_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: str,
                                    file_name: str, content: str, mirror: str) -> None:
    with open(os.path.join(tmp_path, file_name), "w") as sources:
        sources.write(content)
    monkeypatch.setattr(rootfs, "_SOURCES_DIR", str(tmp_path))
    monkeypatch.setattr(rootfs, "_SOURCES_LIST", os.path.join(tmp_path, "absent"))

    assert rootfs.debian_mirror() == mirror


def test_debian_mirror_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: str) -> None:
    monkeypatch.setattr(rootfs, "_SOURCES_DIR", str(tmp_path))
    monkeypatch.setattr(rootfs, "_SOURCES_LIST", os.path.join(tmp_path, "absent"))

    with pytest.raises(ToolError, match="no apt source for 'bookworm main'"):
        rootfs.debian_mirror()


# Whiteout layers.

def test_whiteout_layer_entries(tmp_path: str) -> None:
    rootfs = str(tmp_path)
    os.makedirs(os.path.join(rootfs, "a", "dir"))
    open(os.path.join(rootfs, "a", "file"), "w").close()

    data = whiteout_layer(rootfs, ["a/file", "a/dir"], "srv/www", {"index.html": b"hi\n"})
    tar = tarfile.open(fileobj=io.BytesIO(data))

    assert entry_names(tar) == ["a/.wh.dir", "a/.wh.file", "srv/www", "srv/www/.wh..wh..opq",
                                "srv/www/index.html"]
    assert tar.getmember("srv/www").isdir()
    assert tar.extractfile("srv/www/index.html").read() == b"hi\n"


def test_whiteout_layer_rejects_missing_path(tmp_path: str) -> None:
    with pytest.raises(ToolError, match="usr/gone"):
        whiteout_layer(str(tmp_path), ["usr/gone"], "srv", {})


# Tree signatures.

@pytest.fixture
def sample_tree(tmp_path: str) -> str:
    root = os.path.join(tmp_path, "tree")
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    with open(os.path.join(root, "bin", "tool"), "wb") as tool:
        tool.write(b"#!/bin/sh\n")
    os.chmod(os.path.join(root, "bin", "tool"), 0o4755)
    os.symlink("tool", os.path.join(root, "bin", "alias"))
    os.mkfifo(os.path.join(root, "tmp", "pipe"))
    os.mknod(os.path.join(root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chown(os.path.join(root, "tmp", "pipe"), 65534, 65534)
    return root


@pytest.mark.root
def test_tree_signature_records_each_kind(sample_tree: str) -> None:
    signature = tree_signature(sample_tree)
    tool_hash = entry_signature(os.path.join(sample_tree, "bin", "tool"))[5]

    assert sorted(signature) == ["/bin", "/bin/alias", "/bin/tool", "/null", "/tmp",
                                 "/tmp/pipe"]
    assert signature["/bin/tool"] == ("file", 0o4755, 0, 0, 10, tool_hash)
    assert signature["/bin/alias"] == ("symlink", 0o777, 0, 0, 4, "tool")
    assert signature["/tmp"][:2] == ("dir", 0o1777)
    assert signature["/tmp/pipe"][:4] == ("fifo", 0o666 & ~_umask(), 65534, 65534)
    assert signature["/null"] == ("char", 0o666 & ~_umask(), 0, 0, 0, "1:3")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tree_signature_hashes_content(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "file")
    with open(path, "wb") as output:
        output.write(b"lstore-ok\n")

    expected = "sha256:" + entry_signature(path)[5]
    assert expected == Digest.of_bytes(b"lstore-ok\n")


@pytest.mark.root
def test_tree_differences_name_each_path(sample_tree: str, tmp_path: str) -> None:
    expected = tree_signature(sample_tree)
    os.chmod(os.path.join(sample_tree, "bin", "tool"), 0o755)
    os.unlink(os.path.join(sample_tree, "null"))
    open(os.path.join(sample_tree, "extra"), "w").close()

    lines = tree_differences(expected, tree_signature(sample_tree))
    assert len(lines) == 3
    assert lines[0].startswith("differs /bin/tool: expected file 4755")
    assert lines[1].startswith("unexpected /extra: file")
    assert lines[2].startswith("missing /null: expected char")


@pytest.mark.root
def test_assert_same_tree_reports_difference(sample_tree: str) -> None:
    other = sample_tree + "-copy"
    subprocess.run(["cp", "-a", sample_tree, other], check=True)
    assert_same_tree(sample_tree, other)

    os.symlink("elsewhere", os.path.join(other, "bin", "new"))
    with pytest.raises(AssertionError, match="unexpected /bin/new: symlink 0777 0:0 -> elsewhere"):
        assert_same_tree(sample_tree, other)


# umoci comparison.

@pytest.mark.root
def test_umoci_rootfs_of_busybox(oci_layouts: dict[str, str], tmp_path: str) -> None:
    rootfs = umoci_rootfs(oci_layouts["busybox"], "amd64", os.path.join(tmp_path, "bundle"))
    signature = tree_signature(rootfs)

    assert signature["/bin/busybox"][:4] == ("file", 0o755, 0, 0)
    assert signature["/bin/sh"] == ("symlink", 0o777, 0, 0, 7, "busybox")
    assert signature["/tmp"][:2] == ("dir", 0o1777)
    assert signature["/root"][:2] == ("dir", 0o700)
    assert signature["/etc/passwd"][0] == "file"


@pytest.mark.root
def test_umoci_rootfs_applies_nginx_whiteouts(oci_layouts: dict[str, str],
                                              tmp_path: str) -> None:
    rootfs = umoci_rootfs(oci_layouts["debian-nginx"], "final", os.path.join(tmp_path, "b"))
    signature = tree_signature(rootfs)

    assert [p for p in signature if p.startswith("/var/www/html/")] == ["/var/www/html/index.html"]
    assert [p for p in signature if p.startswith("/var/cache/apt/")] == []
    assert not [p for p in signature if os.path.basename(p).startswith("changelog")]
    assert signature["/usr/sbin/nginx"][0] == "file"
    assert signature["/dev/null"][0::5] == ("char", "1:3")


def test_umoci_rootfs_unknown_tag_fails(oci_layouts: dict[str, str], tmp_path: str) -> None:
    with pytest.raises(AssertionError, match="no-such-tag"):
        umoci_rootfs(oci_layouts["busybox"], "no-such-tag", os.path.join(tmp_path, "b"))


def test_seeded_digests_cover_every_tag(registry: SeededRegistry) -> None:
    assert sorted(registry.digests) == sorted(row[0] for row in TAG_TYPES)
