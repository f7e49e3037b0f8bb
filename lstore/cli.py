"""The `lstore` command line: global options, dispatch and error reporting.

Each command group registers its own subcommands (cli_store, cli_runner, cli_bench), and
imports its heavy dependencies inside the handlers, so `lstore images` starts fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
from typing import NoReturn

from lstore.errors import LstoreError

# Modules that add subcommands; each has register(subparsers). A group that is missing from
# this checkout is skipped, so the store commands work without the runner.
_COMMAND_GROUPS = ("lstore.cli_store", "lstore.cli_runner", "lstore.cli_bench")

# The groups a command needs, so that a command imports only its own group; anything else
# (help, an unknown command) loads them all. `inspect` takes images and containers.
_STORE_COMMANDS = ("pull", "images", "rmi", "df", "gc", "check", "mount", "umount")
_RUNNER_COMMANDS = ("run", "ps", "logs", "stop", "kill", "rm", "wait", "stats", "volume", "exec")
_GROUPS_BY_COMMAND = {
    **{name: ("lstore.cli_store",) for name in _STORE_COMMANDS},
    **{name: ("lstore.cli_runner",) for name in _RUNNER_COMMANDS},
    "inspect": ("lstore.cli_store", "lstore.cli_runner"),
    "bench": ("lstore.cli_bench",),
}
# Global options that take a value, skipped when looking for the command name.
_VALUE_OPTIONS = ("--root", "--log-level")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like lstore's other errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lstore: error: {self.prog}: {message}; see '{self.prog} --help'\n")


def _command_name(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lstore", description="Pull container images into an overlay store and run them."
    )
    parser.add_argument(
        "--root",
        default=None,
        help="store root directory (default: $LSTORE_ROOT or /var/lib/lstore)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LSTORE_LOG_LEVEL", "warning"),
        choices=["debug", "info", "warning", "error"],
        help="how much to log to stderr (default: warning)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = _command_name(sys.argv[1:] if argv is None else argv)
    for module_name in _GROUPS_BY_COMMAND.get(command or "", _COMMAND_GROUPS):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    parser.set_defaults(command_parsers=subparsers.choices)
    return parser


_CLI_PID = os.getpid()


def _describe_command(args: argparse.Namespace) -> str:
    """Return the command and the references it was given, such as "pull busybox"."""
    refs = getattr(args, "ref", None) or []
    if isinstance(refs, str):
        refs = [refs]
    return " ".join([args.command, *refs])


def _store_root(args: argparse.Namespace) -> str:
    from lstore.store.store import default_root

    return args.root or default_root()


def _interrupt(signum: int, frame: object) -> None:
    # A child forked by a library (pyroute2's netns helpers) inherits this handler, and must
    # die of SIGTERM as it would by default rather than unwind the CLI's cleanup code.
    if os.getpid() != _CLI_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        # Report unknown flags against the command they were given to, not against lstore.
        command_parser = args.command_parsers.get(args.command, parser)
        command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="lstore: %(levelname)s: %(name)s: %(message)s",
    )
    # SIGTERM stops a command the way Ctrl-C does, so pulls clean up their temporary
    # directories. Commands that forward signals (run, logs -f) install their own handlers.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.handler(args) or 0)
    except LstoreError as exc:
        print(f"lstore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lstore: {_describe_command(args)} interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # Errors of the store's files or of the kernel that no module turned into an
        # LstoreError. The path shows the user where to look.
        where = f": {exc.filename}" if exc.filename else f" (store {_store_root(args)})"
        hint = ""
        if exc.errno == errno.ENOSPC:
            hint = "; free some space or run 'lstore gc'"
        print(f"lstore: error: {exc.strerror or exc}{where}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
