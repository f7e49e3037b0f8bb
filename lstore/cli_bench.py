"""The `lstore bench` command: time pulls from a registry or mirror, stage by stage."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lstore.errors import InvalidArgumentError


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="time pulls of images from a registry or mirror into a scratch store",
        description="Pull each image RUNS times into an empty scratch store beside the store "
                    "root (or in $TMPDIR), report the time per pull and the throughput of each "
                    "stage (network, hash, extract) as median and range, and check whether "
                    "the registry honours Range requests. The store itself is not touched, "
                    "and the scratch stores are deleted afterwards.",
    )
    bench.add_argument("ref", nargs="+", help="image reference, e.g. host:5000/app:1")
    bench.add_argument("--runs", type=int, default=3, help="pulls per image (default: 3)")
    bench.add_argument("--json", action="store_true", help="print one JSON object per image")
    bench.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS")
    bench.add_argument("--platform", help="os/arch[/variant] to pull (default: this host)")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from lstore.bench.pullbench import bench_pulls
    from lstore.store.store import default_root

    if args.runs < 1:
        raise InvalidArgumentError(f"--runs must be at least 1, not {args.runs}")
    root = args.root or default_root()
    for text in args.ref:
        result = bench_pulls(text, args.runs, store_root=root, plain_http=args.plain_http,
                             platform=args.platform)
        if args.json:
            print(json.dumps(result.to_json()), flush=True)
        else:
            _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    megabytes = result.bytes_fetched / 1e6
    print(f"{result.ref}: {result.runs} runs, {megabytes:.1f} MB fetched per pull")
    if result.range_probe is not None:
        print(f"  Range requests: {result.range_probe.describe()}")
    print(f"  {'':<10} {'median':>12} {'min':>12} {'max':>12}")
    print(_line("pull", result.seconds, "s", 1.0))
    for name, series in result.stage_rates.items():
        print(_line(name, series, "MB/s", 1e-6))
    print(flush=True)


def _line(name: str, series: Any, unit: str, scale: float) -> str:
    values = [series.median * scale, series.low * scale, series.high * scale]
    cells = "".join(f" {f'{value:.2f} {unit}':>12}" for value in values)
    return f"  {name:<10}{cells}"


__all__ = ["register"]
