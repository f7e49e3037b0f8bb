"""The benchmark harness: shaping proxy, timing, containerd daemon, trace reading, report,
row selection and `lstore bench` against the real registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import tomllib

import pytest
from lstore.bench.containerd import DISABLED_PLUGINS, ContainerdDaemon, ContainerdPaths
from lstore.bench.containerd import containerd_config
from lstore.bench.machine import Machine, filesystem_of
from lstore.bench.mounts import mount_points_below
from lstore.bench.procs import SampleError, run_timed
from lstore.bench.report import ChartInfo, RunInfo, format_series, render_page, table_lines
from lstore.bench.report import write_page
from lstore.bench.results import Row, Series
from lstore.bench.rows import row_specs
from lstore.bench.run import select_rows
from lstore.bench.shaper import LinkProfile, ShapingProxy, TokenBucket
from lstore.bench.tracefile import (
    TraceFormatError,
    read_trace,
    summarize_stages,
    throughput_series,
)

MB = 1_000_000


# The shaping proxy, driven through real sockets on loopback.

async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    received = 0
    while data := await reader.read(65536):
        received += len(data)
    writer.write(str(received).encode())
    await writer.drain()
    writer.close()


async def _through_proxy(handler, profile: LinkProfile, client) -> object:
    """Start `handler` as a server behind a ShapingProxy and run `client(host, port)`."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = ShapingProxy(f"127.0.0.1:{port}", profile)
    host, proxy_port = (await proxy.start()).split(":")
    try:
        return await client(host, int(proxy_port))
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def _round_trip(host: str, port: int) -> float:
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(b"ping")
    await reader.readexactly(4)
    elapsed = time.monotonic() - started
    writer.close()
    return elapsed


def _send_all(nbytes: int):
    async def client(host: str, port: int) -> tuple[float, int]:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        writer.write(b"x" * nbytes)
        await writer.drain()
        writer.write_eof()
        received = int(await reader.read())
        return time.monotonic() - started, received
    return client


def test_shaper_delays_each_direction():
    profile = LinkProfile(round_trip=0.1, rate=100 * MB)
    elapsed = asyncio.run(_through_proxy(_echo, profile, _round_trip))
    assert elapsed >= 0.1
    assert elapsed < 0.1 + 0.08


def test_shaper_caps_rate_of_a_connection():
    profile = LinkProfile(round_trip=0.0, rate=3 * MB, burst=64 << 10)
    elapsed, received = asyncio.run(_through_proxy(_sink, profile, _send_all(3 * MB // 2)))
    assert received == 3 * MB // 2
    # 1.5 MB at 3 MB/s with a 64 KiB burst allowance needs at least 0.478 s.
    assert elapsed >= (1.5 * MB - (64 << 10)) / (3 * MB)
    assert elapsed < 1.2


def test_shaper_caps_each_connection_separately():
    profile = LinkProfile(round_trip=0.0, rate=3 * MB, burst=64 << 10)

    async def two_at_once(host: str, port: int) -> float:
        started = time.monotonic()
        await asyncio.gather(_send_all(3 * MB // 2)(host, port),
                             _send_all(3 * MB // 2)(host, port))
        return time.monotonic() - started

    elapsed = asyncio.run(_through_proxy(_sink, profile, two_at_once))
    # One shared cap would need 1 s for the 3 MB; separate caps need about 0.5 s.
    assert elapsed < 0.85


def test_shaper_delivers_bytes_intact():
    payload = os.urandom(1 << 20)

    async def echo_back(host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data

    profile = LinkProfile(round_trip=0.01, rate=50 * MB)
    echoed = asyncio.run(_through_proxy(_echo, profile, echo_back))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("target", ["10.0.0.1:80", "example.com:80", "127.0.0.1", "::1:x"])
def test_shaper_rejects_target_off_loopback(target):
    with pytest.raises(ValueError, match="loopback"):
        ShapingProxy(target, LinkProfile())


def test_token_bucket_holds_long_run_rate():
    async def send() -> float:
        bucket = TokenBucket(rate=2 * MB, burst=10_000)
        started = time.monotonic()
        for _ in range(100):
            await bucket.take(10_000)
        return time.monotonic() - started

    # 1 MB at 2 MB/s, minus the initial burst.
    assert asyncio.run(send()) >= (1 * MB - 10_000) / (2 * MB)


# Timing of child processes.

def test_run_timed_reports_child_peak_rss():
    # bytearray() zero-fills its buffer, so every page of it is resident.
    timed = run_timed([sys.executable, "-c", "x = bytearray(120 << 20)"])
    assert timed.ok
    assert timed.max_rss_kib >= 120 << 10


def test_run_timed_measures_wall_time():
    timed = run_timed(["sleep", "0.3"])
    assert timed.seconds >= 0.3
    assert timed.seconds < 2


def test_run_timed_kills_after_timeout():
    timed = run_timed(["sleep", "30"], timeout=0.2)
    assert timed.timed_out
    assert not timed.ok
    assert "timed out" in timed.reason()


def test_failed_check_shows_stderr():
    timed = run_timed(["sh", "-c", "echo 'registry said no' >&2; exit 3"])
    with pytest.raises(SampleError, match=r"pull x: exit code 3: registry said no"):
        timed.check("pull x")


# The containerd daemon.

def test_containerd_config_stays_in_base(tmp_path):
    paths = ContainerdPaths(str(tmp_path))
    config = tomllib.loads(containerd_config(paths))
    assert config["version"] == 2
    assert config["root"] == paths.root
    assert config["state"] == paths.state
    assert config["grpc"]["address"] == paths.socket
    assert config["ttrpc"]["address"].startswith(str(tmp_path))
    assert "io.containerd.grpc.v1.cri" in config["disabled_plugins"]
    assert set(config["disabled_plugins"]) == set(DISABLED_PLUGINS)


def test_containerd_daemon_starts_and_stops(tmp_path):
    daemon = ContainerdDaemon(str(tmp_path / "containerd"))
    daemon.start()
    pid = daemon.pid
    try:
        version = subprocess.run(daemon.ctr("version"), capture_output=True, text=True)
        assert version.returncode == 0, version.stderr
        assert "Server:" in version.stdout
        assert daemon.committed_snapshots() == 0
        assert daemon.peak_rss_kib() > 0
    finally:
        daemon.stop()
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie_free(pid)
    assert os.path.exists(os.path.join(daemon.paths.root, "io.containerd.content.v1.content"))


def _is_zombie_free(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


@pytest.mark.registry
@pytest.mark.root
def test_ctr_run_stays_in_our_cgroups(registry, tmp_path):
    ref = registry.ref("busybox:latest")
    with ContainerdDaemon(str(tmp_path / "containerd")) as daemon:
        daemon.pull(ref)
        argv = daemon.run_argv(ref, f"cgroup-check-{os.getpid()}", ["cat", "/proc/self/cgroup"])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    with open("/proc/self/cgroup") as own_file:
        own = _cgroup_paths(own_file.read())
    inside = _cgroup_paths(done.stdout)
    assert inside.keys() == own.keys()
    for hierarchy, path in inside.items():
        parent = own[hierarchy].rstrip("/") + "/"
        assert path.startswith(parent), f"{hierarchy}: {path} is outside {own[hierarchy]}"


def _cgroup_paths(text: str) -> dict[str, str]:
    """Map "ID:controllers" of each /proc/PID/cgroup line to the cgroup path."""
    entries = (line.rsplit(":", 1) for line in text.splitlines() if line)
    return {hierarchy: path for hierarchy, path in entries}


# Mounts and machine facts.

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /var/tmp/b rw - tmpfs tmpfs rw
41 40 0:36 / /var/tmp/b/root/snap\\0401 rw - overlay overlay rw
42 40 0:37 / /var/tmp/b/root/snap2/rootfs rw - overlay overlay rw
43 22 0:38 / /var/tmp/bc/x rw - tmpfs tmpfs rw
"""


def test_mount_points_below_lists_deepest_first():
    assert mount_points_below("/var/tmp/b", MOUNTINFO) == [
        "/var/tmp/b/root/snap2/rootfs",
        "/var/tmp/b/root/snap 1",
    ]


@pytest.mark.parametrize("path, expected", [
    ("/var/tmp/b/root", "tmpfs on tmpfs"),
    ("/var/tmp/bc/x/y", "tmpfs on tmpfs"),
    ("/var/tmp/bcd", "ext4 on /dev/vda"),
])
def test_filesystem_of_uses_longest_mount(path, expected):
    assert filesystem_of(path, MOUNTINFO) == expected


# Trace reading.

BLOB_A = "sha256:" + "a" * 64
BLOB_B = "sha256:" + "b" * 64
TRACE = [
    (0.0, BLOB_A, "download", "start", 0),
    (0.0, BLOB_A, "connect", "start", 0),
    (0.5, BLOB_A, "download", "progress", 5 * MB),
    (0.6, BLOB_A, "connect", "start", 8 * MB),
    (1.0, BLOB_A, "download", "end", 10 * MB),
    (0.5, BLOB_B, "download", "start", 0),
    (1.5, BLOB_B, "download", "end", 4 * MB),
    (0.2, BLOB_A, "hash", "progress", 1 * MB),
    (1.2, BLOB_A, "hash", "progress", 10 * MB),
    (0.0, BLOB_A, "extract", "start", 0),
    (2.0, BLOB_A, "extract", "end", 30 * MB),
]


def _write_trace(path, events) -> str:
    with open(path, "w") as trace:
        for t, blob, stage, event, nbytes in events:
            trace.write(json.dumps({"t": t, "blob": blob, "stage": stage, "event": event,
                                    "bytes": nbytes}) + "\n")
    return str(path)


def test_stage_summary_unions_overlapping_blobs(tmp_path):
    stages = summarize_stages(read_trace(_write_trace(tmp_path / "t", TRACE)))
    assert stages["download"].nbytes == 14 * MB
    assert stages["download"].seconds == pytest.approx(1.5)
    assert stages["hash"].nbytes == 9 * MB
    assert stages["hash"].rate == pytest.approx(9 * MB)
    assert stages["extract"].rate == pytest.approx(15 * MB)


def test_stage_summary_ignores_marker_stages(tmp_path):
    stages = summarize_stages(read_trace(_write_trace(tmp_path / "t", TRACE)))
    assert "connect" not in stages


def test_download_totals_never_go_backwards(tmp_path):
    # A finished Range request reports its end offset, which may lag the running total.
    events = [(0.0, BLOB_A, "download", "start", 0),
              (0.4, BLOB_A, "download", "progress", 6 * MB),
              (0.5, BLOB_A, "download", "progress", 2 * MB),
              (1.0, BLOB_A, "download", "end", 8 * MB)]
    stages = summarize_stages(read_trace(_write_trace(tmp_path / "t", events)))
    assert stages["download"].nbytes == 8 * MB


def test_throughput_series_keeps_every_byte(tmp_path):
    width = 0.1
    series = throughput_series(read_trace(_write_trace(tmp_path / "t", TRACE)), width)
    for stage, expected in [("download", 14 * MB), ("hash", 9 * MB), ("extract", 30 * MB)]:
        assert sum(rate * width for _, rate in series[stage]) == pytest.approx(expected)


def test_throughput_series_spreads_bytes_over_time(tmp_path):
    series = throughput_series(read_trace(_write_trace(tmp_path / "t", TRACE)), 0.5)
    extract = dict(series["extract"])
    assert extract[0.0] == pytest.approx(15 * MB)
    assert extract[1.5] == pytest.approx(15 * MB)


@pytest.mark.parametrize("line, message", [
    ("not json", "not a trace event"),
    ('{"t": 1, "blob": "b", "stage": "hash"}', "not a trace event"),
    ('{"t": 1, "blob": "b", "stage": "hash", "event": "middle", "bytes": 0}', "unknown event"),
])
def test_bad_trace_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"t": 0, "blob": "b", "stage": "hash", "event": "start", "bytes": 0}\n'
                    + line + "\n")
    with pytest.raises(TraceFormatError, match=f"{path}:2: {message}"):
        read_trace(str(path))


# Results and the report page.

def _row(name: str, lstore: list[float], containerd: list[float], unit: str = "s") -> Row:
    row = Row(name, f"{name} title", unit)
    row.lstore.values.extend(lstore)
    row.containerd.values.extend(containerd)
    return row


def test_row_ratio_compares_medians():
    row = _row("cold", [1.0, 3.0, 2.0], [4.0, 8.0, 5.0, 4.0])
    assert row.lstore.median == 2.0
    assert row.containerd.median == 4.5
    assert row.ratio == pytest.approx(2.0 / 4.5)


def test_row_without_result_has_no_ratio():
    row = _row("run", [1.0], [0.5])
    row.lstore.fail("exit code 1: no runtime")
    assert row.ratio is None


def test_series_keeps_first_failure():
    series = Series()
    series.fail("first")
    series.fail("second")
    assert series.unavailable == "first"


@pytest.mark.parametrize("values, unit, expected", [
    ([1.234, 1.0, 2.5], "s", "1.23 s (1.00–2.50 s)"),
    ([0.5], "s", "0.50 s"),
    ([300.0, 310.0, 290.0], "MiB", "300 MiB (290–310 MiB)"),
])
def test_format_series(values, unit, expected):
    assert format_series(Series(values=values), unit) == expected


def test_table_shows_unavailable_reason_and_ratio():
    cold = _row("cold", [1.0, 1.2, 1.1], [2.0, 2.4, 2.2])
    run = _row("run", [], [0.15])
    run.lstore.fail("lstore run busybox: exit code 1:\n  no such command")
    lines = table_lines([cold, run])
    assert lines[2] == "| cold title | 1.10 s (1.00–1.20 s) | 2.20 s (2.00–2.40 s) | 0.50 |"
    assert lines[3] == ("| run title | unavailable: lstore run busybox: exit code 1: no such "
                        "command | 0.15 s | – |")


def _machine() -> Machine:
    return Machine(cpu="Test CPU", cores=2, memory_gib=8.0, kernel="6.1", filesystem="ext4",
                   python="3.11.7", containerd="containerd 1.6.20", runc="runc 1.1.5",
                   lstore_commit="abc123")


def test_page_has_table_machine_and_chart(tmp_path):
    run = RunInfo(command="python -m lstore.bench.run --runs 3", date="2026-01-02", runs=3,
                  big_runs=2, wan_profile="40 ms round trip, 20 MB/s per connection")
    row = _row("cold", [1.0], [2.0])
    row.notes.append("containerd unpacked 3 overlayfs snapshots")
    page = render_page([row], _machine(), run, ChartInfo("chart.png", "Caption text."))
    assert "`python -m lstore.bench.run --runs 3` on 2026-01-02" in page
    assert "| cold title | 1.00 s | 2.00 s | 0.50 |" in page
    assert "| CPU | Test CPU, 2 cores |" in page
    assert "| containerd | containerd 1.6.20 |" in page
    assert "![Throughput per stage of one pull](chart.png)" in page
    assert "- cold title: containerd unpacked 3 overlayfs snapshots" in page
    assert "40 ms round trip" in page


def test_page_says_why_chart_is_missing():
    run = RunInfo("cmd", "2026-01-02", 1, 1, "wan")
    page = render_page([], _machine(), run, ChartInfo(None, "Chart skipped: no trace."))
    assert "Chart skipped: no trace." in page
    assert "![" not in page


def test_write_page_replaces_file(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("old")
    write_page(str(path), "new page\n")
    assert path.read_text() == "new page\n"
    assert os.listdir(tmp_path) == ["benchmarks.md"]


# Row selection.

SPECS = row_specs(LinkProfile())


def test_default_rows_leave_out_big():
    names = [spec.name for spec in select_rows(SPECS, None, with_big=False)]
    assert names == ["cold-gzip", "cold-zstd", "warm", "wan", "prewarm", "run"]


def test_with_big_adds_big_rows():
    names = [spec.name for spec in select_rows(SPECS, None, with_big=True)]
    assert names[-1] == "big"


def test_rows_keep_fixed_order():
    names = [spec.name for spec in select_rows(SPECS, ["run", "cold-gzip"], with_big=False)]
    assert names == ["cold-gzip", "run"]


@pytest.mark.parametrize("names, with_big, message", [
    (["cold"], False, "unknown row cold"),
    (["big"], False, "needs --with-big"),
])
def test_bad_row_selection_is_rejected(names, with_big, message):
    with pytest.raises(ValueError, match=message):
        select_rows(SPECS, names, with_big)


# `lstore bench` against the real registry.

@pytest.mark.registry
def test_lstore_bench_reports_stages_and_range(registry, lstore):
    done = lstore("bench", "--runs", "2", "--json", "--plain-http",
                  registry.ref("debian-nginx:oci"))
    result = json.loads(done.stdout)
    assert result["runs"] == 2
    assert result["range"]["honoured"] is True
    assert result["range"]["status"] == 206
    assert result["range"]["content_range"] == f"bytes 0-1023/{result['range']['layer_size']}"
    assert result["bytes_fetched"] > 10 * MB
    for stage in ("network", "hash", "extract"):
        assert result["stages_mb_per_s"][stage]["median"] > 0
    assert result["seconds"]["min"] <= result["seconds"]["median"] <= result["seconds"]["max"]


@pytest.mark.registry
def test_lstore_bench_removes_scratch_stores(registry, lstore):
    parent = os.path.dirname(lstore.root)
    lstore("bench", "--runs", "1", "--plain-http", registry.ref("busybox:latest"))
    assert [name for name in os.listdir(parent) if name.startswith(".lstore-bench-")] == []
    assert os.listdir(lstore.root) == []


@pytest.mark.registry
def test_lstore_bench_text_output(registry, lstore):
    done = lstore("bench", "--runs", "1", "--plain-http", registry.ref("busybox:latest"))
    assert "Range requests: honoured (status 206" in done.stdout
    assert "network" in done.stdout


@pytest.mark.registry
def test_lstore_bench_unknown_tag_fails(registry, lstore):
    ref = registry.ref("busybox:no-such-tag")
    done = lstore.fails("bench", "--runs", "1", "--plain-http", ref)
    assert ref in done.stderr or "no-such-tag" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_lstore_bench_rejects_zero_runs(lstore):
    done = lstore.fails("bench", "--runs", "0", "127.0.0.1:1/x:y")
    assert "--runs must be at least 1, not 0" in done.stderr
