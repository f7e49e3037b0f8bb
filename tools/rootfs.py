"""Fill root filesystems for the test images from Debian packages.

Everything comes from the apt mirror this machine already uses: the busybox binaries from
the busybox-static .debs (amd64 and arm64), the Debian tree from debootstrap, and extra
packages installed with apt-get inside a chroot. Steps that mount anything (debootstrap, the
chroot) run in a private mount namespace, so no mount outlives them, even on failure.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from io import BytesIO

from lstore.tools.command import ToolError, run

log = logging.getLogger(__name__)

# File times for everything these recipes create themselves (2024-01-01T00:00:00Z).
FIXED_MTIME = 1704067200

DEBIAN_SUITE = "bookworm"
_SOURCES_DIR = "/etc/apt/sources.list.d"
_SOURCES_LIST = "/etc/apt/sources.list"

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"

# Installing a package in a chroot must not start its service (Debian policy 9.3.3.1:
# invoke-rc.d consults policy-rc.d, and exit code 101 means "action forbidden").
_POLICY_RC = "#!/bin/sh\nexit 101\n"


def debian_mirror() -> str:
    """Return the URI of the Debian archive that apt on this machine uses for the suite.

    Reads deb822 `.sources` files and one-line `.list` entries; raises ToolError if none
    serves `bookworm main`.
    """
    entries = list(_deb822_entries()) + list(_one_line_entries())
    for uri, suites, components in entries:
        if DEBIAN_SUITE in suites and "main" in components:
            return uri.rstrip("/")
    raise ToolError(f"no apt source for '{DEBIAN_SUITE} main' in {_SOURCES_DIR} or "
                    f"{_SOURCES_LIST}: add the Debian mirror there", path=_SOURCES_DIR)


def _deb822_entries() -> Iterable[tuple[str, list[str], list[str]]]:
    for path in sorted(glob.glob(os.path.join(_SOURCES_DIR, "*.sources"))):
        with open(path) as sources:
            stanzas = re.split(r"\n\s*\n", sources.read())
        for stanza in stanzas:
            fields = _deb822_fields(stanza)
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def _one_line_entries() -> Iterable[tuple[str, list[str], list[str]]]:
    paths = [_SOURCES_LIST] + sorted(glob.glob(os.path.join(_SOURCES_DIR, "*.list")))
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as sources:
            for line in sources:
                # "deb [options] uri suite component..."
                words = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 4 and words[0] == "deb":
                    yield words[1], [words[2]], words[3:]


def fetch_deb(package: str, deb_dir: str) -> str:
    """Download `package` (as `name` or `name:arch`) into `deb_dir` once; return the .deb path.

    A foreign architecture must be enabled first (`dpkg --add-architecture arm64` and
    `apt-get update`, as tools/setup.sh does).
    """
    name, _, arch = package.partition(":")
    os.makedirs(deb_dir, exist_ok=True)
    existing = _find_deb(deb_dir, name, arch or "amd64")
    if existing:
        return existing

    # apt's download sandbox user cannot write to a root-owned cache directory.
    try:
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            cwd=deb_dir)
    except ToolError as exc:
        exc.message += (f" (downloading {package}: if the architecture is missing, run "
                        "tools/setup.sh, which enables arm64 and updates the package lists)")
        raise
    found = _find_deb(deb_dir, name, arch or "amd64")
    if found is None:
        raise ToolError(f"apt-get download {package} left no .deb in {deb_dir}", path=deb_dir)
    return found


def _find_deb(deb_dir: str, name: str, arch: str) -> str | None:
    matches = sorted(glob.glob(os.path.join(deb_dir, f"{name}_*_{arch}.deb")))
    matches += sorted(glob.glob(os.path.join(deb_dir, f"{name}_*_all.deb")))
    return matches[-1] if matches else None


def extract_deb(deb: str, dest: str) -> None:
    """Unpack the files of a .deb into `dest` without running any maintainer script."""
    run(["dpkg-deb", "-x", deb, dest])


def busybox_applets(busybox: str) -> list[str]:
    """List the applet names compiled into a busybox binary that runs on this machine."""
    return sorted(run([busybox, "--list"]).split())


def populate_busybox(rootfs: str, busybox: str, applets: Iterable[str]) -> None:
    """Make a minimal tree: /bin/busybox, one /bin symlink per applet, users and /tmp."""
    for name, mode in (("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777),
                       ("var", 0o755)):
        os.mkdir(os.path.join(rootfs, name))
        os.chmod(os.path.join(rootfs, name), mode)

    shutil.copyfile(busybox, os.path.join(rootfs, "bin", "busybox"))
    os.chmod(os.path.join(rootfs, "bin", "busybox"), 0o755)
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", applet))

    _write_text(os.path.join(rootfs, "etc", "passwd"), _PASSWD)
    _write_text(os.path.join(rootfs, "etc", "group"), _GROUP)
    set_fixed_times(rootfs)


def set_fixed_times(tree: str) -> None:
    """Set the mtime of every entry under `tree` (symlinks themselves too) to FIXED_MTIME."""
    for directory, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(tree, (FIXED_MTIME, FIXED_MTIME))


def _write_text(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as output:
        output.write(text)
    os.chmod(path, mode)


def debootstrap(rootfs: str, cache_dir: str) -> None:
    """Fill `rootfs` with a minbase Debian system, from a cached tarball when there is one.

    The tarball is keyed by suite, variant and mirror, and written atomically, so a failed
    run leaves no partial cache entry.
    """
    mirror = debian_mirror()
    key = hashlib.sha256(mirror.encode()).hexdigest()[:12]
    tarball = os.path.join(cache_dir, f"debootstrap-{DEBIAN_SUITE}-minbase-{key}.tar")

    if not os.path.exists(tarball):
        log.info("debootstrap %s from %s (cached afterwards in %s)", DEBIAN_SUITE, mirror,
                 tarball)
        run(["unshare", "--mount", "--propagation", "private", "debootstrap",
             "--variant=minbase", DEBIAN_SUITE, rootfs, mirror])
        _remove_debootstrap_leftovers(rootfs)
        _archive_tree(rootfs, tarball)
        return

    _restore_tree(tarball, rootfs)


def _remove_debootstrap_leftovers(rootfs: str) -> None:
    # debootstrap keeps the downloaded .debs and package lists and copies this machine's
    # resolv.conf and hostname; none of them belongs in an image.
    patterns = ["var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*",
                "etc/resolv.conf", "etc/hostname"]
    for pattern in patterns:
        for path in glob.glob(os.path.join(rootfs, pattern)):
            os.unlink(path)


def _archive_tree(tree: str, tarball: str) -> None:
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cpf",
         tarball + ".tmp", "-C", tree, "."])
    os.replace(tarball + ".tmp", tarball)


def _restore_tree(tarball: str, tree: str) -> None:
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tarball,
         "-C", tree])


def apt_install_in_chroot(rootfs: str, packages: list[str]) -> None:
    """Install Debian packages inside `rootfs` with its own apt, without starting services.

    The package lists are removed afterwards, and apt's binary caches are never written,
    so the new layer contains the installed files plus the downloaded .debs under
    /var/cache/apt/archives.
    """
    policy_rc = os.path.join(rootfs, "usr", "sbin", "policy-rc.d")
    resolv_conf = os.path.join(rootfs, "etc", "resolv.conf")
    saved_resolv_conf = _save_entry(resolv_conf)
    _write_text(policy_rc, _POLICY_RC, 0o755)
    # apt inside the chroot resolves the mirror's name with this machine's resolver.
    if os.path.lexists(resolv_conf):
        os.unlink(resolv_conf)
    shutil.copyfile("/etc/resolv.conf", resolv_conf)

    try:
        run(["unshare", "--mount", "--propagation", "private", "chroot", rootfs, "/bin/sh",
             "-ec", _apt_script(packages)], env=_chroot_env())
    finally:
        os.unlink(policy_rc)
        _restore_entry(resolv_conf, saved_resolv_conf)


def _apt_script(packages: list[str]) -> str:
    no_caches = "-o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache="
    return (
        "mount -t proc proc /proc\n"
        f"apt-get -q {no_caches} update\n"
        f"apt-get -q -y {no_caches} --no-install-recommends install {' '.join(packages)}\n"
        "rm -rf /var/lib/apt/lists/*\n"
        "umount /proc\n"
    )


def _chroot_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
        "HOME": "/root",
    }


def _save_entry(path: str) -> tuple[str, bytes] | None:
    """Return a file's or symlink's content, or None when nothing is at `path`."""
    if os.path.islink(path):
        return "symlink", os.readlink(path).encode()
    if os.path.isfile(path):
        with open(path, "rb") as source:
            return "file", source.read()
    return None


def _restore_entry(path: str, saved: tuple[str, bytes] | None) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    if saved is None:
        return
    kind, content = saved
    if kind == "symlink":
        os.symlink(content.decode(), path)
        return
    with open(path, "wb") as output:
        output.write(content)


def whiteout_layer(rootfs: str, deleted: list[str], replaced_dir: str,
                   files: dict[str, bytes]) -> bytes:
    """Build an uncompressed layer tar that deletes and replaces paths of `rootfs`.

    For each path in `deleted` the layer contains a whiteout `.wh.<name>`; `replaced_dir`
    becomes a new directory with an opaque marker `.wh..wh..opq` and exactly `files`
    (OCI image-spec layer.md, "Whiteouts"). Paths are relative to the rootfs. No other
    entry is written, not even the parents of the whiteouts, which exist in lower layers.
    """
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for path in sorted(deleted):
            _check_exists(rootfs, path)
            parent, name = os.path.split(path)
            layer.addfile(_entry(os.path.join(parent, ".wh." + name), tarfile.REGTYPE),
                          BytesIO())

        layer.addfile(_entry(replaced_dir + "/", tarfile.DIRTYPE, 0o755))
        layer.addfile(_entry(os.path.join(replaced_dir, ".wh..wh..opq"), tarfile.REGTYPE),
                      BytesIO())
        for name, content in sorted(files.items()):
            info = _entry(os.path.join(replaced_dir, name), tarfile.REGTYPE)
            info.size = len(content)
            layer.addfile(info, BytesIO(content))
    return buffer.getvalue()


def _check_exists(rootfs: str, path: str) -> None:
    if not os.path.lexists(os.path.join(rootfs, path)):
        raise ToolError(f"cannot white out {path!r}: it does not exist in the image",
                        path=os.path.join(rootfs, path))


def _entry(name: str, kind: bytes, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = FIXED_MTIME
    return info


def changelog_paths(rootfs: str) -> list[str]:
    """List /usr/share/doc/*/changelog* files, relative to the rootfs.

    Documentation directories that are symlinks are skipped, so no whiteout is placed
    behind a symlink.
    """
    doc = os.path.join(rootfs, "usr", "share", "doc")
    found = []
    for package in sorted(os.listdir(doc)):
        package_dir = os.path.join(doc, package)
        if os.path.islink(package_dir) or not os.path.isdir(package_dir):
            continue
        for name in sorted(os.listdir(package_dir)):
            if name.startswith("changelog"):
                found.append(os.path.join("usr", "share", "doc", package, name))
    return found


def child_paths(rootfs: str, directory: str) -> list[str]:
    """List the entries directly inside `directory` of the rootfs, relative to the rootfs."""
    names = sorted(os.listdir(os.path.join(rootfs, directory)))
    return [os.path.join(directory, name) for name in names]
