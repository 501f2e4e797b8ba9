"""Tests of fusion_rl.compiler.store: keys, round trips, durability, corruption, bad paths."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusion_rl.compiler import store as store_mod
from fusion_rl.compiler.store import (
    SCHEMA_VERSION,
    MeasurementKey,
    MeasurementRecord,
    MeasurementStore,
    default_store_path,
    library_versions,
)
from fusion_rl.errors import ConfigError, StoreError

from conftest import REPO_ROOT


def make_key(**changes) -> MeasurementKey:
    key = MeasurementKey(
        model_fingerprint="model-abc",
        plan_hash="plan-123",
        target="llvm-haswell-t1",
        provider="naive",
        budget=0,
        versions="tvm=0.27.0.post1;ffi=0.1.14.post1;fusion_rl=0.1.0",
        protocol="n10r5m50",
    )
    return dataclasses.replace(key, **changes)


def make_record(key: MeasurementKey | None = None, **fields) -> MeasurementRecord:
    return MeasurementRecord.from_times(
        key or make_key(), [1.0, 1.2, 1.1, 5.0, 1.05], num_kernels=7, kernel_times_ms={"conv": 0.8, "relu": 0.2},
        wall_s=3.5, **fields,
    )


@pytest.fixture
def store(tmp_path):
    with MeasurementStore(tmp_path / "m.sqlite") as s:
        yield s


def _run_child(code: str, path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(path)], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# ---- records and keys -------------------------------------------------------------------------


def test_put_get_hit_and_miss(store) -> None:
    record = make_record()
    assert store.get(record.key) is None
    store.put(record)
    assert store.get(record.key) == record  # every field round-trips, JSON fields included
    assert record.key in store and len(store) == 1
    assert store.get(make_key(plan_hash="other")) is None


def test_from_times_median_and_iqr() -> None:
    record = make_record()
    assert record.median_ms == pytest.approx(1.1)
    assert record.spread_ms == pytest.approx(1.2 - 1.05)  # IQR: robust to the 5.0 outlier
    assert record.repeats == 5 and record.status == "ok"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_fingerprint", "model-xyz"),
        ("plan_hash", "plan-999"),
        ("target", "llvm-haswell-t2"),
        ("provider", "tuned"),
        ("budget", 16),
        ("versions", "tvm=0.28.0;ffi=0.1.15;fusion_rl=0.1.0"),
        ("protocol", "n20r5m50"),
    ],
)
def test_every_key_field_distinguishes_records(store, field: str, value) -> None:
    base, changed = make_key(), make_key(**{field: value})
    assert base != changed and base.digest() != changed.digest()
    store.put(make_record(base))
    assert store.get(changed) is None
    store.put(make_record(changed, error=None))
    assert len(store) == 2
    assert store.get(changed).key == changed and store.get(base).key == base


def test_put_replaces_same_key(store) -> None:
    store.put(make_record())
    failed = MeasurementRecord(key=make_key(), status="timeout", error="worker hung for 60 s", wall_s=60.0)
    store.put(failed)
    assert len(store) == 1
    got = store.get(make_key())
    assert got.status == "timeout" and got.median_ms is None and got.error == "worker hung for 60 s"


def test_record_dict_round_trip() -> None:
    record = make_record()
    data = record.to_dict()
    assert data["plan_hash"] == "plan-123" and data["median_ms"] == record.median_ms
    assert MeasurementRecord.from_dict(data) == record


def test_invalid_records_and_keys_rejected() -> None:
    with pytest.raises(StoreError, match="status"):
        MeasurementRecord(key=make_key(), status="great")
    with pytest.raises(StoreError, match="median"):
        MeasurementRecord(key=make_key(), status="ok", median_ms=None)
    with pytest.raises(StoreError, match="budget"):
        make_key(budget=-1)
    with pytest.raises(StoreError, match="plan_hash"):
        make_key(plan_hash="")


def test_records_filters_and_stats(store) -> None:
    store.put(make_record(make_key(target="llvm-haswell-t1")))
    store.put(make_record(make_key(target="llvm-haswell-t2")))
    store.put(MeasurementRecord(key=make_key(target="llvm-x86-64-t1"), status="crashed", error="SIGSEGV"))
    assert len(store.records()) == 3
    assert [r.key.target for r in store.records(status="ok", target="llvm-haswell-t2")] == ["llvm-haswell-t2"]
    assert len(store.records(target=["llvm-haswell-t1", "llvm-x86-64-t1"])) == 2
    with pytest.raises(ConfigError, match="valid"):
        store.records(colour="red")
    stats = store.stats()
    assert stats["records"] == 3 and stats["by_status"] == {"crashed": 1, "ok": 2}
    assert stats["schema_version"] == SCHEMA_VERSION and stats["wall_s_total"] == pytest.approx(7.0)


def test_reopen_keeps_records_and_closed_store_errors(tmp_path) -> None:
    path = tmp_path / "sub" / "dir" / "m.sqlite"  # parent folders are created
    store = MeasurementStore(path)
    record = make_record()
    store.put(record)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get(make_key())
    with MeasurementStore(path) as again:
        assert again.get(make_key()) == record
        assert len(again) == 1


def test_default_store_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FUSION_RL_CACHE", str(tmp_path))
    assert default_store_path() == tmp_path / "measurements.sqlite"
    monkeypatch.delenv("FUSION_RL_CACHE")
    assert default_store_path() == Path.home() / ".cache" / "fusion_rl" / "measurements.sqlite"


def test_library_versions_format() -> None:
    parts = dict(p.split("=", 1) for p in library_versions().split(";"))
    assert set(parts) == {"tvm", "ffi", "fusion_rl"} and parts["tvm"].startswith("0.")


# ---- durability and concurrency ---------------------------------------------------------------

_PUT_THEN_HANG = """
    import sys, time
    from fusion_rl.compiler.store import MeasurementKey, MeasurementRecord, MeasurementStore
    store = MeasurementStore(sys.argv[1])
    key = MeasurementKey("m", "p-killed", "llvm-haswell-t1", "naive", 0, "v", "n10r5m50")
    store.put(MeasurementRecord.from_times(key, [2.0, 2.5, 3.0]))
    print("committed", flush=True)
    time.sleep(60)  # never closes: the parent kills us
"""


def test_record_survives_sigkill_after_put(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    child = _run_child(_PUT_THEN_HANG, path)
    try:
        line = child.stdout.readline()
        assert line.strip() == "committed", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with MeasurementStore(path) as store:
        key = MeasurementKey("m", "p-killed", "llvm-haswell-t1", "naive", 0, "v", "n10r5m50")
        got = store.get(key)
        assert got is not None and got.median_ms == 2.5


_WRITER = """
    import sys
    from fusion_rl.compiler.store import MeasurementKey, MeasurementRecord, MeasurementStore
    with MeasurementStore(sys.argv[1]) as store:
        for i in range(10):
            key = MeasurementKey("m", f"{sys.argv[2]}-{i}", "llvm-haswell-t1", "naive", 0, "v", "n10r5m50")
            store.put(MeasurementRecord.from_times(key, [1.0]))
"""


def test_concurrent_writers(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(_WRITER), str(path), tag], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for tag in ("a", "b")
    ]
    for child in children:
        assert child.wait(timeout=60) == 0, child.stderr.read()
    with MeasurementStore(path) as store:
        assert len(store) == 20


def test_opening_never_touches_the_file_outside_sqlite(tmp_path, monkeypatch) -> None:
    """POSIX locks are per process: closing any descriptor of the store file drops the locks of
    every open connection, and another process may then delete the WAL under them (this made
    tests/compiler/test_rpc.py's concurrent-writer test read a malformed store one run in four)."""
    import builtins
    import io

    path = tmp_path / "m.sqlite"
    MeasurementStore(path).close()
    real_open, real_os_open = builtins.open, os.open

    def guarded(opener):
        def wrapper(file, *args, **kwargs):
            assert Path(os.fspath(file)) != path, "the store file was opened outside SQLite"
            return opener(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_open))
    monkeypatch.setattr(os, "open", guarded(real_os_open))
    with MeasurementStore(path) as first, MeasurementStore(path) as second:
        first.put(MeasurementRecord.from_times(make_key(), [1.0]))
        assert len(second) == 1


# ---- corruption and schema --------------------------------------------------------------------


def _assert_refused_untouched(path: Path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(StoreError, match=match) as info:
        MeasurementStore(path)
    message = str(info.value)
    assert str(path) in message and "move it aside" in message
    assert path.read_bytes() == before  # never recreated or overwritten


def test_garbage_file_is_refused(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    path.write_bytes(os.urandom(8192))
    _assert_refused_untouched(path, "not an SQLite file")


def test_empty_file_is_refused(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    path.write_bytes(b"")
    _assert_refused_untouched(path, "empty file")


def _filled_store(path: Path, n: int = 400) -> None:
    with MeasurementStore(path) as store:
        store.put_many(make_record(make_key(plan_hash=f"plan-{i}"), error="x" * 200) for i in range(n))


def test_truncated_store_is_refused(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    _filled_store(path)
    size = path.stat().st_size
    assert size > 64 * 1024
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    _assert_refused_untouched(path, "corrupt")


def test_corrupted_pages_are_refused(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    _filled_store(path)
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 6 * page] = os.urandom(3 * page)  # clobber b-tree pages, keep the header
    path.write_bytes(bytes(data))
    _assert_refused_untouched(path, "corrupt")


def test_foreign_sqlite_file_is_refused(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    _assert_refused_untouched(path, "not written by fusion_rl")


def test_schema_version_mismatch(tmp_path) -> None:
    path = tmp_path / "m.sqlite"
    with MeasurementStore(path) as store:
        store.put(make_record())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=f"schema version 99.*expects {SCHEMA_VERSION}"):
        MeasurementStore(path)


def test_schema_1_store_is_migrated_and_keeps_its_records(tmp_path) -> None:
    """A store written before ``kernel_schedules`` existed opens, keeps every record, and
    takes records with the new column."""
    path = tmp_path / "m.sqlite"
    old = make_record()
    with MeasurementStore(path) as store:
        store.put(old)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE measurements DROP COLUMN kernel_schedules")
    conn.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with MeasurementStore(path) as store:
        again = store.get(old.key)
        assert again is not None and again.median_ms == old.median_ms and again.kernel_schedules is None
        new = make_record(make_key(plan_hash="other"), kernel_schedules={"k": "microkernel"})
        store.put(new)
        assert store.get(new.key).kernel_schedules == {"k": "microkernel"}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()


# ---- bad paths and failed writes --------------------------------------------------------------


def test_directory_path_is_refused(tmp_path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        MeasurementStore(tmp_path)


def test_parent_is_a_file(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the folder"):
        MeasurementStore(blocker / "m.sqlite")


def test_unwritable_folder(tmp_path, monkeypatch) -> None:
    # Tests may run as root, where chmod does not stop writes: simulate the permission check.
    real_access = os.access
    monkeypatch.setattr(store_mod.os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(StoreError, match="not writable"):
        MeasurementStore(tmp_path / "ro" / "m.sqlite")
    assert not (tmp_path / "ro" / "m.sqlite").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_folder_real_permissions(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            MeasurementStore(ro / "m.sqlite")
    finally:
        ro.chmod(0o700)


def test_disk_full_keeps_committed_records(store) -> None:
    record = make_record()
    store.put(record)
    # SQLite reports a page-count limit as SQLITE_FULL ("database or disk is full"), the same
    # error path a full disk takes.
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    big = make_record(make_key(plan_hash="big"), error="x" * 200_000)
    with pytest.raises(StoreError, match="disk is full.*free disk space.*committed records are intact"):
        store.put(big)
    assert store.get(make_key()) == record
    assert store.get(big.key) is None and len(store) == 1
    # The store stays usable once space is back.
    store._conn.execute("PRAGMA max_page_count = 1073741823")
    store.put(big)
    assert len(store) == 2
