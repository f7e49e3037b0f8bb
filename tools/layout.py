"""An OCI image layout on disk, changed through umoci.

umoci computes each new layer by comparing the unpacked rootfs with the mtree manifest it
recorded at unpack time, so deleted files become whiteouts and only changed entries are
stored. It cannot write image indexes, so `add_index` writes that blob itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lstore.store.digest import OCI_INDEX, OCI_MANIFEST, Digest
from lstore.tools.command import ToolError, run

# A fixed creation time keeps image configs and history stable between rebuilds.
CREATED = "2024-01-01T00:00:00Z"

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class PlatformManifest:
    """One manifest of a multi-platform index, named by its tag in the layout."""

    tag: str
    architecture: str
    variant: str = ""


class OciLayout:
    """An OCI image layout directory (OCI image-spec image-layout.md) with tagged images."""

    def __init__(self, path: str) -> None:
        self.path = path

    def image(self, tag: str) -> str:
        return f"{self.path}:{tag}"

    def init(self) -> None:
        run(["umoci", "init", "--layout", self.path])

    def new(self, tag: str, architecture: str, options: Sequence[str] = ()) -> None:
        """Create an empty image `tag` for linux/`architecture` with a fixed creation time.

        `options` are further `umoci config` options, such as the command and environment.
        """
        run(["umoci", "new", "--image", self.image(tag)])
        self.configure(tag, ["--architecture", architecture, "--os", "linux", *options])

    def configure(self, tag: str, options: Sequence[str]) -> None:
        """Apply `umoci config` options to image `tag` in place."""
        run(["umoci", "config", "--image", self.image(tag), "--created", CREATED,
             "--history.created", CREATED, *options])

    def unpack(self, tag: str, bundle: str) -> str:
        """Unpack image `tag` into the new directory `bundle` and return its rootfs path."""
        run(["umoci", "unpack", "--image", self.image(tag), bundle])
        return os.path.join(bundle, "rootfs")

    def repack(self, bundle: str, tag: str, created_by: str) -> None:
        """Store the changes made under `bundle` as a new layer on top, tagged `tag`.

        The bundle is refreshed, so a later repack adds only the changes made after this one.
        """
        run(["umoci", "repack", "--refresh-bundle", "--image", self.image(tag),
             "--history.created", CREATED, "--history.created_by", created_by, bundle])

    def add_layer(self, tag: str, new_tag: str, layer_tar: str, created_by: str) -> None:
        """Append the uncompressed tar `layer_tar` verbatim to image `tag` as `new_tag`."""
        run(["umoci", "raw", "add-layer", "--image", self.image(tag), "--tag", new_tag,
             "--history.created", CREATED, "--history.created_by", created_by, layer_tar])

    def add_zstd_copy(self, tag: str, new_tag: str, scratch_dir: str) -> None:
        """Tag as `new_tag` a copy of image or index `tag` whose layers are zstd-compressed.

        skopeo reuses any blob that already exists at the destination instead of
        recompressing it, so it recompresses into the empty layout `scratch_dir` first and
        then copies the result back unchanged.
        """
        scratch = f"oci:{scratch_dir}:{new_tag}"
        skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet", "--all"]
        run([*skopeo, "--dest-compress-format", "zstd", f"oci:{self.image(tag)}", scratch])
        run([*skopeo, "--preserve-digests", scratch, f"oci:{self.image(new_tag)}"])

    def remove_unused_blobs(self) -> None:
        """Delete the blobs that no tag reaches, such as the configs of superseded images."""
        run(["umoci", "gc", "--layout", self.path])

    def manifest_descriptor(self, tag: str) -> dict[str, Any]:
        """Return the descriptor that index.json holds for `tag`."""
        for descriptor in self._read_index()["manifests"]:
            if descriptor.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
                return dict(descriptor)
        raise ToolError(f"tag {tag!r} not found in {self.path}/index.json", path=self.path)

    def add_index(self, tag: str, platforms: Sequence[PlatformManifest]) -> Digest:
        """Write an image index over the platform images and tag it `tag`; return its digest.

        Each platform image must already be tagged in this layout.
        """
        manifests = [self._platform_descriptor(p) for p in platforms]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        data = json.dumps(index, indent=2).encode()
        digest = self._write_blob(data)

        layout_index = self._read_index()
        layout_index["manifests"] = [
            d for d in layout_index["manifests"]
            if d.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
        ]
        layout_index["manifests"].append({
            "mediaType": OCI_INDEX, "digest": digest, "size": len(data),
            "annotations": {REF_NAME_ANNOTATION: tag},
        })
        self._write_index(layout_index)
        return digest

    def _platform_descriptor(self, platform: PlatformManifest) -> dict[str, Any]:
        source = self.manifest_descriptor(platform.tag)
        entry: dict[str, object] = {"architecture": platform.architecture, "os": "linux"}
        if platform.variant:
            entry["variant"] = platform.variant
        return {"mediaType": OCI_MANIFEST, "digest": source["digest"], "size": source["size"],
                "platform": entry}

    def _write_blob(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        path = os.path.join(self.path, "blobs", digest.algorithm, digest.hex)
        with open(path + ".tmp", "wb") as blob:
            blob.write(data)
        os.replace(path + ".tmp", path)
        return digest

    def _read_index(self) -> dict[str, Any]:
        with open(os.path.join(self.path, "index.json")) as index_file:
            return json.load(index_file)  # type: ignore[no-any-return]

    def _write_index(self, index: dict[str, Any]) -> None:
        path = os.path.join(self.path, "index.json")
        with open(path + ".tmp", "w") as index_file:
            json.dump(index, index_file)
        os.replace(path + ".tmp", path)
