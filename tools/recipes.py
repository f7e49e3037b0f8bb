"""Recipes for the real test images, each building one OCI layout with umoci.

Layout tags (what `umoci unpack --image LAYOUT:TAG` can unpack, and what gets pushed):

| image | tags in the layout |
|---|---|
| busybox | `amd64`, `arm64` (one manifest each), `index` (the image index over both) |
| debian-nginx | `base` (1 layer), `nginx` (2 layers), `final` (3 layers and the nginx config) |
| big | `latest` (the Debian base plus one layer per large package) |

Each recipe's pushed tag also has a copy with zstd layers, tagged `<tag>-zstd`, which
umoci 0.4 cannot unpack.

A recipe's version string is its cache key: change the string whenever the recipe changes,
so cached layouts from the old recipe are not reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from lstore.tools.layout import OciLayout, PlatformManifest
from lstore.tools.rootfs import (
    apt_install_in_chroot,
    busybox_applets,
    changelog_paths,
    child_paths,
    debootstrap,
    extract_deb,
    fetch_deb,
    populate_busybox,
    whiteout_layer,
)

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The directory that the last debian-nginx layer replaces, and the file it then contains.
NGINX_REPLACED_DIR = "var/www/html"
NGINX_INDEX_HTML = b"lstore-ok\n"

# Together with the Debian base these unpack to about 1 GB (Installed-Size in bookworm).
BIG_PACKAGES = ["golang-1.19-go", "openjdk-17-jre-headless", "golang-1.19-src",
                "libllvm15", "gcc-12", "libicu72"]

BUSYBOX_PLATFORMS = [PlatformManifest("amd64", "amd64"),
                     PlatformManifest("arm64", "arm64", "v8")]


@dataclass(frozen=True)
class Recipe:
    """How to build one layout: `build(work_dir, cache_dir)` leaves it in work_dir/layout.

    `pushed_tag` names the layout tag that goes to the registry.
    """

    name: str
    version: str
    build: Callable[[str, str], None]
    pushed_tag: str


def build_busybox(work: str, cache_dir: str) -> None:
    """Build one single-layer busybox image per platform and an index over them.

    Both platforms get the applet list of the amd64 binary: the same busybox-static version
    is built with the same configuration on every Debian architecture.
    """
    layout = _new_layout(work)
    binaries = {p.tag: _busybox_binary(work, cache_dir, p.tag) for p in BUSYBOX_PLATFORMS}
    applets = busybox_applets(binaries["amd64"])

    for platform in BUSYBOX_PLATFORMS:
        layout.new(platform.tag, platform.architecture,
                   ["--config.env", PATH_ENV, "--config.cmd", "sh"])
        bundle = os.path.join(work, f"bundle-{platform.tag}")
        rootfs = layout.unpack(platform.tag, bundle)
        populate_busybox(rootfs, binaries[platform.tag], applets)
        layout.repack(bundle, platform.tag, "busybox-static applets")

    layout.add_index("index", BUSYBOX_PLATFORMS)
    layout.remove_unused_blobs()


def _busybox_binary(work: str, cache_dir: str, architecture: str) -> str:
    deb = fetch_deb(f"busybox-static:{architecture}", os.path.join(cache_dir, "debs"))
    extracted = os.path.join(work, f"busybox-static-{architecture}")
    extract_deb(deb, extracted)
    return os.path.join(extracted, "bin", "busybox")


def build_debian_nginx(work: str, cache_dir: str) -> None:
    """Build Debian minbase, then nginx-light, then a layer of whiteouts and a replaced dir.

    The third layer deletes every /usr/share/doc/*/changelog* file and everything in
    /var/cache/apt (whiteouts of files and of a directory), and replaces /var/www/html
    with a directory that has an opaque marker and only index.html.
    """
    layout = _new_layout(work)
    layout.new("base", "amd64", ["--config.env", PATH_ENV, "--config.cmd", "bash"])
    bundle = os.path.join(work, "bundle")
    rootfs = layout.unpack("base", bundle)

    debootstrap(rootfs, cache_dir)
    layout.repack(bundle, "base", "debootstrap --variant=minbase bookworm")

    apt_install_in_chroot(rootfs, ["nginx-light"])
    layout.repack(bundle, "nginx", "apt-get install nginx-light")

    deleted = changelog_paths(rootfs) + child_paths(rootfs, "var/cache/apt")
    layer = whiteout_layer(rootfs, deleted, NGINX_REPLACED_DIR,
                           {"index.html": NGINX_INDEX_HTML})
    layer_path = os.path.join(work, "cleanup-layer.tar")
    with open(layer_path, "wb") as layer_file:
        layer_file.write(layer)
    layout.add_layer("nginx", "final", layer_path, "remove changelogs and apt cache")
    layout.configure("final", ["--config.exposedports", "80/tcp",
                               "--config.cmd", "nginx", "--config.cmd", "-g",
                               "--config.cmd", "daemon off;",
                               "--config.stopsignal", "SIGQUIT"])
    layout.remove_unused_blobs()


def build_big(work: str, cache_dir: str) -> None:
    """Build the benchmark image: the Debian base plus one layer per package of BIG_PACKAGES."""
    layout = _new_layout(work)
    layout.new("latest", "amd64", ["--config.env", PATH_ENV, "--config.cmd", "bash"])
    bundle = os.path.join(work, "bundle")
    rootfs = layout.unpack("latest", bundle)

    debootstrap(rootfs, cache_dir)
    layout.repack(bundle, "latest", "debootstrap --variant=minbase bookworm")
    for package in BIG_PACKAGES:
        extract_deb(fetch_deb(package, os.path.join(cache_dir, "debs")), rootfs)
        layout.repack(bundle, "latest", f"dpkg-deb -x {package}")
    layout.remove_unused_blobs()


def _new_layout(work: str) -> OciLayout:
    layout = OciLayout(os.path.join(work, "layout"))
    layout.init()
    return layout


RECIPES = {
    "busybox": Recipe("busybox", "busybox-2", build_busybox, "index"),
    "debian-nginx": Recipe("debian-nginx", "debian-nginx-2", build_debian_nginx, "final"),
    "big": Recipe("big", "big-2", build_big, "latest"),
}
