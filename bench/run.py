"""Benchmark lstore against containerd side by side in one run and write docs/benchmarks.md.

    python -m lstore.bench.run [--runs N] [--rows cold-gzip,warm,...] [--with-big]

Needs root (it drops the page cache, and both tools mount overlays), containerd, ctr and runc
(tools/setup.sh installs them) and the registry and image tools the tests use. It starts its
own registry, containerd daemon and shaping proxy in a temporary directory, all on
127.0.0.1, and stops them when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from lstore.bench.chart import write_chart
from lstore.bench.containerd import ContainerdDaemon
from lstore.bench.contenders import ContainerdTool, LstoreTool
from lstore.bench.environment import BenchEnv
from lstore.bench.machine import Machine, describe_machine
from lstore.bench.mounts import unmount_below
from lstore.bench.procs import SampleError
from lstore.bench.report import ChartInfo, RunInfo, render_page, table_lines, write_page
from lstore.bench.results import Row
from lstore.bench.rows import GZIP_IMAGE, RowSpec, row_specs
from lstore.bench.shaper import LinkProfile, ShaperThread
from lstore.bench.tracefile import REPORTED_STAGES, TraceEvent, read_trace, summarize_stages
from lstore.tools.command import ToolError, require_tool
from lstore.tools.images import seed_registry
from lstore.tools.registry import start_registry

log = logging.getLogger(__name__)

DOCS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
PAGE_NAME = "benchmarks.md"
CHART_NAME = "benchmarks-pull-trace.png"
# The work directory contains both stores. /var/tmp is on disk where /tmp may be tmpfs,
# and a benchmark on tmpfs would measure memory copies, not storage.
DEFAULT_WORK_PARENT = "/var/tmp"
REQUIRED_TOOLS = ("containerd", "ctr", "runc", "docker-registry", "skopeo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lstore.bench.run",
                                     description="Time lstore and containerd side by side.")
    parser.add_argument("--runs", type=_positive, default=5,
                        help="samples per row and tool; the median is reported (default: 5)")
    parser.add_argument("--rows", type=_names, default=None,
                        help="comma-separated rows to run (default: all): "
                             + ", ".join(spec.name for spec in row_specs(LinkProfile())))
    parser.add_argument("--with-big", action="store_true",
                        help="also push and pull big:latest (1 GB unpacked) and measure "
                             "peak memory")
    parser.add_argument("--big-runs", type=_positive, default=None,
                        help="samples of the big:latest rows (default: the smaller of --runs "
                             "and 2)")
    parser.add_argument("--rtt-ms", type=float, default=40.0,
                        help="round-trip time the WAN proxy adds, in ms (default: 40)")
    parser.add_argument("--rate-mb", type=float, default=20.0,
                        help="WAN proxy cap per connection and direction, in MB/s (default: 20)")
    parser.add_argument("--output", default=DOCS_DIR,
                        help=f"directory for {PAGE_NAME} and the chart (default: {DOCS_DIR})")
    parser.add_argument("--work-dir", default=DEFAULT_WORK_PARENT,
                        help="parent of the temporary directory holding both stores "
                             f"(default: {DEFAULT_WORK_PARENT}); put it on the disk to measure")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (stores, logs, trace) afterwards")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every sample")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def select_rows(specs: list[RowSpec], names: list[str] | None, with_big: bool) -> list[RowSpec]:
    """Return the specs to run, in their fixed order; raise ValueError for a bad selection."""
    known = {spec.name for spec in specs}
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(f"unknown row {', '.join(unknown)}; rows are {', '.join(sorted(known))}")
    if names and not with_big and any(s.needs_big for s in specs if s.name in names):
        raise ValueError("the big row needs --with-big, which pushes big:latest (1 GB unpacked)")
    if names is None:
        return [spec for spec in specs if with_big or not spec.needs_big]
    return [spec for spec in specs if spec.name in names]


def check_prerequisites() -> None:
    """Raise ToolError unless this process is root and every needed program is installed."""
    if os.geteuid() != 0:
        raise ToolError("the benchmark must run as root: it drops the page cache, and both "
                        "tools mount overlays and run containers")
    for tool in REQUIRED_TOOLS:
        require_tool(tool)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="bench: %(levelname)s: %(message)s")
    try:
        specs = select_rows(row_specs(_profile(args)), args.rows, args.with_big)
        check_prerequisites()
    except (ValueError, ToolError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1

    os.makedirs(args.output, exist_ok=True)
    try:
        rows, chart, machine = _measure(args, specs)
    except ToolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    run = RunInfo(command=_command_line(argv), date=datetime.date.today().isoformat(),
                  runs=args.runs, big_runs=_big_runs(args), wan_profile=_profile(args).describe())
    page = os.path.join(args.output, PAGE_NAME)
    write_page(page, render_page(rows, machine, run, chart))
    print("\n".join(table_lines(rows)))
    print(f"\nwrote {page}" + (f" and {chart.file_name}" if chart.file_name else ""))
    return 0


def _measure(args: argparse.Namespace,
             specs: list[RowSpec]) -> tuple[list[Row], ChartInfo, Machine]:
    with _work_directory(args) as work, contextlib.ExitStack() as stack:
        registry = start_registry(os.path.join(work, "registry", "data"))
        stack.callback(registry.stop)
        _print_progress(f"seeding the registry on {registry.host}")
        seed_registry(registry.host, with_big=args.with_big)
        shaper = stack.enter_context(ShaperThread(registry.host, _profile(args)))
        daemon = stack.enter_context(ContainerdDaemon(os.path.join(work, "containerd")))
        env = BenchEnv(registry.host, shaper.host, LstoreTool(os.path.join(work, "lstore")),
                       ContainerdTool(daemon))

        rows: list[Row] = []
        for spec in specs:
            runs = _big_runs(args) if spec.needs_big else args.runs
            _print_progress(f"measuring {spec.name} ({runs} runs)")
            rows += spec.measure(env, runs)
        chart = _chart(env, work, args.output)
        return rows, chart, describe_machine(work, daemon.version())


@contextlib.contextmanager
def _work_directory(args: argparse.Namespace) -> Iterator[str]:
    work = tempfile.mkdtemp(prefix="lstore-bench-", dir=args.work_dir)
    try:
        yield work
    finally:
        unmount_below(work)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work)


def _chart(env: BenchEnv, work: str, output: str) -> ChartInfo:
    """Trace one cold lstore pull and chart it; any failure skips only the chart."""
    if not _pull_has_trace_option(env.lstore):
        return ChartInfo(None, "Chart skipped: `lstore pull` has no --trace option yet.")
    trace = os.path.join(work, "pull-trace.jsonl")
    ref = env.ref(GZIP_IMAGE)
    try:
        env.make_cold()
        env.lstore.pull(ref, trace=trace)
        events = read_trace(trace)
        write_chart(events, os.path.join(output, CHART_NAME), f"lstore pull {GZIP_IMAGE}, cold")
    except (SampleError, ValueError, OSError, subprocess.CalledProcessError) as error:
        log.warning("chart skipped: %s", error)
        return ChartInfo(None, f"Chart skipped: {error}")
    return ChartInfo(CHART_NAME, _chart_caption(events))


def _chart_caption(events: list[TraceEvent]) -> str:
    summaries = summarize_stages(events)
    rates = ", ".join(f"{REPORTED_STAGES[stage]} {summaries[stage].rate / 1e6:.0f} MB/s"
                      for stage in REPORTED_STAGES if stage in summaries)
    return (f"A cold `lstore pull --trace` of {GZIP_IMAGE} from the loopback registry. "
            "Network and hash count compressed bytes, extract counts uncompressed bytes from "
            "the start of each layer, so it includes waiting for the download. Average rates "
            f"while each stage was active: {rates}.")


def _pull_has_trace_option(lstore: LstoreTool) -> bool:
    done = subprocess.run(lstore.command("pull", "--help"), capture_output=True, text=True,
                          check=False)
    return "--trace" in done.stdout


def _profile(args: argparse.Namespace) -> LinkProfile:
    return LinkProfile(round_trip=args.rtt_ms / 1000, rate=args.rate_mb * 1e6)


def _big_runs(args: argparse.Namespace) -> int:
    return args.big_runs or min(args.runs, 2)


def _command_line(argv: list[str] | None) -> str:
    arguments = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "lstore.bench.run", *arguments])


def _print_progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
