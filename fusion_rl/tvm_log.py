"""Route TVM's native log lines through Python logging.

TVM's C++ code logs with ``LOG(INFO|WARNING|ERROR)``, and the pip build of TVM 0.27 writes those
lines straight to ``std::cerr`` as ``[HH:MM:SS] file.cc:LINE: Warning: text``
(``include/tvm/runtime/logging.h``). Its only hook, ``TVM_LOG_CUSTOMIZE``, is a compile-time
switch that the wheel leaves off, and ``tvm_ffi`` adds none. So the lines can only be caught at
file descriptor 2: :func:`tvm_log_to_logging` points fd 2 at a pipe for the duration of a block,
and a reader thread turns every line in TVM's format into a record of the ``tvm`` logger at
TVM's level. Everything else written to fd 2 (a worker's traceback, a crash report) is passed
through to the original stderr unchanged and at once, so nothing but TVM's lines is hidden.

Child processes started inside the block inherit the pipe, so the measurement workers' TVM lines
are routed the same way. Python's own ``sys.stderr`` keeps writing to the original stderr
directly: ``print(..., file=sys.stderr)``, progress bars and logging handlers created inside the
block never pass through the pipe.

The forwarded message omits TVM's ``[HH:MM:SS]`` prefix. A handler that writes the record back to
fd 2 while the block runs therefore produces a line that is *not* in TVM's format, which is passed
through instead of being forwarded again (no loop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import IO, Iterator

#: The logger TVM's native lines go to (TVM's Python modules log under ``tvm.*`` too).
LOGGER = logging.getLogger("tvm")

_LINE = re.compile(
    rb"^\[\d\d:\d\d:\d\d\] (?P<where>\S+?:\d+): (?:(?P<level>Debug|Warning|Error): )?(?P<msg>.*)$"
)
_LEVELS = {b"Debug": logging.DEBUG, None: logging.INFO, b"Warning": logging.WARNING,
           b"Error": logging.ERROR}

_lock = threading.Lock()
_depth = 0


def parse_tvm_line(line: bytes) -> tuple[int, str, str] | None:
    """``(logging level, "file:line", message)`` of one TVM log line, or None if it is not one.

    Parameters
    ----------
    line
        One line as written to stderr, without its newline.
    """
    m = _LINE.match(line.rstrip(b"\r"))
    if m is None:
        return None
    return (_LEVELS[m.group("level")], m.group("where").decode(errors="replace"),
            m.group("msg").decode(errors="replace"))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:  # the original stderr is gone (closed terminal): drop, never raise
            return


class _Forwarder(threading.Thread):
    """Reads the pipe behind fd 2: TVM lines become log records, other lines pass through."""

    def __init__(self, read_fd: int, passthrough_fd: int, logger: logging.Logger) -> None:
        super().__init__(name="fusion_rl-tvm-log", daemon=True)
        self.read_fd = read_fd
        self.passthrough_fd = passthrough_fd
        self.logger = logger

    def run(self) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._handle(line)
            if pending:
                self._handle(pending, newline=False)
        finally:
            os.close(self.read_fd)
            os.close(self.passthrough_fd)

    def _handle(self, line: bytes, newline: bool = True) -> None:
        parsed = parse_tvm_line(line)
        if parsed is None:
            _write_all(self.passthrough_fd, line + (b"\n" if newline else b""))
            return
        level, where, msg = parsed
        try:
            self.logger.log(level, "%s: %s", where, msg, extra={"tvm_location": where})
        except Exception:  # a broken handler must not kill the reader (fd 2 would then block)
            pass


def _writes_to_fd2(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # pytest's capture, StringIO, closed streams
        return False


@contextlib.contextmanager
def tvm_log_to_logging(logger: logging.Logger = LOGGER) -> Iterator[None]:
    """Within the block, TVM's native log lines go to ``logger`` instead of the terminal.

    Re-entrant: a nested block is a no-op. Whether the records are shown is up to the logging
    configuration (the CLI shows the ``tvm`` logger only with ``--debug``).

    Parameters
    ----------
    logger
        Where TVM's lines go; the default is the ``tvm`` logger.

    Examples
    --------
    >>> with tvm_log_to_logging():          # doctest: +SKIP
    ...     executable.export_library("model.so")   # no "Scope Saving" lines on the terminal
    """
    global _depth
    with _lock:
        _depth += 1
        outer = _depth == 1
    if not outer:
        try:
            yield
        finally:
            with _lock:
                _depth -= 1
        return
    old_stderr = sys.stderr
    swap = _writes_to_fd2(old_stderr)
    try:
        old_stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, False)
    forwarder = _Forwarder(read_fd, os.dup(saved), logger)
    forwarder.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    if swap:
        # Python-level writes keep going straight to the original stderr, unbuffered per line.
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1,
                               encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                               errors="backslashreplace")
    try:
        yield
    finally:
        if swap:
            replacement, sys.stderr = sys.stderr, old_stderr
            try:
                replacement.close()
            except OSError:
                pass
        # Restoring fd 2 drops this process's last write end; the reader then sees EOF once any
        # child process that inherited the pipe has exited too.
        os.dup2(saved, 2)
        os.close(saved)
        forwarder.join(timeout=2.0)
        with _lock:
            _depth -= 1
