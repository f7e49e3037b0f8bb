"""Read the JSON-lines trace of `lstore pull --trace FILE` and turn it into stage throughputs.

Each line is {"t": seconds since the pull started, "blob": digest, "stage": name, "event":
"start" | "end" | "progress", "bytes": n}. On progress and end events, `bytes` is the total the
stage has handled for that blob so far; a start carries 0. Some download progress events carry
the end offset of a finished Range request instead, which is a total only when requests
finish in order, so totals are taken as the running maximum per blob and stage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

# Stages whose `bytes` count data handled, with the names `lstore bench` prints. The others
# (connect, first_byte, commit) mark moments; their `bytes` is an offset or 0.
REPORTED_STAGES = {"download": "network", "inflate": "inflate", "hash": "hash",
                   "extract": "extract"}
_EVENTS = ("start", "end", "progress")


class TraceFormatError(ValueError):
    """A trace line that is not a JSON object of the documented form."""


@dataclass(frozen=True)
class TraceEvent:
    t: float
    blob: str
    stage: str
    event: str
    nbytes: int


@dataclass(frozen=True)
class StageSummary:
    """One stage over a whole pull: bytes handled and the seconds any blob was in it."""

    stage: str
    nbytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second while the stage was active; 0 for an instantaneous stage."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


def read_trace(path: str) -> list[TraceEvent]:
    """Parse a trace file; raise TraceFormatError naming the file and line on bad input."""
    events = []
    with open(path) as trace_file:
        for number, line in enumerate(trace_file, 1):
            if line.strip():
                events.append(_parse_line(line, f"{path}:{number}"))
    return events


def _parse_line(line: str, where: str) -> TraceEvent:
    try:
        item = json.loads(line)
        event = TraceEvent(float(item["t"]), str(item["blob"]), str(item["stage"]),
                           str(item["event"]), int(item.get("bytes", 0)))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise TraceFormatError(f"{where}: not a trace event ({error}): {line.strip()[:200]}")
    if event.event not in _EVENTS:
        raise TraceFormatError(f"{where}: unknown event {event.event!r}, expected one of "
                               f"{', '.join(_EVENTS)}")
    return event


def _by_blob_and_stage(events: list[TraceEvent]) -> dict[tuple[str, str], list[TraceEvent]]:
    """Group the events of data stages by blob and stage, each group in time order."""
    groups: dict[tuple[str, str], list[TraceEvent]] = defaultdict(list)
    for event in sorted(events, key=lambda e: e.t):
        if event.stage in REPORTED_STAGES:
            groups[(event.blob, event.stage)].append(event)
    return groups


def _cumulative(events: list[TraceEvent]) -> list[tuple[float, int]]:
    """Return (t, total bytes so far) of one blob's stage, never decreasing."""
    points = []
    total = 0
    for event in events:
        total = max(total, event.nbytes)
        points.append((event.t, total))
    return points


def summarize_stages(events: list[TraceEvent]) -> dict[str, StageSummary]:
    """Sum each data stage over all blobs: bytes handled between its first and last event per
    blob, and the length of the union of those intervals (blobs overlap in time).

    An extract interval runs from the layer's start, before its first byte has arrived, to
    its end, so the extract rate includes waiting for the download.
    """
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    totals: dict[str, int] = defaultdict(int)
    for (_, stage), group in _by_blob_and_stage(events).items():
        points = _cumulative(group)
        intervals[stage].append((points[0][0], points[-1][0]))
        totals[stage] += points[-1][1] - points[0][1]
    return {stage: StageSummary(stage, totals[stage], _union_length(spans))
            for stage, spans in intervals.items()}


def _union_length(spans: list[tuple[float, float]]) -> float:
    length = 0.0
    reached = float("-inf")
    for start, end in sorted(spans):
        start = max(start, reached)
        if end > start:
            length += end - start
            reached = end
    return length


def throughput_series(events: list[TraceEvent], bin_seconds: float
                      ) -> dict[str, list[tuple[float, float]]]:
    """Return, per stage, (bin start in s, bytes per second) over the pull's duration.

    The bytes between two consecutive events of a blob's stage are spread evenly over the
    time between them, so a stage that only reports its start and end shows its average rate.
    """
    if bin_seconds <= 0:
        raise ValueError(f"bin width must be positive, not {bin_seconds}")
    end = max((event.t for event in events), default=0.0)
    bins = int(end / bin_seconds) + 1
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * bins)
    for (_, stage), group in _by_blob_and_stage(events).items():
        points = _cumulative(group)
        for (t0, total0), (t1, total1) in zip(points, points[1:]):
            _spread(series[stage], bin_seconds, t0, t1, total1 - total0)
    return {stage: [(index * bin_seconds, nbytes / bin_seconds)
                    for index, nbytes in enumerate(values)]
            for stage, values in series.items()}


def _spread(bins: list[float], width: float, t0: float, t1: float, nbytes: int) -> None:
    if nbytes <= 0:
        return
    if t1 <= t0:
        bins[min(int(t0 / width), len(bins) - 1)] += nbytes
        return
    rate = nbytes / (t1 - t0)
    index = int(t0 / width)
    while index < len(bins) and index * width < t1:
        overlap = min(t1, (index + 1) * width) - max(t0, index * width)
        bins[index] += rate * max(overlap, 0.0)
        index += 1
