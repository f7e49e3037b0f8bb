"""The benchmark rows: each times one operation for lstore and containerd in the same run.

Every sample of a cold row starts from `BenchEnv.make_cold()`, and the tools alternate which
goes first, so neither benefits from the other's leftovers or from running later.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from lstore.bench.contenders import ContainerdTool, Contender
from lstore.bench.environment import BenchEnv
from lstore.bench.procs import SampleError
from lstore.bench.results import Row
from lstore.bench.shaper import LinkProfile

log = logging.getLogger(__name__)

GZIP_IMAGE = "debian-nginx:oci"
ZSTD_IMAGE = "debian-nginx:zstd"
RUN_IMAGE = "busybox:latest"
BIG_IMAGE = "big:latest"
# Images that share debian-nginx's base layers, pulled one after another as a node pre-warm
# script would. The v2s2 tag has the same layer blobs as the OCI tag, the zstd tag has the
# same layer contents (diffIDs) in other blobs, and busybox shares nothing.
PREWARM_IMAGES = (GZIP_IMAGE, "debian-nginx:v2s2", ZSTD_IMAGE, RUN_IMAGE)

_KIB_PER_MIB = 1024


@dataclass(frozen=True)
class RowSpec:
    """A row the runner can select by name; `needs_big` rows run only with --with-big."""

    name: str
    measure: Callable[[BenchEnv, int], list[Row]]
    needs_big: bool = False


def measure_cold_gzip(env: BenchEnv, runs: int) -> list[Row]:
    return [_cold_pull(env, runs, "cold-gzip", f"cold pull {GZIP_IMAGE} (gzip)", GZIP_IMAGE)]


def measure_cold_zstd(env: BenchEnv, runs: int) -> list[Row]:
    return [_cold_pull(env, runs, "cold-zstd", f"cold pull {ZSTD_IMAGE}", ZSTD_IMAGE)]


def measure_wan(env: BenchEnv, runs: int, profile: LinkProfile) -> list[Row]:
    title = f"cold pull {GZIP_IMAGE} over WAN ({profile.describe()})"
    return [_cold_pull(env, runs, "wan", title, GZIP_IMAGE, host=env.wan_host)]


def _cold_pull(env: BenchEnv, runs: int, name: str, title: str, image: str,
               host: str | None = None) -> Row:
    row = Row(name, title)
    ref = env.ref(image, host)
    for sample in range(runs):
        for tool in env.ordered(sample):
            env.make_cold()
            _take(row, tool, lambda: _checked_cold_pull(row, tool, ref))
    return row


def _checked_cold_pull(row: Row, tool: Contender, ref: str) -> float:
    """Pull into an empty store; check that containerd unpacked, as lstore always does."""
    timed = tool.pull(ref)
    if isinstance(tool, ContainerdTool):
        _note_snapshots(row, tool)
    else:
        _note_once(row, tool.describe_pull(timed))
    return timed.seconds


def _note_snapshots(row: Row, tool: ContainerdTool) -> None:
    snapshots = tool.daemon.committed_snapshots()
    if snapshots == 0:
        raise SampleError("ctr images pull left no committed snapshot: it did not unpack")
    _note_once(row, f"containerd unpacked {snapshots} overlayfs snapshots")


def measure_warm(env: BenchEnv, runs: int) -> list[Row]:
    """Pull an image that is already complete in both stores."""
    row = Row("warm", f"warm pull {GZIP_IMAGE} (all present)")
    ref = env.ref(GZIP_IMAGE)
    env.make_cold()
    for tool in env.ordered(0):
        _prepare(row, tool, lambda: tool.pull(ref))

    for sample in range(runs):
        for tool in env.ordered(sample):
            _take(row, tool, lambda: tool.pull(ref).seconds)
    return [row]


def measure_prewarm(env: BenchEnv, runs: int) -> list[Row]:
    """Pull several images that share a base into empty stores, one command each."""
    names = ", ".join(PREWARM_IMAGES)
    row = Row("prewarm", f"pre-warm {len(PREWARM_IMAGES)} images, cold ({names})")
    for sample in range(runs):
        for tool in env.ordered(sample):
            env.make_cold()
            _take(row, tool, lambda: sum(tool.pull(env.ref(i)).seconds for i in PREWARM_IMAGES))
    return [row]


def measure_run(env: BenchEnv, runs: int) -> list[Row]:
    """Start a container that runs `true`, with no network, and remove it."""
    row = Row("run", f"run --rm {RUN_IMAGE} true (no network)")
    ref = env.ref(RUN_IMAGE)
    for tool in env.ordered(0):
        _prepare(row, tool, lambda: tool.pull(ref))

    for sample in range(runs):
        for tool in env.ordered(sample):
            name = f"lstore-bench-{os.getpid()}-{sample}"
            _take(row, tool, lambda: tool.run(ref, name).seconds)
    return [row]


def measure_big(env: BenchEnv, runs: int) -> list[Row]:
    """Cold pull of the largest image: wall time, and peak memory of everything that pulled."""
    time_row = Row("big", f"cold pull {BIG_IMAGE}")
    memory_row = Row("big-rss", f"peak RSS during cold pull of {BIG_IMAGE}", unit="MiB")
    ref = env.ref(BIG_IMAGE)
    for sample in range(runs):
        for tool in env.ordered(sample):
            env.make_cold()
            _take(time_row, tool, lambda: _big_pull(time_row, memory_row, tool, ref))

    for name, series in time_row.series.items():
        if series.unavailable is not None:
            memory_row.series[name].fail(series.unavailable)
    return [time_row, memory_row]


def _big_pull(time_row: Row, memory_row: Row, tool: Contender, ref: str) -> float:
    timed = tool.pull(ref)
    peak_kib = timed.max_rss_kib
    if isinstance(tool, ContainerdTool):
        _note_snapshots(time_row, tool)
        peak_kib += tool.daemon.peak_rss_kib()
    else:
        _note_once(time_row, tool.describe_pull(timed))
    memory_row.series[tool.name].add(peak_kib / _KIB_PER_MIB)
    return timed.seconds


def _take(row: Row, tool: Contender, measure: Callable[[], float]) -> None:
    """Add one sample of `tool` to `row`; a failure makes the tool unavailable in the row."""
    series = row.series[tool.name]
    if series.unavailable is not None:
        return
    try:
        value = measure()
    except SampleError as error:
        log.warning("%s: %s unavailable: %s", row.name, tool.name, error)
        series.fail(str(error))
        return
    log.info("%s: %s %.2f %s", row.name, tool.name, value, row.unit)
    series.add(value)


def _prepare(row: Row, tool: Contender, action: Callable[[], object]) -> None:
    """Run an untimed setup step; its failure makes the tool unavailable in the row."""
    try:
        action()
    except SampleError as error:
        log.warning("%s: setup for %s failed: %s", row.name, tool.name, error)
        row.series[tool.name].fail(f"setup failed: {error}")


def _note_once(row: Row, note: str) -> None:
    if note not in row.notes:
        row.notes.append(note)


def row_specs(profile: LinkProfile) -> list[RowSpec]:
    """Return every row in the order the runner measures and prints them."""
    return [
        RowSpec("cold-gzip", measure_cold_gzip),
        RowSpec("cold-zstd", measure_cold_zstd),
        RowSpec("warm", measure_warm),
        RowSpec("wan", lambda env, runs: measure_wan(env, runs, profile)),
        RowSpec("prewarm", measure_prewarm),
        RowSpec("run", measure_run),
        RowSpec("big", measure_big, needs_big=True),
    ]
