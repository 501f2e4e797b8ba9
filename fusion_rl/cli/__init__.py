"""The ``fusion-rl`` command line.

Each module of this package that defines ``register(subparsers)`` contributes commands; they are
discovered at start-up, so a new command is a new file. Command modules import heavy libraries
(TVM, torch) inside their command functions, keeping ``fusion-rl --help`` fast.

Exit statuses (:data:`fusion_rl.cli.common.EXIT_CODES`, listed in the README): 0 ok; 1 measured,
and the answer is no (``validate``: the result does not hold; a plan's output is wrong); 2 bad
input; 3 internal error. Every user error (bad model file, unknown name, illegal plan, bad option,
argparse's own errors included) prints one line, ``error: <what is wrong>``, and exits with
status 2; ``--debug`` shows the traceback instead.

TVM's own log lines (C++ ``LOG(WARNING)`` and the like, e.g. ``executable.cc:276: Warning: Scope
Saving``) are routed to the ``tvm`` logger (:mod:`fusion_rl.tvm_log`) for the whole command,
measurement workers included, and shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from typing import Sequence

from fusion_rl.cli.common import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR
from fusion_rl.errors import FusionRLError
from fusion_rl.io import one_line
from fusion_rl.tvm_log import tvm_log_to_logging


def version_text() -> str:
    """``fusion-rl X (apache-tvm Y, ...)``: this package's version and those of the libraries
    that decide what a measurement means, read from package metadata (nothing is imported)."""
    from importlib import metadata

    import fusion_rl

    parts = []
    for dist in ("apache-tvm", "apache-tvm-ffi", "torch", "onnxruntime"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"fusion-rl {fusion_rl.__version__} ({', '.join(parts)})"


class _Version(argparse.Action):
    """``--version`` on one unwrapped line (argparse's own action wraps it to the terminal)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit(0)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: a bad option is one line ``error: ...``
    naming the command and option, and exit status 2 (argparse prints its usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fusion-rl", description="Learn and compare operator-fusion plans for TVM Relax."
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the versions of fusion-rl, TVM, torch and ONNX Runtime")
    parser.add_argument(
        "--debug", action="store_true",
        help="show tracebacks of errors, debug logging and TVM's own log lines",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; `fusion-rl COMMAND --help` for its options")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "core", m.name)):
        if info.name.startswith("_"):  # __main__ runs the CLI when imported
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted (it is
    swapped while TVM's lines are captured, and by pytest's capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def main(argv: Sequence[str] | None = None) -> int:
    # Text from files (names, ops, paths) reaches the terminal: a character the encoding
    # cannot take (a lone surrogate) is escaped, never an exception halfway through a line.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        handlers=[_CurrentStderr()],
    )
    # TVM's native lines are noise to a user (they warn about TVM internals, not about the
    # model); they stay available to developers with --debug.
    logging.getLogger("tvm").setLevel(logging.DEBUG if args.debug else logging.CRITICAL + 1)
    with tvm_log_to_logging():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # TVM uses one thread here unless told; measurement workers set their own from the target.
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    try:
        return int(args.func(args) or 0)
    except FusionRLError as exc:
        if args.debug:
            raise
        # One line whatever the message holds: a newline or an ANSI escape from a crafted file
        # must not fake a second line or recolour the terminal.
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in fusion_rl: say so, in one line unless --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"internal error: {type(exc).__name__}: {one_line(first[:300])} (rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
