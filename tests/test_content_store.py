"""Content store, snapshots, gc and check on a temporary store root."""

from __future__ import annotations

import os
import stat

import pytest

from lstore.errors import IntegrityError
from lstore.store.digest import Digest, chain_ids
from lstore.store.images import ImageRecord
from lstore.store.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "root"))


def test_small_blob_commits_read_only(store):
    data = b'{"hello": "world"}'
    digest = Digest.of_bytes(data)

    store.content.write(data, digest, "application/json")

    assert store.content.has(digest)
    assert store.content.read(digest) == data
    mode = os.stat(store.content.blob_path(digest)).st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_blob_with_wrong_bytes_is_not_committed(store):
    digest = Digest.of_bytes(b"expected")

    with pytest.raises(IntegrityError) as info:
        store.content.write(b"tampered", digest, "application/json")

    assert digest in str(info.value)
    assert not store.content.has(digest)
    assert not os.path.exists(store.content.blob_path(digest))


def test_ingest_digest_mismatch_discards_partial(store):
    data = b"x" * 1000
    digest = Digest.of_bytes(b"something else")
    ingest = store.content.open_ingest(digest, len(data))
    ingest.write_at(0, data)
    ingest.close()

    with pytest.raises(IntegrityError):
        store.content.commit_ingest(ingest, Digest.of_bytes(data), "x")

    assert os.listdir(store.content.ingest_dir) == []
    assert store.content.info(digest) is None


def test_snapshot_commit_and_orphans(store):
    temporary = store.snapshots.prepare()
    with open(os.path.join(temporary, "file"), "w") as handle:
        handle.write("content")
    diff_id = Digest.of_bytes(b"layer")

    snapshot = store.snapshots.commit(temporary, diff_id, "", diff_id, 7)

    assert os.path.isfile(os.path.join(snapshot.path, "file"))
    assert store.snapshots.get(diff_id) == snapshot
    os.mkdir(os.path.join(store.snapshots.dir, "tmp-999999999-0"))
    os.mkdir(os.path.join(store.snapshots.dir, "424242"))
    assert store.snapshots.cleanup_orphans(include_numbered=False) == 1
    assert store.snapshots.cleanup_orphans(include_numbered=True) == 1
    assert os.path.isdir(snapshot.path)


def _fake_image(store: Store, name: str, payload: bytes) -> ImageRecord:
    """Record an image whose blobs and snapshot exist, as a pull would leave them."""
    config = b'{"rootfs": {"type": "layers", "diff_ids": []}}'
    manifest = b'{"schemaVersion": 2, "payload": "' + payload + b'"}'
    layer = b"layer-" + payload
    for data in (config, manifest, layer):
        store.content.write(data, Digest.of_bytes(data), "x")
    diff_id = Digest.of_bytes(b"diff-" + payload)
    chain = chain_ids([diff_id])
    store.snapshots.commit(store.snapshots.prepare(), chain[0], "", diff_id, 1)
    record = ImageRecord(
        name=name,
        digest=Digest.of_bytes(manifest),
        media_type="x",
        config_digest=Digest.of_bytes(config),
        index_digest="",
        platform="linux/amd64",
        layers=[{"digest": Digest.of_bytes(layer), "size": len(layer), "media_type": "x"}],
        diff_ids=[diff_id],
        chain_ids=chain,
        created="",
        pulled=0.0,
    )
    store.record_image(record)
    return record


def test_rmi_removes_only_unshared_content(store):
    kept = _fake_image(store, "example.com/kept:1", b"a")
    removed = _fake_image(store, "example.com/gone:1", b"b")

    assert store.remove_image("example.com/gone:1") == ["example.com/gone:1"]

    assert store.content.has(Digest(kept.layers[0]["digest"]))
    assert not store.content.has(Digest(removed.layers[0]["digest"]))
    assert store.snapshots.get(kept.chain_ids[0]) is not None
    assert store.snapshots.get(removed.chain_ids[0]) is None
    assert store.check(verify_content=True).clean


def test_check_reports_missing_blob_file(store):
    image = _fake_image(store, "example.com/app:1", b"c")
    os.unlink(store.content.blob_path(Digest(image.config_digest)))

    report = store.check()

    assert not report.clean
    assert image.config_digest in report.problems[0]


def test_gc_removes_unrecorded_files(store):
    _fake_image(store, "example.com/app:1", b"d")
    stray = os.path.join(store.content.blobs_dir, "sha256", "ab" * 32)
    with open(stray, "wb") as handle:
        handle.write(b"stray")

    report = store.gc()

    assert report.blobs == 1
    assert not os.path.exists(stray)
    assert store.check(verify_content=True).clean


def test_lookup_by_id_prefix(store):
    image = _fake_image(store, "example.com/app:1", b"e")

    found = store.find_image(image.config_digest[7:19])

    assert found is not None
    assert found.name == "example.com/app:1"


def test_rmi_of_one_name_only_untags(store):
    image = _fake_image(store, "example.com/app:1", b"f")
    store.record_image(ImageRecord.from_record("example.com/app:2", image.to_record()))
    with store.meta.write() as txn:
        txn.put("containers", "c" * 64, {"image_digest": image.digest, "chain_ids": []})

    assert store.remove_image("example.com/app:1") == ["example.com/app:1"]

    assert store.find_image("example.com/app:2") is not None
    assert store.df()["images"] == 1
    with pytest.raises(Exception) as caught:
        store.remove_image("example.com/app:2")
    assert "used by container" in str(caught.value)
