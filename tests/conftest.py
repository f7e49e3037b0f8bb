"""Shared fixtures: the real registry seeded with real images, their OCI layouts, a store root
per test, and a runner for the lstore CLI.

The image layouts are built once per machine and cached (tools/images.py); set
LSTORE_IMAGE_CACHE to use another cache directory. A missing tool fails the fixture with the
command output, because a test that needs a real component must not pass without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lstore.store.digest import Digest
from lstore.tools.command import ToolError
from lstore.tools.images import build_layouts, default_cache_dir, seed_registry
from lstore.tools.registry import RegistryProcess, start_registry

# The images the test suite uses; big:latest is for benchmarks only.
TEST_IMAGES = ["busybox", "debian-nginx"]

# A CLI call that runs longer than this is treated as hung. The largest test image
# (debian-nginx) is about 140 MB unpacked.
CLI_TIMEOUT = 300.0


@dataclass
class SeededRegistry:
    """The running registry and the manifest digest of each pushed "repository:tag"."""

    process: RegistryProcess
    digests: dict[str, Digest]

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def url(self) -> str:
        return self.process.url

    def ref(self, name: str) -> str:
        """Return the full reference of "repository:tag" in this registry."""
        return f"{self.host}/{name}"


@pytest.fixture(scope="session")
def image_cache() -> str:
    return default_cache_dir()


@pytest.fixture(scope="session")
def oci_layouts(image_cache: str) -> dict[str, str]:
    """Map each test image name to its cached OCI layout (tags listed in tools/recipes.py)."""
    try:
        return build_layouts(image_cache, TEST_IMAGES)
    except ToolError as exc:
        pytest.fail(f"building the test images failed: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory,
             oci_layouts: dict[str, str], image_cache: str) -> Iterator[SeededRegistry]:
    """Start the distribution registry on a free loopback port and push every test image."""
    data_dir = str(tmp_path_factory.mktemp("registry") / "data")
    try:
        process = start_registry(data_dir)
    except ToolError as exc:
        pytest.fail(f"starting the registry failed: {exc}", pytrace=False)

    try:
        digests = seed_registry(process.host, image_cache)
    except ToolError as exc:
        process.stop()
        pytest.fail(f"pushing the test images failed: {exc}", pytrace=False)

    try:
        yield SeededRegistry(process, digests)
    finally:
        process.stop()


@pytest.fixture
def store_root(tmp_path: Path) -> str:
    """An empty lstore root directory for one test."""
    root = os.path.join(tmp_path, "lstore-root")
    os.mkdir(root)
    return root


class LstoreCli:
    """Run `python -m lstore.cli --root ROOT ...` as a subprocess, as a user would."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __call__(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT,
                 stdin: str | None = None, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
        """Run one command; with `check`, fail the test (showing the output) on a nonzero exit."""
        command = [sys.executable, "-m", "lstore.cli", "--root", self.root, *args]
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False,
                              timeout=timeout, env={**os.environ, **(env or {})})
        if check and done.returncode != 0:
            pytest.fail(f"lstore {' '.join(args)} exited with {done.returncode}\n"
                        f"--- stdout ---\n{done.stdout}--- stderr ---\n{done.stderr}",
                        pytrace=False)
        return done

    def fails(self, *args: str, **options: object) -> subprocess.CompletedProcess[str]:
        """Run a command that must fail; fail the test if it exits 0."""
        done = self(*args, check=False, **options)  # type: ignore[arg-type]
        if done.returncode == 0:
            pytest.fail(f"lstore {' '.join(args)} succeeded but was expected to fail\n"
                        f"--- stdout ---\n{done.stdout}", pytrace=False)
        return done


@pytest.fixture
def lstore(store_root: str) -> LstoreCli:
    """The lstore CLI bound to this test's `store_root`."""
    return LstoreCli(store_root)
