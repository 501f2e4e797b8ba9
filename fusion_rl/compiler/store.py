"""The measurement store: one SQLite file of latency measurements, shared by processes.

A measurement is identified by a :class:`MeasurementKey` (model fingerprint, plan hash, target
key, schedule provider, budget, library versions, timing protocol) and holds a
:class:`MeasurementRecord` (status, median, spread, raw times, kernel counts, ...). Nothing is
measured twice without reason: look a key up with :meth:`MeasurementStore.get` first.

Guarantees, and why:

- **Durability.** WAL journal with ``synchronous=FULL``: when :meth:`MeasurementStore.put`
  returns, the record is in the WAL and fsynced, so it survives the process being killed
  (which ``NORMAL`` also gives) and an OS crash or power loss (which only ``FULL`` gives). One
  fsync per put is negligible next to a measurement that takes seconds.
- **Several processes.** WAL lets readers run beside one writer; writers wait up to
  ``busy_timeout_s`` for the lock. Use one :class:`MeasurementStore` per process (or thread).
- **No silent data loss.** A new store is built in a temporary file and linked into place
  atomically, so a store path holds either nothing or a complete store. An existing file that
  is not a store of this schema, fails ``PRAGMA quick_check``, or is truncated raises
  :class:`StoreError` naming the path and the way out (move it aside); it is never recreated
  or overwritten. A failed write (disk full, lock timeout) is rolled back and raises
  :class:`StoreError`; committed records stay readable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import stat
import time
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np

from fusion_rl.errors import ConfigError, StoreError
from fusion_rl.io import parse_json

#: Version of the table layout below. Bump it (and add a migration or tell users to start a new
#: store) whenever a column changes meaning or is added.
SCHEMA_VERSION = 2  # 2: kernel_schedules
#: Marks a SQLite file as a fusion_rl store (``PRAGMA application_id``; ASCII "FuRL").
APPLICATION_ID = 0x4675524C
#: Allowed values of :attr:`MeasurementRecord.status`.
STATUSES = ("ok", "failed", "timeout", "crashed", "wrong_output")

_SQLITE_MAGIC = b"SQLite format 3\x00"

_KEY_COLUMNS = ("model_fingerprint", "plan_hash", "target", "provider", "budget", "versions", "protocol")
_VALUE_COLUMNS = (
    "status", "median_ms", "spread_ms", "repeats", "times_ms", "num_kernels", "kernel_times_ms",
    "error", "created", "wall_s", "kernel_schedules",
)
_COLUMNS = _KEY_COLUMNS + _VALUE_COLUMNS

_SCHEMA = f"""
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE measurements (
    model_fingerprint TEXT    NOT NULL,
    plan_hash         TEXT    NOT NULL,
    target            TEXT    NOT NULL,
    provider          TEXT    NOT NULL,
    budget            INTEGER NOT NULL,
    versions          TEXT    NOT NULL,
    protocol          TEXT    NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    median_ms         REAL,
    spread_ms         REAL,
    repeats           INTEGER NOT NULL,
    times_ms          TEXT    NOT NULL,
    num_kernels       INTEGER,
    kernel_times_ms   TEXT,
    error             TEXT,
    created           REAL    NOT NULL,
    wall_s            REAL    NOT NULL,
    kernel_schedules  TEXT,
    PRIMARY KEY ({", ".join(_KEY_COLUMNS)})
) WITHOUT ROWID;
CREATE INDEX measurements_by_model_target ON measurements (model_fingerprint, target);
"""


def default_store_path() -> Path:
    """``$FUSION_RL_CACHE/measurements.sqlite``, else ``~/.cache/fusion_rl/measurements.sqlite``."""
    root = os.environ.get("FUSION_RL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fusion_rl") / "measurements.sqlite"


def library_versions() -> str:
    """The ``versions`` key field for this environment, e.g.
    ``"tvm=0.27.0.post1;ffi=0.1.14.post1;fusion_rl=0.1.0"``.

    Read from package metadata, so TVM is not imported.
    """
    import fusion_rl

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "none"

    return f"tvm={version('apache-tvm')};ffi={version('apache-tvm-ffi')};fusion_rl={fusion_rl.__version__}"


@dataclasses.dataclass(frozen=True)
class MeasurementKey:
    """Everything that determines a measurement's outcome; two equal keys are one measurement.

    :param model_fingerprint: The model's fingerprint (graph + shapes + dtypes).
    :param plan_hash: The fusion plan's canonical hash.
    :param target: :attr:`fusion_rl.compiler.target.TargetSpec.key` (includes thread count).
    :param provider: :attr:`fusion_rl.compiler.schedules.base.ScheduleProvider.key`: the provider's
        name plus the options that change its schedules (``naive``, ``rules``,
        ``tuned:structural``, ...).
    :param budget: The provider's search budget (trials per task; 0 for none).
    :param versions: Library versions (see :func:`library_versions`).
    :param protocol: Timing protocol: ``fusion_rl.compiler.timing.TimingProtocol.key``, e.g.
        ``"n1r7m50w2"`` (number 1, repeat 7, min_repeat_ms 50, warm-up 2).
    """

    model_fingerprint: str
    plan_hash: str
    target: str
    provider: str
    budget: int
    versions: str
    protocol: str

    def __post_init__(self) -> None:
        for name in _KEY_COLUMNS:
            value = getattr(self, name)
            if name == "budget":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise StoreError(f"measurement key: budget must be an int >= 0, got {value!r}")
            elif not isinstance(value, str) or not value:
                raise StoreError(f"measurement key: {name} must be a non-empty str, got {value!r}")

    def digest(self) -> str:
        """A stable short hash of the key (for file names and logs)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasurementKey:
        return cls(**{name: data[name] for name in _KEY_COLUMNS})


@dataclasses.dataclass
class MeasurementRecord:
    """The outcome of measuring one :class:`MeasurementKey`.

    :param key: What was measured.
    :param status: One of :data:`STATUSES`. Only ``"ok"`` latencies may be compared.
    :param median_ms: Median of ``times_ms`` (required for ``"ok"``; ``None`` if nothing ran).
    :param spread_ms: Interquartile range of ``times_ms`` (75th minus 25th percentile, numpy's
        linear interpolation): robust to the odd slow repeat, unlike the standard deviation.
    :param repeats: Number of timed repeats (``len(times_ms)``).
    :param times_ms: Every repeat's time (each the mean over ``number`` runs), in ms.
    :param num_kernels: Kernels (PrimFunc calls) in the compiled plan.
    :param kernel_times_ms: Optional per-kernel times, JSON-serializable (e.g. name -> ms).
    :param error: The failure message, for non-``ok`` statuses.
    :param created: Unix time of the measurement.
    :param wall_s: Wall seconds spent (schedule + build + verify + time).
    :param kernel_schedules: Kernel name -> the schedule it got (``fallback: <reason>`` for a
        kernel left as naive loops); ``None`` when the build did not get that far.
    """

    key: MeasurementKey
    status: str
    median_ms: float | None = None
    spread_ms: float | None = None
    repeats: int = 0
    times_ms: list[float] = dataclasses.field(default_factory=list)
    num_kernels: int | None = None
    kernel_times_ms: Any = None
    error: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    wall_s: float = 0.0
    kernel_schedules: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise StoreError(f"measurement status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok" and (self.median_ms is None or not math.isfinite(self.median_ms)):
            raise StoreError(f"an 'ok' measurement needs a finite median_ms, got {self.median_ms!r}")
        self.times_ms = [float(t) for t in self.times_ms]

    @classmethod
    def from_times(cls, key: MeasurementKey, times_ms: Sequence[float], **fields: Any) -> MeasurementRecord:
        """An ``ok`` record with median, spread (IQR) and repeats computed from ``times_ms``."""
        times = np.asarray(times_ms, dtype=np.float64)
        if times.size == 0:
            raise StoreError("from_times needs at least one time")
        q25, q50, q75 = np.percentile(times, [25, 50, 75])
        return cls(
            key=key, status=fields.pop("status", "ok"), median_ms=float(q50), spread_ms=float(q75 - q25),
            repeats=int(times.size), times_ms=times.tolist(), **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        """A flat dict: the key's fields and the value fields side by side (one table row)."""
        data = self.key.to_dict()
        data.update({name: getattr(self, name) for name in _VALUE_COLUMNS})
        data["times_ms"] = list(self.times_ms)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasurementRecord:
        return cls(key=MeasurementKey.from_dict(data), **{name: data[name] for name in _VALUE_COLUMNS if name in data})

    def _row(self) -> tuple[Any, ...]:
        data = self.to_dict()
        data["times_ms"] = json.dumps(data["times_ms"])
        data["kernel_times_ms"] = None if self.kernel_times_ms is None else json.dumps(self.kernel_times_ms)
        data["kernel_schedules"] = None if self.kernel_schedules is None else json.dumps(self.kernel_schedules)
        return tuple(data[name] for name in _COLUMNS)

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> MeasurementRecord:
        """A record from a table row; a damaged row (invalid JSON in a column, non-numeric
        times) raises :class:`StoreError`, never a bare JSON or type error."""
        data = dict(zip(_COLUMNS, row))
        what = f"the record of plan {str(data.get('plan_hash'))[:20]}"
        data["times_ms"] = parse_json(str(data["times_ms"]), f"{what}: times_ms", StoreError)
        if not isinstance(data["times_ms"], list) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in data["times_ms"]):
            raise StoreError(f"{what}: times_ms is not a list of numbers")
        if data["kernel_times_ms"] is not None:
            data["kernel_times_ms"] = parse_json(str(data["kernel_times_ms"]), f"{what}: kernel_times_ms", StoreError)
        if data["kernel_schedules"] is not None:
            data["kernel_schedules"] = parse_json(str(data["kernel_schedules"]), f"{what}: kernel_schedules", StoreError)
        return cls.from_dict(data)


class MeasurementStore:
    """A SQLite file of :class:`MeasurementRecord`, keyed by :class:`MeasurementKey`.

    >>> with MeasurementStore(default_store_path()) as store:  # doctest: +SKIP
    ...     if store.get(key) is None:
    ...         store.put(measure(key))

    :param path: The store file; created (with parent folders) if absent.
    :param busy_timeout_s: How long a write waits for another process's write lock.
    :param check: Run ``PRAGMA quick_check`` on open (O(store size); on by default so that
        corruption is found before new results are added to a broken file).
    :raises StoreError: for an unwritable path, a file that is not a store of this schema
        version, or a corrupt store.
    """

    RECOVERY_HINT: ClassVar[str] = (
        "move it aside (e.g. `mv {path} {path}.corrupt`, with its -wal/-shm files) and rerun to "
        "start a new store; `sqlite3 {path}.corrupt .recover` may salvage records"
    )

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 30.0, check: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._check_writable_location()
        if not self.path.exists():
            self._create()
        self._conn = self._open(check=check)

    # ---- opening -----------------------------------------------------------------------------

    def _check_writable_location(self) -> None:
        path = self.path
        if path.is_dir():
            raise StoreError(f"measurement store path {path} is a directory; give a file path such as {path / 'measurements.sqlite'}")
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise StoreError(f"measurement store path {path} is not a regular file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of measurement store {path}: {exc.strerror or exc}; choose another --store path or $FUSION_RL_CACHE") from exc
        # WAL mode creates <path>-wal and <path>-shm beside the store, so the folder itself
        # must be writable, not only the file.
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StoreError(f"measurement store folder {path.parent} is not writable; fix its permissions or choose another --store path or $FUSION_RL_CACHE")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(f"measurement store {path} is not readable and writable; fix its permissions or choose another --store path")

    def _create(self) -> None:
        """Build an empty store in a temp file, then link it into place (atomic, no overwrite)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file header
                conn.execute("BEGIN")
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created', ?)", (str(SCHEMA_VERSION), str(time.time())))
                conn.execute("COMMIT")
            finally:
                conn.close()  # checkpoints the WAL into the file and removes -wal/-shm
            try:
                os.link(tmp, self.path)  # fails if another process created the store first: keep theirs
            except FileExistsError:
                pass
        except sqlite3.OperationalError as exc:
            raise self._error("cannot create", exc) from exc
        except OSError as exc:
            raise StoreError(f"cannot create measurement store {self.path}: {exc.strerror or exc}; choose another --store path or free disk space") from exc
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)

    def _corrupt(self, reason: str) -> StoreError:
        hint = self.RECOVERY_HINT.format(path=self.path)
        return StoreError(f"measurement store {self.path} is corrupt or not a fusion_rl store ({reason}); {hint}")

    def _open(self, *, check: bool) -> sqlite3.Connection:
        # Look at the header before SQLite does: SQLite happily treats an empty file as an empty
        # database, and we must never initialize (overwrite) a file that was something else.
        try:
            with open(self.path, "rb") as f:
                header = f.read(100)
        except OSError as exc:
            raise StoreError(f"cannot read measurement store {self.path}: {exc.strerror or exc}") from exc
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise self._corrupt("not an SQLite file, or truncated" if header else "empty file")
        if int.from_bytes(header[68:72], "big") != APPLICATION_ID:
            raise self._corrupt("an SQLite file, but not written by fusion_rl")

        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            self._validate_schema(conn)
            if check:
                problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise self._corrupt("quick_check: " + "; ".join(problems[:3]))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._error("cannot open", exc) from exc
        except StoreError:
            conn.close()
            raise
        return conn

    def _validate_schema(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "measurements"} <= tables:
            raise self._corrupt(f"missing tables; found {sorted(tables)}")
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if row is None:
            raise self._corrupt("no schema_version in its meta table")
        if str(row[0]) == "1" and self._migrate_from_1(conn):
            row = ("2",)
        if str(row[0]) != str(SCHEMA_VERSION):
            raise StoreError(
                f"measurement store {self.path} has schema version {row[0]}, but this fusion_rl "
                f"expects {SCHEMA_VERSION}; use a fusion_rl that matches it, or start a new store "
                "(another --store path or $FUSION_RL_CACHE, or move this file aside)"
            )
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(measurements)"))
        if columns != _COLUMNS:
            raise self._corrupt(f"measurements table has columns {columns}, expected {_COLUMNS}")

    @staticmethod
    def _migrate_from_1(conn: sqlite3.Connection) -> bool:
        """Schema 1 -> 2 adds the nullable ``kernel_schedules`` column; every record is kept
        (old records just do not say which schedule each kernel got). False if the table is
        not schema 1's (then the version check reports it)."""
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(measurements)"))
        if columns != _COLUMNS[:-1]:
            return False
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("ALTER TABLE measurements ADD COLUMN kernel_schedules TEXT")
            conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.execute("ROLLBACK")
            raise
        return True

    def _error(self, action: str, exc: sqlite3.Error) -> StoreError:
        """Translate an sqlite3 error into a StoreError that says what to do."""
        text = str(exc)
        lowered = text.lower()
        if "full" in lowered:
            return StoreError(f"measurement store {self.path}: disk is full ({text}); free disk space and rerun; committed records are intact")
        if "locked" in lowered or "busy" in lowered:
            return StoreError(f"measurement store {self.path} stayed locked by another process for {self._busy_timeout_s:.0f} s ({text}); retry, or raise busy_timeout_s")
        if "readonly" in lowered or "read-only" in lowered or "unable to open" in lowered or "permission" in lowered:
            return StoreError(f"{action} measurement store {self.path}: {text}; check the permissions of the file and its folder")
        if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in lowered or "not a database" in lowered or "corrupt" in lowered):
            return self._corrupt(text)
        return StoreError(f"{action} measurement store {self.path}: {text}")

    # ---- access ------------------------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"measurement store {self.path} is closed")
        return self._conn

    def get(self, key: MeasurementKey) -> MeasurementRecord | None:
        """The record stored under ``key``, or ``None``."""
        where = " AND ".join(f"{c} = ?" for c in _KEY_COLUMNS)
        try:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM measurements WHERE {where}", _key_values(key)).fetchone()
        except sqlite3.Error as exc:
            raise self._error("cannot read", exc) from exc
        return None if row is None else self._record(row)

    def _record(self, row: Sequence[Any]) -> MeasurementRecord:
        try:
            return MeasurementRecord._from_row(row)
        except StoreError as exc:
            raise self._corrupt(f"{exc}") from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, MeasurementKey) and self.get(key) is not None

    def put(self, record: MeasurementRecord) -> None:
        """Insert ``record``, replacing one with the same key; committed (fsynced) on return."""
        self.put_many([record])

    def put_many(self, records: Iterable[MeasurementRecord]) -> None:
        """Insert several records in one transaction: all are committed, or none."""
        rows = [r._row() for r in records]
        placeholders = ", ".join("?" for _ in _COLUMNS)
        db = self._db
        try:
            # IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout
            # instead of one failing when it upgrades a read lock.
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(f"INSERT OR REPLACE INTO measurements ({', '.join(_COLUMNS)}) VALUES ({placeholders})", rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error("cannot write to", exc) from exc

    def records(self, **filters: Any) -> list[MeasurementRecord]:
        """Records whose fields equal ``filters`` (any key field, or ``status``), oldest first.

        A filter value may be a list/tuple/set to match any of several values.

        :raises ConfigError: for an unknown filter name.
        """
        allowed = (*_KEY_COLUMNS, "status")
        unknown = sorted(set(filters) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown measurement filter(s) {unknown}; valid: {', '.join(allowed)}")
        clauses, params = [], []
        for name, value in filters.items():
            if isinstance(value, (list, tuple, set, frozenset)):
                values = list(value)
                clauses.append(f"{name} IN ({', '.join('?' for _ in values)})" if values else "0")
                params.extend(values)
            else:
                clauses.append(f"{name} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        try:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM measurements {where} ORDER BY created", params).fetchall()
        except sqlite3.Error as exc:
            raise self._error("cannot read", exc) from exc
        return [self._record(row) for row in rows]

    def __len__(self) -> int:
        try:
            return int(self._db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0])
        except sqlite3.Error as exc:
            raise self._error("cannot read", exc) from exc

    def stats(self) -> dict[str, Any]:
        """Counts by status, target and provider, total wall seconds spent, file size."""
        db = self._db

        def counts(column: str) -> dict[str, int]:
            return {str(k): int(n) for k, n in db.execute(f"SELECT {column}, COUNT(*) FROM measurements GROUP BY {column} ORDER BY {column}")}

        try:
            wall = db.execute("SELECT COALESCE(SUM(wall_s), 0) FROM measurements").fetchone()[0]
            return {
                "path": str(self.path),
                "schema_version": SCHEMA_VERSION,
                "records": len(self),
                "by_status": counts("status"),
                "by_target": counts("target"),
                "by_provider": counts("provider"),
                "models": int(db.execute("SELECT COUNT(DISTINCT model_fingerprint) FROM measurements").fetchone()[0]),
                "wall_s_total": float(wall),
                "file_bytes": self.path.stat().st_size,
            }
        except sqlite3.Error as exc:
            raise self._error("cannot read", exc) from exc

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent). Every put was already committed."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> MeasurementStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"MeasurementStore({str(self.path)!r}, {state})"


def _key_values(key: MeasurementKey) -> tuple[Any, ...]:
    return tuple(getattr(key, name) for name in _KEY_COLUMNS)
