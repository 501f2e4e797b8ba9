"""Progress bars of the ``fusion-rl`` commands: one helper, used by every long-running command.

The layers below the CLI (``compiler/``, ``baselines/``, ``evaluate``, ``compare``) never import
tqdm; they take an optional callback ``progress(done, total, label)`` (see :data:`ProgressFn`)
and call it after each unit of work. A command hands them a :class:`Bar`, which draws a tqdm
bar on stderr, or does nothing when the output is not for a person at a terminal.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

#: ``progress(done, total, label)``: ``done`` units of ``total`` (``None``: not known) finished;
#: ``label`` says what was done last (shown after the bar).
ProgressFn = Callable[[int, "int | None", str], None]


def wanted(args: argparse.Namespace | None = None, stream: TextIO | None = None) -> bool:
    """Whether a command draws progress bars: only for a person at a terminal.

    Off with ``--json`` (the output is for a program), with ``--no-progress``, and when stderr
    is not a terminal (a log file or a pipe would fill with carriage-return redraws).
    """
    if args is not None and (getattr(args, "json", False) or getattr(args, "no_progress", False)):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class Bar:
    """A progress callback (:data:`ProgressFn`) that draws one tqdm bar, or nothing when off.

    The bar is created at the first call, so a command that finishes without calling it (served
    from the store, failed early) leaves no empty bar behind.
    """

    def __init__(self, desc: str, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream
        self.calls = 0
        self.done = 0
        self.total: int | None = None
        self._bar: Any = None

    def __call__(self, done: int, total: int | None = None, label: str = "") -> None:
        self.calls += 1
        self.done = done
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False,
                             file=self.stream if self.stream is not None else sys.stderr,
                             dynamic_ncols=True)
        if self._bar.total != self.total:
            self._bar.total = self.total
        self._bar.n = done
        if label:
            self._bar.set_postfix_str(label[:60], refresh=False)
        self._bar.refresh()

    def step(self, label: str = "") -> None:
        """One more unit done (for callers that count themselves)."""
        self(self.done + 1, self.total, label)

    def print(self, text: str = "") -> None:
        """Print a line on stdout above the bar (a plain print would tear the bar apart)."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
        else:
            print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def bar(args: argparse.Namespace | None, desc: str, unit: str = "it",
        total: int | None = None) -> Iterator[Bar]:
    """A :class:`Bar` for the duration of a ``with`` block, on only when :func:`wanted`.

    ``total`` (if known here) draws the bar at 0 before the first unit finishes, so a command
    that then works for minutes shows at once what it is doing.
    """
    b = Bar(desc, unit, enabled=wanted(args))
    try:
        if total is not None:
            b(0, total)
        yield b
    finally:
        b.close()


def add_no_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` on a command that draws bars."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (bars are drawn only when stderr is a terminal and "
                        "--json is not given)")
