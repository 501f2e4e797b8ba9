"""Files from elsewhere in, outputs out: the one place that reads untrusted files and writes results.

Reading (plans, policy cards, run configs, env specs, sidecars) is bounded: a file is read up to
a size limit before it is parsed (``/dev/zero`` as a plan is "too large", not a 20 s
``MemoryError``); JSON is strict (integers within +-2**53, no ``NaN``/``Infinity``, no lone
surrogates, at most :data:`MAX_DEPTH` levels); YAML is ``safe_load`` of UTF-8 text with the same
integer limit. Every failure is one line naming the file, raised as the caller's error class.

Writing goes through :func:`write_atomic`, which behaves like a careful shell redirect:

- through a symlink, it writes the link's target (the link stays a link);
- it never replaces a folder, device, pipe or socket, and needs the folder to exist;
- it writes a hidden temp file beside the target, fsyncs it and renames it into place, so the
  target is either its old self or complete, and no temp file outlives a failure.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from fusion_rl.errors import ConfigError, FusionRLError, OutputError

__all__ = [
    "MAX_DEPTH",
    "MAX_JSON_INT",
    "check_output",
    "check_text",
    "dumps_json",
    "json_safe",
    "one_line",
    "output_dir",
    "parse_json",
    "read_bounded",
    "read_json",
    "read_yaml",
    "write_atomic",
]

#: Largest magnitude of an integer in JSON or YAML input: the range a double holds exactly, and
#: far beyond any node count, shape or step count fusion_rl reads.
MAX_JSON_INT = 2**53
#: Deepest nesting of lists and objects accepted (plans are 2 deep, cards about 6).
MAX_DEPTH = 64
#: Default size limit of a file read with :func:`read_bounded`.
DEFAULT_MAX_BYTES = 16 << 20

ErrorType = type[FusionRLError]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


# ---- reading ---------------------------------------------------------------------------------


def read_bounded(path: str | os.PathLike[str], what: str, error: ErrorType = ConfigError,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of ``path``, refusing in one line a folder, an unreadable path (missing, a
    symlink loop, no permission) or more than ``max_bytes`` (``/dev/zero`` included).

    Parameters
    ----------
    what
        Names the file in messages, e.g. ``"plan file"``.
    error
        The :class:`~fusion_rl.errors.FusionRLError` subclass to raise.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise error(f"cannot read {what} {path}: it is a folder, not a file")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise error(f"{what} {path} is larger than {_mib(max_bytes)}; that is not a {what}")
    return b"".join(chunks)


class _Reject(ValueError):
    """A value that parses but is out of the accepted range."""


def _parse_int(text: str) -> int:
    # Check the digit count before int(): converting 5000 digits is quadratic, and Python
    # refuses more than 4300 with a ValueError that names no file.
    if len(text.lstrip("-")) > len(str(MAX_JSON_INT)) or abs(int(text)) > MAX_JSON_INT:
        raise _Reject(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range (|n| <= 2**53)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {text[:24]} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Reject(f"{name} is not valid JSON")


def _check_tree(data: Any, int_range: bool = True) -> None:
    """Refuse lone surrogates, out-of-range integers and nesting deeper than MAX_DEPTH.

    Iterative, and each container is visited once: a YAML alias bomb shares containers instead
    of copying them, and must not make this walk exponential.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Reject("a string holds a lone surrogate (not text)") from None
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        elif isinstance(value, int):
            if int_range and abs(value) > MAX_JSON_INT:
                raise _Reject("an integer is out of range (|n| <= 2**53)")
        elif isinstance(value, (list, tuple, dict)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if depth >= MAX_DEPTH:
                raise _Reject(f"it is nested deeper than {MAX_DEPTH} levels")
            items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
            for k, v in items:
                if k is not None:
                    stack.append((k, depth + 1))
                stack.append((v, depth + 1))


def parse_json(data: str | bytes, what: str, error: ErrorType = ConfigError) -> Any:
    """Strict JSON: UTF-8, integers within +-2**53, finite numbers, no lone surrogates, at most
    :data:`MAX_DEPTH` levels. ``what`` names the source in the one-line error."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_parse_constant)
        _check_tree(value)
    except _Reject as exc:
        raise error(f"{what} is not acceptable JSON: {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{what} is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to be valid input") from None
    except ValueError as exc:  # json.JSONDecodeError and Python's own integer limits
        raise error(f"{what} is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    return value


def read_json(path: str | os.PathLike[str], what: str, error: ErrorType = ConfigError,
              max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """:func:`read_bounded` then :func:`parse_json`."""
    return parse_json(read_bounded(path, what, error, max_bytes), f"{what} {path}", error)


def describe_yaml_error(exc: Exception) -> str:
    """PyYAML's error in one line: the problem and where (its own message spans several
    lines with a caret diagram, which a CLI error must not)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return problem


def read_yaml(path: str | os.PathLike[str], what: str, hint: str = "", max_bytes: int = 1 << 20) -> Any:
    """Parse the YAML file ``path`` (``safe_load``: no tags that build objects).

    An unreadable or oversized file, non-UTF-8 bytes, invalid YAML, an integer beyond +-2**53
    or nesting beyond :data:`MAX_DEPTH` is a one-line :class:`ConfigError` naming ``what``
    (e.g. "env spec") and the path; ``hint`` is appended where the file cannot be read.
    """
    import yaml

    try:
        raw = read_bounded(path, what, ConfigError, max_bytes)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{hint}") from None  # e.g. where the named specs live
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
        _check_tree(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {describe_yaml_error(exc)}") from None
    except _Reject as exc:
        raise ConfigError(f"{what} {path} is not acceptable: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be a {what}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    return data


# ---- text that reaches a terminal --------------------------------------------------------------


def check_text(value: Any, what: str, error: ErrorType = ConfigError, max_len: int = 200) -> str:
    """``value`` as a name that is safe to print: a string of at most ``max_len`` printable
    characters (no newline, no ANSI escape, no lone surrogate), else ``error``."""
    if not isinstance(value, str):
        raise error(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise error(f"{what} is longer than {max_len} characters")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise error(f"{what} contains the control or non-text character {ascii(bad)}; names must be printable")
    return value


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped: one line that cannot move the
    cursor, recolour the terminal or fake another line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no Infinity/NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``: always valid, strict JSON."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


# ---- writing ---------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike[str], what: str = "output") -> Path:
    """What :func:`write_atomic` would write for ``path``, or its :class:`OutputError`: call it
    before long work (a compile), so a bad ``-o`` fails first, not last."""
    return _destination(Path(path), what)


def _destination(path: Path, what: str) -> Path:
    """The regular file that writing ``path`` replaces: a symlink's target (as a shell
    redirect writes through a link), refusing folders, devices, pipes and missing folders."""
    if path.is_symlink():
        try:
            os.stat(path)
        except FileNotFoundError:
            pass  # a dangling link: create its target, as a redirect would
        except OSError as exc:  # a symlink loop
            raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
        path = Path(os.path.realpath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # ENOTDIR: a file where a folder should be; EACCES
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {path} is a folder; give a file path")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{what} {path} is not a regular file (a device, pipe or socket); "
                          "fusion_rl only replaces regular files")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    return path


def write_atomic(path: str | os.PathLike[str], data: bytes | str | Callable[[Path], None], *,
                 what: str = "output") -> Path:
    """Write ``data`` to ``path`` so that ``path`` is either unchanged or complete.

    Parameters
    ----------
    data
        Bytes, text (UTF-8), or a function that writes the file at the path it is
        given (for writers that need a path, e.g. TVM's ``export_library``; the temp path keeps
        the target's extension).
    what
        Names the output in messages, e.g. ``"-o"`` or ``"checkpoint"``.

    Returns
    -------
    Path
        The path written: ``path``, or the target of the symlink ``path``.

    Raises
    ------
    OutputError
        for a folder, a device/pipe/socket, a missing folder or a failed write;
        no temp file is left behind.
    """
    dest = _destination(Path(path), what)
    try:
        mode = stat.S_IMODE(os.stat(dest).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}")
    except OSError as exc:
        raise OutputError(f"cannot write {what} {dest}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {dest}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)  # after a successful rename there is nothing to remove
    return dest


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a folder be opened)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) for outputs; a file in the way, or a
    folder that cannot be created, is a one-line :class:`OutputError`."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {folder} exists and is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create {what} {folder}: {exc.strerror or exc}") from None
    return folder
