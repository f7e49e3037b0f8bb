"""`lstore bench`: time repeated pulls of an image from a registry or mirror.

Each run pulls into a fresh scratch store with `lstore pull --json --trace`, so every run
downloads and unpacks everything. The throughput of each stage comes from the trace, and a
single Range request for the largest layer shows whether the registry honours Range, which
lstore needs to fetch large blobs over parallel connections and to resume.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lstore.bench.procs import Timed, run_timed
from lstore.bench.results import Series
from lstore.bench.tracefile import REPORTED_STAGES, read_trace, summarize_stages
from lstore.errors import LstoreError
from lstore.store.manifest import Descriptor
from lstore.store.reference import Reference, parse_reference

log = logging.getLogger(__name__)

# The probe requests the first KiB. A registry that supports Range serves it from the same
# storage path as a large range, and the body is too small to matter.
PROBE_RANGE = (0, 1023)


@dataclass(frozen=True)
class RangeProbe:
    """The response to `Range: bytes=0-1023` on the largest layer of the image."""

    layer: str
    layer_size: int
    status: int
    content_range: str | None

    @property
    def expected_content_range(self) -> str:
        last = min(PROBE_RANGE[1], self.layer_size - 1)
        return f"bytes {PROBE_RANGE[0]}-{last}/{self.layer_size}"

    @property
    def honoured(self) -> bool:
        """True when the registry sent 206 with exactly the requested range (RFC 9110
        section 14.4). A 200 means it ignored Range and sent the whole blob."""
        return self.status == 206 and self.content_range == self.expected_content_range

    def describe(self) -> str:
        verdict = "honoured" if self.honoured else "NOT honoured"
        detail = f"status {self.status}"
        if self.content_range:
            detail += f", Content-Range: {self.content_range}"
        return f"{verdict} ({detail}; largest layer {self.layer}, {self.layer_size} bytes)"


@dataclass
class PullBench:
    """The results of benchmarking one reference: wall time per pull and stage rates."""

    ref: str
    runs: int
    bytes_fetched: int = 0
    seconds: Series = field(default_factory=Series)
    stage_rates: dict[str, Series] = field(default_factory=dict)
    range_probe: RangeProbe | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "runs": self.runs,
            "bytes_fetched": self.bytes_fetched,
            "seconds": _spread(self.seconds),
            "stages_mb_per_s": {name: _spread(series, 1e-6)
                                for name, series in self.stage_rates.items()},
            "range": None if self.range_probe is None else {
                "honoured": self.range_probe.honoured,
                "status": self.range_probe.status,
                "content_range": self.range_probe.content_range,
                "layer": self.range_probe.layer,
                "layer_size": self.range_probe.layer_size,
            },
        }


def _spread(series: Series, scale: float = 1.0) -> dict[str, float]:
    return {"median": round(series.median * scale, 3), "min": round(series.low * scale, 3),
            "max": round(series.high * scale, 3)}


def scratch_parent(store_root: str) -> str:
    """Return where scratch stores go: beside the store root, so the pulls write to the disk
    the store uses, or $TMPDIR when that directory is missing or read-only."""
    parent = os.path.dirname(os.path.abspath(store_root))
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        return parent
    return tempfile.gettempdir()


@contextmanager
def scratch_directory(store_root: str) -> Iterator[str]:
    """Create a scratch directory for the runs and remove it afterwards, even on error."""
    path = tempfile.mkdtemp(prefix=".lstore-bench-", dir=scratch_parent(store_root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_pulls(text: str, runs: int, *, store_root: str, plain_http: bool = False,
                platform: str | None = None) -> PullBench:
    """Pull `text` `runs` times into empty scratch stores and probe its Range support.

    Raises InvalidReferenceError for a bad reference and LstoreError naming the reference
    when a pull fails. Leaves nothing behind: the scratch stores are deleted.
    """
    ref = parse_reference(text)
    result = PullBench(str(ref), runs)
    result.range_probe = probe_range(ref, plain_http=plain_http, platform=platform)
    with scratch_directory(store_root) as scratch:
        for run in range(runs):
            _record_run(result, _pull_once(text, scratch, run, plain_http, platform), scratch)
    return result


def _pull_once(text: str, scratch: str, run: int, plain_http: bool,
               platform: str | None) -> Timed:
    root = os.path.join(scratch, f"store-{run}")
    trace = os.path.join(scratch, f"trace-{run}.jsonl")
    options = ["--plain-http"] if plain_http else []
    options += ["--platform", platform] if platform else []
    argv = [sys.executable, "-m", "lstore.cli", "--root", root, "pull", "--json",
            "--trace", trace, *options, text]
    timed = run_timed(argv)
    shutil.rmtree(root, ignore_errors=True)
    if not timed.ok:
        raise LstoreError(f"bench: pull {text} failed in run {run + 1}: {timed.reason()}",
                          ref=text)
    return timed


def _record_run(result: PullBench, timed: Timed, scratch: str) -> None:
    summary = json.loads(timed.stdout.splitlines()[-1])
    result.bytes_fetched = int(summary["bytes_fetched"])
    result.seconds.add(float(summary["seconds"]))

    run = len(result.seconds.values) - 1
    trace_path = os.path.join(scratch, f"trace-{run}.jsonl")
    stages = summarize_stages(read_trace(trace_path))
    for stage, name in REPORTED_STAGES.items():
        if stage in stages and stages[stage].seconds > 0:
            result.stage_rates.setdefault(name, Series()).add(stages[stage].rate)


def probe_range(ref: Reference, *, plain_http: bool, platform: str | None) -> RangeProbe:
    """Resolve `ref` and request the first KiB of its largest layer with a Range header."""
    try:
        import uvloop
    except ImportError:  # the default event loop works too, only slower
        return asyncio.run(_probe(ref, plain_http, platform))
    return uvloop.run(_probe(ref, plain_http, platform))


async def _probe(ref: Reference, plain_http: bool, platform: str | None) -> RangeProbe:
    from lstore.store.platform import host_platform, parse_platform
    from lstore.store.registry.client import RegistryClient
    from lstore.store.registry.settings import RegistrySettings

    settings = RegistrySettings.from_environment(plain_http=plain_http)
    wanted = parse_platform(platform) if platform else host_platform()
    async with RegistryClient(settings) as client:
        resolved = await client.resolve(ref, wanted)
        layer = _largest_layer(ref, resolved.manifest.layers)
        first, last = PROBE_RANGE
        response = await client.exchange(
            ref, client.blob_path(ref, layer.digest), headers={"Range": f"bytes={first}-{last}"},
            action=f"GET blob {layer.digest} of {ref} with Range", digest=layer.digest)
        try:
            return RangeProbe(layer.digest, layer.size, response.status,
                              response.headers.get("Content-Range"))
        finally:
            response.release()


def _largest_layer(ref: Reference, layers: list[Descriptor]) -> Descriptor:
    if not layers:
        raise LstoreError(f"bench: image {ref} has no layers to probe for Range support",
                          ref=str(ref))
    return max(layers, key=lambda layer: layer.size)
