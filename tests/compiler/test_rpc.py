"""Measuring through TVM's RPC tracker, on loopback: a tracker and two servers on 127.0.0.1.

Everything a test starts (tracker, servers) runs in its own process group and is killed by a
fixture finalizer. No test waits on a clock: readiness is polled with a bounded wait, and the
"server dies mid-measurement" case is staged with the ``hang_run`` fault, which tells the test
which server is serving (the fault marker) before the test kills exactly that one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.pool import MeasurerPool
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.errors import ConfigError

QUICK = TimingProtocol.quick()
KEY = "fusion_rl_test"
READY_S = 60.0  # bound on waiting for a process to come up (never reached when things work)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(ready, what: str, limit_s: float = READY_S) -> None:
    deadline = time.monotonic() + limit_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready within {limit_s:g} s")
        time.sleep(0.05)


def _alive(proc: subprocess.Popen, what: str) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{what} exited with status {proc.returncode}")
    return True


class Cluster:
    """A tracker and RPC servers on loopback, each in its own process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.servers: dict[int, subprocess.Popen] = {}
        self.main_ports: list[int] = []  # the servers of KEY the module fixture started
        self.tracker_port = _free_port()
        # TVM_NUM_THREADS=1: two servers and the workers share this machine's cores.
        self.env = dict(os.environ, TVM_NUM_THREADS="1")
        tracker = self._spawn("tvm.exec.rpc_tracker", "--port", str(self.tracker_port),
                              "--port-end", str(self.tracker_port + 1))
        _poll(lambda: _alive(tracker, "the RPC tracker") and self._tracker_up(), "the RPC tracker")

    def _spawn(self, module: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", *args, "--silent"],
                                env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def _tracker_up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.tracker_port), timeout=1).close()
            return True
        except OSError:
            return False

    def add_servers(self, n: int, key: str = KEY) -> list[int]:
        """Start ``n`` servers under ``key``; returns their ports once the tracker lists them."""
        ports = [_free_port() for _ in range(n)]
        for port in ports:
            self.servers[port] = self._spawn(
                "tvm.exec.rpc_server", "--port", str(port), "--port-end", str(port + 1),
                "--tracker", f"127.0.0.1:{self.tracker_port}", "--key", key)
        _poll(lambda: all(_alive(self.servers[p], "an RPC server") for p in ports) and self.listed(key) == n,
              f"{n} RPC servers at the tracker")
        return ports

    def listed(self, key: str = KEY) -> int:
        """Servers of ``key`` the tracker knows."""
        from tvm import rpc

        summary = rpc.connect_tracker("127.0.0.1", self.tracker_port).summary()
        return sum(1 for s in summary.get("server_info", []) if s["key"] == f"server:{key}")

    def target(self, key: str = KEY) -> str:
        return f"rpc://127.0.0.1:{self.tracker_port}/{key}:host"

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its session processes
        proc.wait()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                self.kill(proc)
            except ProcessLookupError:
                proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """A tracker with two servers under KEY, shared by this module's tests (a test that kills a
    server adds its own under another key); everything stopped afterwards."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (a fusion_rl dependency)")
    c = Cluster()
    try:
        c.main_ports = c.add_servers(2)
        yield c
    finally:
        c.stop()


@pytest.fixture()
def plans(model_cache):
    from fusion_rl.baselines.search import legal_plans

    model = model_cache("mlp_tiny")
    return model, legal_plans(model.graph, limit=1024)[:6]


def test_rpc_targets_parse_into_the_store_key():
    spec = parse_target("rpc://10.0.0.5:9190/rasp4:aarch64:cortex-a72:t4")
    assert spec.remote.address == "10.0.0.5:9190/rasp4" and spec.mtriple == "aarch64-linux-gnu"
    assert spec.key == "rpc://10.0.0.5:9190/rasp4:llvm-aarch64-linux-gnu-cortex-a72+neon-t4"
    local = parse_target("host")
    assert parse_target("rpc://h:1/k:host").key == f"rpc://h:1/k:{local.key}"
    assert parse_target("rpc://h:1/other:host").key != parse_target("rpc://h:1/k:host").key
    # The hardware-feature cache names its file after the key: one file, in the cache folder.
    from fusion_rl.compiler.target.hardware import cache_file

    assert cache_file(Path("cache"), spec.key, "host", "cpu").parent == Path("cache")
    for bad in ("rpc://", "rpc://h/k:host", "rpc://h:99999/k:host", "rpc://h:1/k:", "rpc://h:1/k:nope",
                "rpc://h:1/k:rpc://h:1/k:host"):
        with pytest.raises(ConfigError):
            parse_target(bad)


@pytest.mark.parametrize("bad", ["rpc://127.0.0.1/k:host", "rpc://127.0.0.1:0/k:host", "rpc://127.0.0.1:1/k:bogus"])
def test_cli_bad_rpc_target_is_one_error_line(bad, capsys):
    from fusion_rl.cli import main

    code = main(["measure", "mlp_tiny", "--rules", "tvm", "--no-store", "--target", bad])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err


def test_cli_unreachable_tracker_or_unserved_key_is_one_error_line(cluster, capsys):
    from fusion_rl.cli import main

    for target, words in ((f"rpc://127.0.0.1:{_free_port()}/k:host", "cannot reach the RPC tracker"),
                          (cluster.target("nobody"), "no RPC server of key 'nobody'")):
        code = main(["measure", "mlp_tiny", "--rules", "tvm", "--no-store", "--target", target])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_measure_through_rpc_is_verified_and_stored(cluster, model_cache, tmp_path):
    from fusion_rl.compiler.rpc import run_remote_job
    from fusion_rl.compiler.verify import reference_outputs
    from fusion_rl.compiler.worker import MeasureJob
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)
    with MeasurementStore(tmp_path / "m.sqlite") as store, \
            Measurer(cluster.target(), store=store, protocol=QUICK, timeout_s=120) as m:
        record = m.measure(model, plan)
        assert record.status == "ok" and record.median_ms > 0, record.error
        assert record.key.target.startswith(f"rpc://127.0.0.1:{cluster.tracker_port}/{KEY}:llvm-")
        assert store.get(record.key) is not None and sum(m.devices.values()) == 1
    # The device's outputs are what is checked: against a wrong reference they fail.
    job = MeasureJob(model=model.ref, plan=plan.to_dict(), target=parse_target(cluster.target()),
                     schedule="naive", protocol=QUICK, fingerprint=model.fingerprint)
    good = run_remote_job(job, {(model.ref, model.fingerprint): model})
    assert good["status"] == "ok" and good["verify"]["ok"] and good["verify"]["reference"] == "onnxruntime"
    expected, source = reference_outputs(model)
    model.reference = ([e + 1.0 for e in expected], source)
    try:
        bad = run_remote_job(job, {(model.ref, model.fingerprint): model})
    finally:
        model.reference = (expected, source)
    assert bad["status"] == "wrong_output" and "on the device" in bad["error"]


def test_cli_measure_rpc_matches_local(cluster, capsys):
    from fusion_rl.cli import main

    def measure(target: str) -> dict:
        code = main(["measure", "mlp_tiny", "--rules", "tvm", "--no-store", "--repeat", "3",
                     "--min-repeat-ms", "5", "--json", "--target", target])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    remote, local = measure(cluster.target()), measure("host")
    assert remote["verified"] and local["verified"]
    assert remote["target"] == f"rpc://127.0.0.1:{cluster.tracker_port}/{KEY}:{local['target']}"
    for field in ("plan_hash", "num_kernels", "fingerprint", "status", "kernel_schedules"):
        assert remote[field] == local[field]


def test_search_spreads_over_two_servers(cluster, model_cache, tmp_path):
    from fusion_rl.baselines.search import random_search

    model = model_cache("mlp_tiny")
    with MeasurerPool.create(2, store_path=str(tmp_path / "m.sqlite"), target=cluster.target(),
                             protocol=QUICK, timeout_s=120) as pool:
        result = random_search(model, pool, budget=4, seed=0)
        assert result.evaluations == 4 and result.failures == 0 and result.measurements_spent == 4
        # The tracker hands each session the server that waited longest: both served.
        assert sorted(pool.devices) == sorted(f"127.0.0.1:{p}" for p in cluster.main_ports)
        assert len(MeasurementStore(tmp_path / "m.sqlite")) == 4


def test_a_server_killed_mid_measurement_costs_one_measurement(cluster, plans, tmp_path, monkeypatch):
    marker = tmp_path / "serving"
    monkeypatch.setenv("FUSION_RL_FAULT_MARKER", str(marker))
    ports = cluster.add_servers(2, key="fusion_rl_kill")
    model, ps = plans
    with MeasurerPool.create(2, target=cluster.target("fusion_rl_kill"), protocol=QUICK, timeout_s=120) as pool:
        hung: dict = {}
        thread = threading.Thread(target=lambda: hung.update(r=pool.members[0].measure(model, ps[0], fault="hang_run")))
        thread.start()
        try:
            _poll(lambda: marker.exists() and marker.read_text(), "the hanging measurement")
            victim = int(marker.read_text().rsplit(":", 1)[1])
            cluster.kill(cluster.servers[victim])
        finally:
            thread.join(timeout=READY_S)
        assert hung["r"].status == "crashed" and "disconnected" in hung["r"].error
        # The other server carries on, for both members.
        records = pool.measure_many(model, ps[1:5])
        assert [r.status for r in records] == ["ok"] * 4
        survivor = next(f"127.0.0.1:{p}" for p in ports if p != victim)
        assert pool.devices == {f"127.0.0.1:{victim}": 1, survivor: 4}
        assert pool.stats.to_dict() == {"hits": 0, "misses": 5, "failures": 1}


def test_store_stays_consistent_under_concurrent_writers(tmp_path, model_cache):
    """Threads (each with a store made in the main thread) and processes write at once."""
    from fusion_rl.compiler.store import MeasurementKey, MeasurementRecord

    path = tmp_path / "m.sqlite"
    MeasurementStore(path).close()

    def record(writer: str, i: int) -> MeasurementRecord:
        key = MeasurementKey("fp", f"{writer}-{i}", "t", "naive", 0, "v", "p")
        return MeasurementRecord.from_times(key, [1.0, 2.0, 3.0])

    stores = [MeasurementStore(path) for _ in range(4)]  # made here, used in the threads
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(25):
                stores[k].put(record(f"thread{k}", i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    code = ("import sys; from fusion_rl.compiler.store import *; s = MeasurementStore(sys.argv[1]); "
            "[s.put(MeasurementRecord.from_times(MeasurementKey('fp', f'proc{sys.argv[2]}-{i}', 't', 'naive', 0, "
            "'v', 'p'), [1.0])) for i in range(25)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(k)]) for k in range(2)]
    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait() for p in procs] == [0, 0] and not errors, errors
    with MeasurementStore(path) as s:
        assert len(s) == 6 * 25
        assert s.get(record("thread3", 24).key).times_ms == [1.0, 2.0, 3.0]
    for s in stores:
        s.close()


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="no aarch64 cross toolchain: apt-get install gcc-aarch64-linux-gnu")
def test_cross_compile_for_aarch64_gives_an_aarch64_library(model_cache, tmp_path):
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.compiler.rpc import export_library
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    spec = parse_target("aarch64:cortex-a72:t4")
    compiled = compile_plan(model, make_plan("tvm", model.mod, model.graph), spec.to_tvm(), make_schedule("naive"))
    header = export_library(compiled.executable, spec, tmp_path).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
    assert int(np.frombuffer(header[18:20], "<u2")[0]) == 183  # e_machine == EM_AARCH64


def test_missing_cross_toolchain_names_the_package(monkeypatch):
    from fusion_rl.compiler import rpc

    monkeypatch.setattr(rpc.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install gcc-aarch64-linux-gnu"):
        rpc.cross_compiler("aarch64-linux-gnu")


def test_cross_target_is_not_run_here(model_cache):
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    with pytest.raises(ConfigError, match="compiled for aarch64-linux-gnu.*rpc://HOST:PORT/KEY:aarch64:generic:t1"):
        Measurer("aarch64:generic:t1", isolate=False).measure(model, make_plan("unfused", model.mod, model.graph))


@pytest.mark.parametrize("algo", ["random", "greedy"])
def test_a_pool_search_evaluates_what_one_runner_does(algo, model_cache, tmp_path):
    """Batching plans over runners must not change a search: served from a store that one runner
    filled, a 2-runner search evaluates the same plans, finds the same best and spends nothing."""
    from fusion_rl.baselines.search import run_search

    model = model_cache("mlp_tiny")
    path = tmp_path / "m.sqlite"
    with MeasurementStore(path) as store, Measurer(store=store, protocol=QUICK, isolate=False) as one:
        alone = run_search(algo, model, one, budget=5, seed=3)
    with MeasurerPool.create(2, store_path=str(path), protocol=QUICK) as pool:
        pooled = run_search(algo, model, pool, budget=5, seed=3)
        assert pool.stats.to_dict() == {"hits": 5, "misses": 0, "failures": 0}
    assert pooled.evaluations == alone.evaluations == 5 and pooled.measurements_spent == 0
    assert pooled.best_plan.hash == alone.best_plan.hash and pooled.best_ms == alone.best_ms
