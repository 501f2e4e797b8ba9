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
  ``busy_timeout_s`` for the lock. Use one :class:`MeasurementStore` per process or
  concurrent thread (a store may move between threads, but must not be used by two at once);
  tests/test_rpc.py writes from several threads and processes at once.
- **No silent data loss.** A new store is built in a temporary file and linked into place
  atomically, so a store path holds either nothing or a complete store. An existing file that
  is not a store of this schema, fails ``PRAGMA quick_check``, or is truncated raises
  :class:`StoreError` naming the path and the way out (move it aside); it is never recreated
  or overwritten. A failed write (disk full, lock timeout) is rolled back and raises
  :class:`StoreError`; committed records stay readable.

The key and record types live in :mod:`fusion_rl.compiler.records` and are re-exported here.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from fusion_rl.compiler.records import (
    COLUMNS,
    KEY_COLUMNS,
    STATUSES,
    MeasurementKey,
    MeasurementRecord,
    key_values,
    library_versions,
)
from fusion_rl.errors import ConfigError, StoreError

#: Version of the table layout below. Bump it (and add a migration or tell users to start a new
#: store) whenever a column changes meaning or is added.
SCHEMA_VERSION = 2  # 2: kernel_schedules
#: Marks a SQLite file as a fusion_rl store (``PRAGMA application_id``; ASCII "FuRL").
APPLICATION_ID = 0x4675524C

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
    PRIMARY KEY ({", ".join(KEY_COLUMNS)})
) WITHOUT ROWID;
CREATE INDEX measurements_by_model_target ON measurements (model_fingerprint, target);
"""


def default_store_path() -> Path:
    """``$FUSION_RL_CACHE/measurements.sqlite``, else ``~/.cache/fusion_rl/measurements.sqlite``."""
    root = os.environ.get("FUSION_RL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fusion_rl") / "measurements.sqlite"


class MeasurementStore:
    """A SQLite file of :class:`MeasurementRecord`, keyed by :class:`MeasurementKey`.

    >>> with MeasurementStore(default_store_path()) as store:  # doctest: +SKIP
    ...     if store.get(key) is None:
    ...         store.put(measure(key))

    Parameters
    ----------
    path
        The store file; created (with parent folders) if absent.
    busy_timeout_s
        How long a write waits for another process's write lock.
    check
        Run ``PRAGMA quick_check`` on open (O(store size); on by default so that
        corruption is found before new results are added to a broken file).

    Raises
    ------
    StoreError
        for an unwritable path, a file that is not a store of this schema
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
        # Never open the store file outside SQLite: POSIX record locks belong to the process,
        # and closing *any* descriptor of the file drops the locks of every SQLite connection
        # this process holds on it. Another process then believes it is the last user,
        # checkpoints and deletes the WAL under our feet, and the store reads as malformed.
        # So the size comes from stat() and the header from SQLite itself, which only reads:
        # an empty file must not be initialized into a store (it may have been something else).
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read measurement store {self.path}: {exc.strerror or exc}") from exc
        if size < 100:
            raise self._corrupt("not an SQLite file, or truncated" if size else "empty file")

        # check_same_thread=False: a measurer made in one thread may measure in a pool thread
        # (fusion_rl.compiler.pool); one thread at a time uses a store, and concurrent writers
        # each hold their own store (connection), so SQLite's locking keeps them consistent.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            try:
                application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise self._corrupt("not an SQLite file, or truncated") from exc
            if application_id != APPLICATION_ID:
                raise self._corrupt("an SQLite file, but not written by fusion_rl")
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
        if columns != COLUMNS:
            raise self._corrupt(f"measurements table has columns {columns}, expected {COLUMNS}")

    @staticmethod
    def _migrate_from_1(conn: sqlite3.Connection) -> bool:
        """Schema 1 -> 2 adds the nullable ``kernel_schedules`` column; every record is kept
        (old records just do not say which schedule each kernel got). False if the table is
        not schema 1's (then the version check reports it)."""
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(measurements)"))
        if columns != COLUMNS[:-1]:
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
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        try:
            row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM measurements WHERE {where}", key_values(key)).fetchone()
        except sqlite3.Error as exc:
            raise self._error("cannot read", exc) from exc
        return None if row is None else self._record(row)

    def _record(self, row: Sequence[Any]) -> MeasurementRecord:
        try:
            return MeasurementRecord.from_row(row)
        except StoreError as exc:
            raise self._corrupt(f"{exc}") from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, MeasurementKey) and self.get(key) is not None

    def put(self, record: MeasurementRecord) -> None:
        """Insert ``record``, replacing one with the same key; committed (fsynced) on return."""
        self.put_many([record])

    def put_many(self, records: Iterable[MeasurementRecord]) -> None:
        """Insert several records in one transaction: all are committed, or none."""
        rows = [r.to_row() for r in records]
        placeholders = ", ".join("?" for _ in COLUMNS)
        db = self._db
        try:
            # IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout
            # instead of one failing when it upgrades a read lock.
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(f"INSERT OR REPLACE INTO measurements ({', '.join(COLUMNS)}) VALUES ({placeholders})", rows)
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

        Raises
        ------
        ConfigError
            for an unknown filter name.
        """
        allowed = (*KEY_COLUMNS, "status")
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
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM measurements {where} ORDER BY created", params).fetchall()
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


__all__ = [
    "APPLICATION_ID", "SCHEMA_VERSION", "STATUSES", "MeasurementKey", "MeasurementRecord",
    "MeasurementStore", "default_store_path", "library_versions",
]
