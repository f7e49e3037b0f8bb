"""Platforms (`linux/arm64`, `linux/arm/v7`) and the choice of one manifest from an index.

Names are normalised as containerd's `platforms` package does, so `aarch64`, `arm64/v8` and
`arm64` are the same platform, `x86_64` is `amd64`, and `arm` without a variant is `arm/v7`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lstore.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from lstore.store.manifest import Descriptor

# Build tools store provenance and SBOM attestations in an index as extra manifests with this
# annotation and the platform unknown/unknown. They are not images.
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
UNKNOWN = "unknown"

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "armhf": "arm",
    "armel": "arm",
    "armv5l": "arm",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
}
# Variants implied by an architecture alias.
_ALIAS_VARIANTS = {
    "armhf": "v7",
    "armel": "v6",
    "armv5l": "v5",
    "armv6l": "v6",
    "armv7l": "v7",
    "armv8l": "v8",
}
# Variants an architecture falls back to, best first. A CPU of one variant runs the code of
# every variant after it in its list. The empty variant is the baseline (amd64 v1, arm64 v8).
_VARIANT_FALLBACKS = {
    "arm": ("v8", "v7", "v6", "v5"),
    "amd64": ("v4", "v3", "v2", ""),
}
# The variant that containerd writes as empty for these architectures.
_DEFAULT_VARIANTS = {"arm64": "v8", "amd64": "v1"}

_KNOWN_OSES = {"linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris"}
# Architectures as Go's GOARCH names them, which image configs use (OCI image-spec
# config.md refers to GOARCH values).
_KNOWN_ARCHITECTURES = {
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le",
    "ppc64", "ppc64le", "riscv64", "s390x", "wasm",
}  # fmt: skip
_EXPECTED_FORM = "expected os/architecture[/variant], such as linux/arm64 or linux/arm/v7"


@dataclass(frozen=True)
class Platform:
    """An OS, CPU architecture and variant, as in an OCI index entry.

    The fields are normalised on construction, so `Platform("linux", "aarch64", "v8")` equals
    `Platform("linux", "arm64")` and `Platform("linux", "arm")` equals
    `Platform("linux", "arm", "v7")`.
    """

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __post_init__(self) -> None:
        os_name, architecture, variant = _normalize(self.os, self.architecture, self.variant)
        object.__setattr__(self, "os", os_name)
        object.__setattr__(self, "architecture", architecture)
        object.__setattr__(self, "variant", variant)

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        if self.variant:
            text += "/" + self.variant
        if self.os_version:
            text += " " + self.os_version
        return text


def _normalize(os_name: str, architecture: str, variant: str) -> tuple[str, str, str]:
    os_name = os_name.lower()
    if os_name == "macos":
        os_name = "darwin"
    alias = architecture.lower()
    architecture = _ARCH_ALIASES.get(alias, alias)
    variant = variant.lower() or _ALIAS_VARIANTS.get(alias, "")

    if variant.isdigit():
        variant = "v" + variant
    if architecture == "arm" and not variant:
        variant = "v7"
    if _DEFAULT_VARIANTS.get(architecture) == variant:
        variant = ""
    return os_name, architecture, variant


def parse_platform(text: str) -> Platform:
    """Parse `os/architecture[/variant]`, or a lone architecture or OS as containerd does."""
    parts = text.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgumentError(f"invalid platform {text!r}: {_EXPECTED_FORM}")

    if len(parts) == 1:
        host = host_platform()
        if parts[0].lower() in _KNOWN_OSES:
            return Platform(parts[0], host.architecture, host.variant)
        platform = Platform(host.os, parts[0])
    else:
        platform = Platform(*parts)
    if platform.os not in _KNOWN_OSES or platform.architecture not in _KNOWN_ARCHITECTURES:
        raise InvalidArgumentError(
            f"invalid platform {text!r}: unknown operating system or architecture; "
            f"{_EXPECTED_FORM}"
        )
    return platform


def host_platform() -> Platform:
    """Return the platform of this machine, from the kernel's machine name."""
    machine = os.uname().machine
    os_name = os.uname().sysname
    return Platform(os_name, machine)


def is_attestation(descriptor: "Descriptor") -> bool:
    """Tell whether an index entry is an attestation manifest rather than an image."""
    if ATTESTATION_ANNOTATION in descriptor.annotations:
        return True
    platform = descriptor.platform
    return platform is not None and UNKNOWN in (platform.os, platform.architecture)


def select_manifest(
    descriptors: Sequence["Descriptor"], platform: Platform, *, ref: str | None = None
) -> "Descriptor":
    """Choose the index entry to pull for `platform`.

    The policy, in order:
    1. Attestation entries and windows entries are never chosen.
    2. An entry whose OS, architecture and variant equal the request's wins.
    3. Otherwise the best compatible lower variant of the same architecture wins: a request
       for arm/v7 takes v7, then v6, then v5, and amd64/v3 takes v3, v2, then v1. Never a
       higher variant, and never another architecture (arm64 does not fall back to arm).
    4. Entries without a platform are taken only when nothing matched by platform.
    Among equal candidates the first in index order wins.

    Raise NotFoundError listing the available platforms when nothing matches.
    """
    candidates = [d for d in descriptors if _is_runnable(d)]
    compatible = _compatible_variants(platform)
    best: "Descriptor | None" = None
    best_rank = len(compatible)

    for descriptor in candidates:
        rank = _variant_rank(descriptor.platform, platform, compatible)
        if rank is not None and rank < best_rank:
            best, best_rank = descriptor, rank
    if best is not None:
        return best

    unlabelled = [d for d in candidates if d.platform is None]
    if unlabelled:
        return unlabelled[0]
    raise _no_match(descriptors, platform, ref)


def _is_runnable(descriptor: "Descriptor") -> bool:
    if is_attestation(descriptor):
        return False
    return descriptor.platform is None or descriptor.platform.os != "windows"


def _compatible_variants(platform: Platform) -> tuple[str, ...]:
    """Return the variants that can run on `platform`, the requested one first."""
    order = _VARIANT_FALLBACKS.get(platform.architecture)
    if order is None or platform.variant not in order:
        return (platform.variant,)
    return order[order.index(platform.variant) :]


def _variant_rank(
    offered: Platform | None, requested: Platform, compatible: tuple[str, ...]
) -> int | None:
    if offered is None:
        return None
    if (offered.os, offered.architecture) != (requested.os, requested.architecture):
        return None
    if offered.variant not in compatible:
        return None
    return compatible.index(offered.variant)


def _no_match(
    descriptors: Iterable["Descriptor"], platform: Platform, ref: str | None
) -> NotFoundError:
    available = [
        str(d.platform) for d in descriptors if d.platform is not None and not is_attestation(d)
    ]
    where = f" in {ref}" if ref else ""
    listed = ", ".join(available) or "none"
    return NotFoundError(
        f"no manifest for platform {platform}{where}: available platforms are {listed}; "
        "pass --platform with one of them",
        ref=ref,
    )
