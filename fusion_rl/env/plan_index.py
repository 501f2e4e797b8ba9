"""A sidecar of the measurement store: plan hash -> groups, so stored per-kernel times can be
mapped back to groups in a later process.

A :class:`~fusion_rl.compiler.store.MeasurementRecord` names its plan only by hash; the
``kernel`` reward needs the plan's groups to turn ``kernel_times_ms`` into group latencies
(:func:`fusion_rl.compiler.kernels.group_kernel_times`). The store's schema is not ours to
change, so the groups go into their own small SQLite file beside it
(``measurements.sqlite`` -> ``measurements.plans.sqlite``), WAL mode like the store, so that the
envs of a ``SubprocVecEnv`` share it safely.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable

from fusion_rl.errors import FusionRLError, StoreError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.io import parse_json

_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan_hash   TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    num_nodes   INTEGER NOT NULL,
    groups      TEXT NOT NULL
) WITHOUT ROWID
"""


def plan_index_path(store_path: str | os.PathLike) -> Path:
    """The sidecar path of a store: ``<stem>.plans.sqlite`` in the store's folder."""
    path = Path(store_path)
    return path.with_name(f"{path.stem}.plans.sqlite")


class PlanIndex:
    """plan hash -> :class:`FusionPlan`, persistent and shared between processes."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._conn = self._open(busy_timeout_s)  # now, so a bad path fails at construction

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, (re)opened on demand: an env may be reset again after close()."""
        if self._conn is None:
            self._conn = self._open(self._busy_timeout_s)
        return self._conn

    def _open(self, busy_timeout_s: float) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SCHEMA)
            return conn
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"cannot open the plan index {self.path}: {exc}; it is a cache beside the "
                "measurement store, so moving it aside (or deleting it) is safe"
            ) from exc

    def put(self, plan: FusionPlan) -> None:
        """Remember ``plan``'s groups under its hash (idempotent)."""
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO plans VALUES (?, ?, ?, ?)",
                (plan.hash, plan.fingerprint, plan.num_nodes, json.dumps([list(g) for g in plan.groups])),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the plan index {self.path}: {exc}") from exc

    def get_many(self, hashes: Iterable[str]) -> dict[str, FusionPlan]:
        """The known plans among ``hashes``."""
        wanted = list(dict.fromkeys(hashes))
        out: dict[str, FusionPlan] = {}
        try:
            for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[i:i + 500]
                rows = self._db.execute(
                    f"SELECT plan_hash, fingerprint, num_nodes, groups FROM plans "
                    f"WHERE plan_hash IN ({', '.join('?' for _ in chunk)})", chunk,
                ).fetchall()
                for plan_hash, fingerprint, num_nodes, groups in rows:
                    out[plan_hash] = FusionPlan.from_dict(
                        {"groups": parse_json(str(groups), f"plan index {self.path}", StoreError),
                         "num_nodes": num_nodes, "fingerprint": fingerprint})
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the plan index {self.path}: {exc}") from exc
        except FusionRLError as exc:  # a damaged row: the index is a cache, so say how to drop it
            raise StoreError(f"the plan index {self.path} holds a bad plan ({exc}); it is a cache "
                             "beside the measurement store, so moving it aside is safe") from None
        return out

    def close(self) -> None:
        """Close the connection (idempotent; the next use reopens it)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
