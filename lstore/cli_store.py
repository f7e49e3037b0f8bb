"""Store commands: pull, images, inspect, rmi, df, gc, check, mount, umount."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lstore.errors import LstoreError


def register(subparsers: argparse._SubParsersAction) -> None:
    pull = subparsers.add_parser("pull", help="pull an image from a registry")
    pull.add_argument("ref", nargs="+", help="image reference, e.g. busybox or host:5000/app:1")
    pull.add_argument("--platform", help="os/arch[/variant] to pull (default: this host)")
    pull.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS")
    pull.add_argument("--json", action="store_true", help="print the result as JSON")
    pull.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    pull.add_argument(
        "--trace", metavar="FILE", help="write per-blob, per-stage timings to FILE as JSON lines"
    )
    pull.set_defaults(handler=_pull)

    images = subparsers.add_parser("images", help="list pulled images")
    images.add_argument("--json", action="store_true", help="print JSON")
    images.add_argument("--quiet", "-q", action="store_true", help="print only image IDs")
    images.set_defaults(handler=_images)

    inspect = subparsers.add_parser("inspect", help="show an image's record and config as JSON")
    inspect.add_argument("ref")
    inspect.set_defaults(handler=_inspect)

    rmi = subparsers.add_parser("rmi", help="remove images and the content only they use")
    rmi.add_argument("ref", nargs="+")
    rmi.add_argument("--force", "-f", action="store_true", help="remove even if in use")
    rmi.set_defaults(handler=_rmi)

    df = subparsers.add_parser("df", help="show disk usage of the store")
    df.add_argument("--json", action="store_true", help="print JSON")
    df.set_defaults(handler=_df)

    gc = subparsers.add_parser("gc", help="remove unreferenced blobs and snapshots")
    gc.set_defaults(handler=_gc)

    check = subparsers.add_parser("check", help="check the store's records against its files")
    check.add_argument("--content", action="store_true", help="also re-hash every blob")
    check.set_defaults(handler=_check)

    mount = subparsers.add_parser("mount", help="mount an image's rootfs read-only at DIR")
    mount.add_argument("ref")
    mount.add_argument("dir")
    mount.set_defaults(handler=_mount)

    umount = subparsers.add_parser("umount", help="unmount what 'lstore mount' mounted at DIR")
    umount.add_argument("dir")
    umount.set_defaults(handler=_umount)


def _open_store(args: argparse.Namespace) -> Any:
    from lstore.store.store import Store

    return Store(args.root)


def _pull(args: argparse.Namespace) -> int:
    from lstore.store.progress import PullProgress
    from lstore.store.registry.settings import RegistrySettings

    store = _open_store(args)
    settings = RegistrySettings.from_environment(plain_http=args.plain_http)
    options = {"platform": args.platform, "settings": settings, "trace_path": args.trace}
    if len(args.ref) > 1 and not args.trace:
        return _pull_together(args, store, options)

    status = 0
    for text in args.ref:
        progress = PullProgress()
        if sys.stderr.isatty() and not (args.json or args.quiet):
            progress.listener = _ProgressPrinter()
        try:
            image = store.pull(text, progress=progress, **options)
        except LstoreError as exc:
            print(f"lstore: error: pull {text}: {exc}", file=sys.stderr)
            status = 1
            continue
        _print_pull_result(args, image, progress)
    return status


def _pull_together(args: argparse.Namespace, store: Any, options: dict[str, Any]) -> int:
    """Pull every reference at once, as a node pre-warm does; shared layers move once."""
    from lstore.store.progress import PullProgress

    progress = {text: PullProgress() for text in args.ref}
    results = store.pull_many(args.ref, progress=progress, **options)
    status = 0
    for text in args.ref:
        outcome = results[text]
        if isinstance(outcome, LstoreError):
            print(f"lstore: error: pull {text}: {outcome}", file=sys.stderr)
            status = 1
        else:
            _print_pull_result(args, outcome, progress[text])
    return status


def _print_pull_result(args: argparse.Namespace, image: Any, progress: Any) -> None:
    elapsed = time.monotonic() - progress.started
    fetched = progress.fetched_bytes
    fetched_layers = sum(1 for layer in progress.layers.values() if layer.state == "done")
    if args.quiet:
        print(image.digest)
        return
    if args.json:
        print(
            json.dumps(
                {
                    "name": image.name,
                    "digest": image.index_digest or image.digest,
                    "manifest": image.digest,
                    "id": image.config_digest,
                    "layers": len(image.layers),
                    "layers_fetched": fetched_layers,
                    "bytes_fetched": fetched,
                    "seconds": round(elapsed, 3),
                }
            )
        )
        return
    # Docker shows the digest the tag points to: the index's when there is one.
    digest = image.index_digest or image.digest
    layers = _plural(len(image.layers), "layer")
    if fetched_layers == 0:
        print(f"{image.name}: {digest} ({layers}, all present, {elapsed:.2f}s)")
        return
    rate = fetched / elapsed / 1e6 if elapsed > 0 else 0.0
    print(
        f"{image.name}: {digest} ({layers}, {fetched_layers} fetched, "
        f"{_size(fetched)} in {elapsed:.2f}s, {rate:.1f} MB/s)"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class _ProgressPrinter:
    """Redraws one line per layer on a terminal, at most ten times a second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._lines = 0

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        finished = all(layer.state in ("done", "present") for layer in progress.layers.values())
        if now - self._last < 0.1 and not finished:
            return
        self._last = now
        elapsed = max(now - progress.started, 1e-6)
        out = sys.stderr
        if self._lines:
            out.write(f"\x1b[{self._lines}F")
        for layer in progress.layers.values():
            rate = layer.fetched / elapsed / 1e6
            out.write(
                f"\x1b[2K{layer.digest[7:19]}  {layer.state:<11} "
                f"{_size(layer.fetched):>9} / {_size(layer.size):<9} {rate:6.1f} MB/s\n"
            )
        self._lines = len(progress.layers)
        out.flush()


def _images(args: argparse.Namespace) -> int:
    store = _open_store(args)
    images = sorted(store.images(), key=lambda image: image.name)
    if args.json:
        rows = [
            {"name": i.name, "digest": i.digest, "id": i.config_digest, "size": i.size}
            for i in images
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if args.quiet:
        for image in images:
            print(image.config_digest[7:19])
        return 0
    print(f"{'REFERENCE':<60} {'IMAGE ID':<12} {'LAYERS':>6} {'SIZE':>10}")
    for image in images:
        print(
            f"{image.name:<60} {image.config_digest[7:19]:<12} {len(image.layers):>6} "
            f"{_size(image.size):>10}"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    store = _open_store(args)
    image = store.lookup_image(args.ref)
    record = image.to_record()
    record["name"] = image.name
    record["size"] = image.size
    record["config"] = image.config
    record["layer_dirs"] = image.layer_dirs
    print(json.dumps(record, indent=2))
    return 0


def _rmi(args: argparse.Namespace) -> int:
    store = _open_store(args)
    status = 0
    for text in args.ref:
        try:
            for name in store.remove_image(text, force=args.force):
                print(f"Untagged: {name}")
        except LstoreError as exc:
            print(f"lstore: error: {exc}", file=sys.stderr)
            status = 1
    return status


def _df(args: argparse.Namespace) -> int:
    usage = _open_store(args).df()
    if args.json:
        print(json.dumps(usage, indent=2))
        return 0
    print(f"{'TYPE':<12} {'COUNT':>6} {'SIZE':>10} {'RECLAIMABLE':>12}")
    print(
        f"{'Images':<12} {usage['images']:>6} {_size(usage['blob_bytes']):>10} "
        f"{_size(usage['reclaimable_blob_bytes']):>12}"
    )
    print(
        f"{'Snapshots':<12} {usage['snapshots']:>6} {_size(usage['snapshot_bytes']):>10} "
        f"{_size(usage['reclaimable_snapshot_bytes']):>12}"
    )
    print(f"{'Containers':<12} {usage['containers']:>6}")
    print(f"{'Volumes':<12} {usage['volumes']:>6}")
    print(f"{'Partial':<12} {'':>6} {_size(usage['ingest_bytes']):>10}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    report = _open_store(args).gc()
    print(
        f"removed {report.blobs} blobs, {report.snapshots} snapshots, "
        f"{report.ingest} partial downloads, {_size(report.bytes_freed)} freed"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    report = _open_store(args).check(verify_content=args.content)
    for problem in report.problems:
        print(problem)
    if report.clean:
        print("store is clean")
        return 0
    return 1


def _mount(args: argparse.Namespace) -> int:
    _open_store(args).mount_image(args.ref, args.dir)
    return 0


def _umount(args: argparse.Namespace) -> int:
    _open_store(args).unmount_image(args.dir)
    return 0


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f}{unit}" if unit == "B" else f"{nbytes:.1f}{unit}"
        nbytes /= 1000
    return f"{nbytes:.1f}GB"
