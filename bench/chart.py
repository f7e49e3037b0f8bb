"""Plot the throughput of each pull stage over time from one `lstore pull --trace` file."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from types import ModuleType

from lstore.bench.tracefile import REPORTED_STAGES, TraceEvent, throughput_series

log = logging.getLogger(__name__)

# About a hundred points across the pull: finer bins show the 1 MiB steps of the trace's
# progress events as noise, coarser ones hide where stages overlap.
_BINS = 100
_MIN_BIN_SECONDS = 0.02


def ensure_matplotlib() -> ModuleType:
    """Import matplotlib's pyplot with the file-only Agg backend, installing matplotlib
    with pip first when it is missing. Only the chart needs it."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ModuleNotFoundError:
        log.warning("matplotlib is missing; installing it with pip for the chart")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "--root-user-action=ignore", "matplotlib"],
                       check=True)
        importlib.invalidate_caches()
        matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def write_chart(events: list[TraceEvent], path: str, title: str) -> None:
    """Write a PNG with one line per data stage: MB/s against seconds since the pull began.

    Network and hash count compressed bytes, extract counts uncompressed bytes.
    """
    pyplot = ensure_matplotlib()
    end = max((event.t for event in events), default=0.0)
    width = max(end / _BINS, _MIN_BIN_SECONDS)
    series = throughput_series(events, width)

    figure, axes = pyplot.subplots(figsize=(9, 4.5), dpi=100)
    for stage in REPORTED_STAGES:
        if stage in series:
            times = [t for t, _ in series[stage]]
            rates = [rate / 1e6 for _, rate in series[stage]]
            axes.plot(times, rates, label=REPORTED_STAGES[stage], drawstyle="steps-post")
    axes.set_xlabel("seconds since the pull started")
    axes.set_ylabel("MB/s")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
