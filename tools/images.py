"""Build the real test images once, cache their OCI layouts, and push them to a registry.

    python -m lstore.tools.images --registry 127.0.0.1:5000 [--cache DIR] [--with-big]

Layouts are cached under DIR/<recipe version> (see recipes.py), so only the first run on a
machine downloads packages and runs debootstrap. Several test sessions may build at once:
one flock on the cache directory serializes the builds, and a layout appears under its
final name only once it is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from lstore.store.digest import Digest
from lstore.tools.command import ToolError, run
from lstore.tools.layout import OciLayout
from lstore.tools.recipes import RECIPES, Recipe

log = logging.getLogger(__name__)

DEFAULT_CACHE = "/var/cache/lstore-images"
CACHE_ENV = "LSTORE_IMAGE_CACHE"


@dataclass(frozen=True)
class Push:
    """One tag pushed to the registry from a tag of a cached layout, with skopeo options."""

    repository: str
    tag: str
    image: str
    layout_tag: str
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.repository}:{self.tag}"


# --preserve-digests pushes the layout's manifests byte for byte, and stops skopeo from
# substituting a blob with another compression that the registry already has. A v2s2 push
# converts the manifests, so it cannot preserve digests. It comes before the zstd push of
# the same repository, so no zstd blob can be substituted into a Docker manifest.
_SAME = ("--preserve-digests",)
_V2S2 = ("--format", "v2s2")

# `--all` copies every platform of an index; with v2s2 skopeo turns it into a Docker manifest
# list.
PUSHES = [
    Push("busybox", "latest", "busybox", "index", ("--all", *_SAME)),
    Push("busybox", "1", "busybox", "index", ("--all", *_SAME)),
    Push("busybox", "v2s2", "busybox", "index", ("--all", *_V2S2)),
    Push("busybox", "zstd", "busybox", "index-zstd", ("--all", *_SAME)),
    Push("debian-nginx", "oci", "debian-nginx", "final", _SAME),
    Push("debian-nginx", "v2s2", "debian-nginx", "final", _V2S2),
    Push("debian-nginx", "zstd", "debian-nginx", "final-zstd", _SAME),
    Push("big", "latest", "big", "latest", _SAME),
]


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV, DEFAULT_CACHE)


def selected_images(with_big: bool) -> list[str]:
    return ["busybox", "debian-nginx"] + (["big"] if with_big else [])


def build_layouts(cache_dir: str, images: list[str]) -> dict[str, str]:
    """Return the layout directory of each image in `images`, building missing ones.

    Concurrent-safe across processes. A failed build leaves no layout behind, only the
    downloaded .debs and the debootstrap tarball, which are complete files.
    """
    return {name: ensure_layout(RECIPES[name], cache_dir) for name in images}


def ensure_layout(recipe: Recipe, cache_dir: str) -> str:
    """Return the cached layout of `recipe`, building it under the cache lock if missing."""
    final = os.path.join(cache_dir, recipe.version)
    if os.path.isdir(final):
        return final

    with _cache_lock(cache_dir):
        if os.path.isdir(final):
            return final
        log.info("building image %s into %s", recipe.name, final)
        work = tempfile.mkdtemp(prefix=f".build-{recipe.name}-", dir=cache_dir)
        try:
            recipe.build(work, cache_dir)
            layout = OciLayout(os.path.join(work, "layout"))
            layout.add_zstd_copy(recipe.pushed_tag, f"{recipe.pushed_tag}-zstd",
                                 os.path.join(work, "zstd"))
            os.rename(layout.path, final)
        finally:
            shutil.rmtree(work)
    return final


@contextlib.contextmanager
def _cache_lock(cache_dir: str) -> Iterator[None]:
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        _remove_stale_builds(cache_dir)
        yield


def _remove_stale_builds(cache_dir: str) -> None:
    # The lock is held, so every build directory left is from a builder that died.
    for stale in glob.glob(os.path.join(cache_dir, ".build-*")):
        log.warning("removing unfinished build %s", stale)
        shutil.rmtree(stale)


def push_image(push: Push, layout_dir: str, registry_host: str) -> Digest:
    """Copy a layout tag to `registry_host` over plain HTTP; return the manifest digest."""
    with tempfile.TemporaryDirectory(prefix="lstore-push-") as scratch:
        digest_file = os.path.join(scratch, "digest")
        run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             "--digestfile", digest_file, *push.options,
             f"oci:{layout_dir}:{push.layout_tag}",
             f"docker://{registry_host}/{push.name}"])
        with open(digest_file) as digest_text:
            return Digest(digest_text.read().strip())


def seed_registry(registry_host: str, cache_dir: str | None = None,
                  with_big: bool = False) -> dict[str, Digest]:
    """Build (or reuse) the test images and push every tag; map "repo:tag" to its digest."""
    images = selected_images(with_big)
    layouts = build_layouts(cache_dir or default_cache_dir(), images)

    digests: dict[str, Digest] = {}
    for push in PUSHES:
        if push.image in layouts:
            digests[push.name] = push_image(push, layouts[push.image], registry_host)
            log.info("pushed %s/%s %s", registry_host, push.name, digests[push.name])
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lstore.tools.images",
        description="Build the test images from Debian packages and push them.")
    parser.add_argument("--registry", required=True, help="HOST:PORT of a plain-HTTP registry")
    parser.add_argument("--cache", default=default_cache_dir(),
                        help=f"layout cache directory (default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--with-big", action="store_true",
                        help="also build and push big:latest (about 1 GB, for benchmarks)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each build step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    try:
        digests = seed_registry(args.registry, args.cache, args.with_big)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, digest in digests.items():
        print(f"{args.registry}/{name} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
