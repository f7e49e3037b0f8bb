"""Microbenchmark: extract an uncompressed synthetic layer into an empty directory.

    python -m pytest bench/ --benchmark-only
"""

from __future__ import annotations

import io
import itertools
import os

import pytest

from lstore.bench.synthetic import SyntheticLayer, build_layer
from lstore.store.unpack import unpack_layer


@pytest.fixture(scope="module")
def layer() -> SyntheticLayer:
    return build_layer()


def test_extract_uncompressed_layer(benchmark, layer, tmp_path):
    counter = itertools.count()

    def fresh_directory() -> tuple[tuple[object, ...], dict[str, object]]:
        dest = tmp_path / f"dest{next(counter)}"
        os.mkdir(dest)
        # Write back the previous round's files now, so their writeback is not timed.
        os.sync()
        return (io.BytesIO(layer.tar), "none", str(dest)), {"layer_digest": layer.diff_id}

    result = benchmark.pedantic(unpack_layer, setup=fresh_directory, rounds=5)

    assert result.diff_id == layer.diff_id
    assert result.size == len(layer.tar)
