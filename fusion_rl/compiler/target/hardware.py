"""Hardware features: cache sizes, measured compute and memory rates, and the feature vector.

Seven of the ten features need no timing: vector lanes (the target's ISA, from LLVM's CPU
features), thread count, core count, and the L1d/L2/L3 sizes (sysfs). Three come from a timed
micro-benchmark (fp32 GFLOP/s, copy bandwidth, and their ratio), and are taken robustly:

- each measurement is a best-of over repeated runs (:func:`run_microbenchmark`);
- before each one, the 1-minute load average is compared with the cores the benchmark needs
  (:func:`is_loaded`). On a loaded machine it is measured again (up to :data:`LOADED_RETRIES`
  times, keeping the best), and a measurement that was still taken under load is never written
  to the cache: once on this project's 2-core machine, a loaded run cached 77 GFLOP/s where an
  idle one measures 316. It is shared for :data:`LOADED_SHARE_S` only, beside the cache, with the
  other processes of the same run (workers, CLI subprocesses, test processes), which see the
  same load: they get the same numbers instead of each paying the retries again;
- how it was taken (attempts, load, cores, whether it was cached) is recorded with it
  (:attr:`HardwareFeatures.measurement`). Cache files from before this record existed
  (:data:`CACHE_VERSION`) are measured again.

Measurements are cached per machine as JSON (:func:`default_hw_cache_dir`). The vector a policy
sees is normalised with its training targets' statistics: :mod:`fusion_rl.compiler.target.normalize`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fusion_rl.compiler.target.host import cuda_available, detect_host_mcpu, host_num_threads, read_cpuinfo
from fusion_rl.compiler.target.spec import TargetSpec, parse_target
from fusion_rl.compiler.target.threads import worker_env
from fusion_rl.errors import ConfigError, MeasurementError

#: Version of the cache files' content; files of another version (or none: written before the
#: measurement protocol was recorded, possibly under load) are measured again.
CACHE_VERSION = 2
#: Extra measurements when the machine is loaded before one: best of all of them is kept.
LOADED_RETRIES = 2
#: Runnable processes the 1-minute load average may exceed the cores the benchmark leaves free
#: by before the machine counts as loaded (an idle Linux box sits at 0-0.3).
LOAD_SLACK = 0.5

#: Seconds a measurement taken under load is shared with other processes (never cached).
LOADED_SHARE_S = 300.0

_log = logging.getLogger("fusion_rl.hardware")
#: Rates measured under load in this process (never cached on disk): one process measures once
#: and keeps using the same numbers, so its observations stay consistent.
_SESSION_RATES: dict[tuple[str, int], dict[str, Any]] = {}


def machine_load() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def is_loaded(load: float | None, num_threads: int, cores: int) -> bool:
    """Whether a benchmark on ``num_threads`` threads would share its cores with other work:
    the load average exceeds the cores it leaves free by more than :data:`LOAD_SLACK`. An
    unknown load (None) counts as not loaded: nothing better is known."""
    return load is not None and load > max(0, cores - num_threads) + LOAD_SLACK


def _parse_size(text: str) -> int:
    """'32K' / '1024K' / '32M' / '32768' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not m:
        return 0
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(m.group(1)) * scale


def cache_sizes(sysfs: str | os.PathLike[str] = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """L1d, L2 and L3 sizes in bytes of CPU 0 (0 where unknown).

    Read from sysfs; falls back to ``os.sysconf`` (glibc) when sysfs is unavailable.
    """
    sizes = {"l1d": 0, "l2": 0, "l3": 0}
    root = Path(sysfs)
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level = int((index / "level").read_text().strip())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if level == 1 and kind in ("Data", "Unified"):
            sizes["l1d"] = size
        elif level in (2, 3) and kind in ("Unified", "Data"):
            sizes[f"l{level}"] = size
    for name, conf in (("l1d", "SC_LEVEL1_DCACHE_SIZE"), ("l2", "SC_LEVEL2_CACHE_SIZE"), ("l3", "SC_LEVEL3_CACHE_SIZE")):
        if not sizes[name]:
            try:
                sizes[name] = max(0, int(os.sysconf(conf)))
            except (ValueError, OSError, AttributeError):
                pass
    return sizes


# The micro-benchmark runs in a fresh interpreter so that the BLAS thread count (fixed when
# numpy loads OpenBLAS) matches the target's thread count, whatever the caller has loaded.
_BENCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    threads, seconds = int(sys.argv[1]), float(sys.argv[2])

    def best_of(fn):
        fn()  # warm-up: page faults, BLAS thread start
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
        return best

    n = 1024
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32); b = rng.random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    gflops = 2.0 * n**3 / best_of(lambda: np.matmul(a, b, out=c)) / 1e9

    src = np.ones(1 << 24, dtype=np.float32)  # 64 MiB: larger than any L3 we expect
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:  # numpy copies release the GIL
        copy = lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))
        bandwidth = 2.0 * src.nbytes / best_of(copy) / 1e9  # read + write bytes
    print(json.dumps({"peak_gflops": gflops, "mem_bw_gbs": bandwidth}))
    """
)


def run_microbenchmark(num_threads: int, seconds: float = 0.25) -> dict[str, float]:
    """Measure fp32 GFLOP/s (numpy sgemm 1024³) and copy bandwidth (GB/s, 64 MiB, read+write).

    Best-of over ``seconds`` each, with ``num_threads`` BLAS and copy threads, in a fresh
    process. These are achievable rates with a tuned library, not theoretical peaks.

    Raises
    ------
    MeasurementError
        if the benchmark process fails or times out.
    """
    cmd = [sys.executable, "-c", _BENCH_SCRIPT, str(num_threads), str(seconds)]
    try:
        proc = subprocess.run(
            cmd, env=worker_env(num_threads), capture_output=True, text=True, timeout=60 + 10 * seconds
        )
    except subprocess.TimeoutExpired as exc:
        raise MeasurementError(f"hardware micro-benchmark timed out after {exc.timeout:.0f} s; is the machine overloaded?") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise MeasurementError(f"hardware micro-benchmark failed (exit {proc.returncode}): {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: float(result[k]) for k in ("peak_gflops", "mem_bw_gbs")}


@dataclasses.dataclass(frozen=True)
class HardwareFeatures:
    """Raw hardware description of a target on this machine; :meth:`as_vector` puts it on fixed
    log scales, and :class:`~fusion_rl.compiler.target.normalize.HardwareStats` normalises that
    vector with the training targets' statistics before a policy sees it.

    Sizes are bytes, rates come from :func:`run_microbenchmark` (see :func:`hardware_features`
    for how ``peak_gflops`` accounts for the target ISA); 0 means unknown.
    """

    target_key: str
    vector_lanes: int
    num_threads: int
    num_cores: int
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    peak_gflops: float
    mem_bw_gbs: float
    measured_gflops: float = 0.0
    is_gpu: bool = False
    hostname: str = ""
    cpu_model: str = ""
    #: How the timed rates were measured (:func:`rates_record`'s ``protocol``); not a feature.
    measurement: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    #: Order of :meth:`as_vector`. Each entry is ``log2(1 + x) / scale`` (0 stays 0 = unknown)
    #: with a fixed scale that maps typical values to about 0..1.5, except ``is_gpu`` (0/1).
    FEATURE_NAMES: ClassVar[tuple[str, ...]] = (
        "log_vector_lanes",     # lanes 4/8/16 -> 0.46/0.63/0.82 (scale 5)
        "log_num_threads",      # threads used by TVM (scale 6)
        "log_num_cores",        # cores of the machine (scale 6)
        "log_l1d_kib",          # L1 data cache, KiB (scale 10)
        "log_l2_kib",           # L2 per core, KiB (scale 10)
        "log_l3_kib",           # L3, KiB (scale 10)
        "log_peak_gflops",      # measured fp32 GFLOP/s, scaled to the target ISA (scale 10)
        "log_mem_bw_gbs",       # measured copy bandwidth, GB/s (scale 10)
        "log_machine_balance",  # FLOP per byte = peak / bandwidth: roofline ridge (scale 6)
        "is_gpu",
    )
    _SCALES: ClassVar[tuple[float, ...]] = (5, 6, 6, 10, 10, 10, 10, 10, 6)

    def as_vector(self) -> np.ndarray:
        """Fixed-length float32 vector in the order of :attr:`FEATURE_NAMES`."""
        balance = self.peak_gflops / self.mem_bw_gbs if self.mem_bw_gbs > 0 else 0.0
        raw = (
            self.vector_lanes, self.num_threads, self.num_cores,
            self.l1d_bytes / 1024, self.l2_bytes / 1024, self.l3_bytes / 1024,
            self.peak_gflops, self.mem_bw_gbs, balance,
        )
        values = [math.log2(1.0 + max(0.0, float(x))) / s for x, s in zip(raw, self._SCALES)]
        values.append(1.0 if self.is_gpu else 0.0)
        return np.asarray(values, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the cache files."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareFeatures:
        """The inverse of :meth:`to_dict` (unknown keys, e.g. ``measured_at``, are ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def default_hw_cache_dir() -> Path:
    """``$FUSION_RL_CACHE/hw``, else ``~/.cache/fusion_rl/hw``."""
    root = os.environ.get("FUSION_RL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fusion_rl") / "hw"


def cache_file(cache_dir: Path, stem: str, hostname: str, cpu_model: str) -> Path:
    """The file in ``cache_dir`` that caches ``stem`` (a target key, or rates) for one machine."""
    # The name stays readable; the digest keeps machines with the same hostname but another CPU
    # (e.g. a re-provisioned VM) apart.
    digest = hashlib.sha256(f"{stem}|{hostname}|{cpu_model}".encode()).hexdigest()[:12]
    safe_host = re.sub(r"[^A-Za-z0-9_.-]", "_", hostname)[:40]
    # Remote target keys (rpc://HOST:PORT/KEY:...) hold '/' and ':'; local keys are unchanged.
    safe_stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", stem)
    return cache_dir / f"{safe_stem}-{safe_host}-{digest}.json"


def _host_identity() -> tuple[str, str]:
    _, cpu_model = read_cpuinfo()
    return socket.gethostname(), cpu_model or platform.processor() or platform.machine()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, unreadable or half-written: treat as a cache miss
    return data if isinstance(data, dict) else None


def measured_rates(
    num_threads: int, cache_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> dict[str, float]:
    """Machine GFLOP/s and GB/s at ``num_threads``: the two rates of :func:`rates_record`."""
    record = rates_record(num_threads, cache_dir, refresh=refresh)
    return {k: float(record[k]) for k in ("peak_gflops", "mem_bw_gbs")}


def rates_record(
    num_threads: int, cache_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> dict[str, Any]:
    """Machine GFLOP/s and GB/s at ``num_threads`` and how they were measured.

    Cached per thread count (not per target): the micro-benchmark does not depend on the LLVM
    CPU model, and sharing one measurement keeps targets with equal threads consistent instead
    of differing by whatever load the machine had at each measurement. A measurement taken
    under load (see the module docstring) is not cached; it is shared for :data:`LOADED_SHARE_S`.

    Returns
    -------
    dict
        ``peak_gflops``, ``mem_bw_gbs`` and ``protocol``: ``attempts``, ``load_1min`` (before
        each attempt), ``cores``, ``num_threads``, ``loaded`` and ``cached``.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_hw_cache_dir()
    hostname, cpu_model = _host_identity()
    path = cache_file(directory, f"rates-t{num_threads}", hostname, cpu_model)
    session_key = (str(path), num_threads)
    if not refresh:
        cached = _read_json(path)
        if _is_rates_record(cached):
            return cached
        if session_key in _SESSION_RATES:
            return _SESSION_RATES[session_key]
        shared = _read_json(_loaded_file(path))
        if _is_rates_record(shared) and 0 <= time.time() - float(shared["measured_at"]) < LOADED_SHARE_S:
            _SESSION_RATES[session_key] = shared
            return shared
    cores = host_num_threads()
    best: dict[str, float] | None = None
    loads: list[float | None] = []
    for _ in range(1 + LOADED_RETRIES):
        loads.append(machine_load())
        rates = run_microbenchmark(num_threads)
        # Interference only ever slows a run down: the best of the attempts is the least disturbed.
        best = rates if best is None else {k: max(best[k], rates[k]) for k in best}
        if not is_loaded(loads[-1], num_threads, cores):
            break
    assert best is not None
    loaded = is_loaded(loads[-1], num_threads, cores)
    record: dict[str, Any] = {
        **best, "num_threads": num_threads, "hostname": hostname, "cpu_model": cpu_model,
        "measured_at": time.time(), "cache_version": CACHE_VERSION,
        "protocol": {"method": "numpy sgemm 1024^3 and 64 MiB copy, best of 0.25 s each, in a fresh process",
                     "attempts": len(loads), "load_1min": loads, "cores": cores, "num_threads": num_threads,
                     "loaded": loaded, "cached": not loaded},
    }
    _SESSION_RATES.pop(session_key, None)
    if loaded:
        _log.info("hardware rates at %d thread(s) measured under load (1-min load %.1f on %d cores) after %d "
                  "attempts; not cached, shared with this run's processes for %.0f s", num_threads, loads[-1], cores, len(loads), LOADED_SHARE_S)
        _SESSION_RATES[session_key] = record
        _write_json_atomic(_loaded_file(path), record)
    else:
        _write_json_atomic(path, record)
        _loaded_file(path).unlink(missing_ok=True)
    return record


def _is_rates_record(data: dict[str, Any] | None) -> bool:
    """Whether ``data`` is a rates record of this :data:`CACHE_VERSION` (cached or shared)."""
    return (data is not None and data.get("cache_version") == CACHE_VERSION
            and {"peak_gflops", "mem_bw_gbs", "protocol", "measured_at"} <= data.keys())


def _loaded_file(path: Path) -> Path:
    """Where a measurement taken under load is shared (not ``*.json``: it is no cache entry)."""
    return path.with_name(path.name + ".loaded")


def hardware_features(
    spec: TargetSpec | str, cache_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> HardwareFeatures:
    """Hardware features of ``spec`` on this machine, measured once and cached as JSON.

    Files in ``cache_dir`` (default :func:`default_hw_cache_dir`) are keyed by target key (or
    thread count, for the raw rates) + hostname + CPU model, so a home directory shared across
    machines does not mix their numbers. ``refresh=True`` measures again.

    ``peak_gflops`` is the measured numpy sgemm rate scaled by ``target lanes / host lanes``
    (at most 1): numpy runs the host's best ISA whatever the target, while code compiled for
    ``x86-64`` (SSE2) can reach only a quarter of an AVX-512 host's rate. ``measured_gflops``
    keeps the raw number. Bandwidth does not depend on the ISA and is not scaled.

    For ``cuda`` targets, lanes = warp size and cores = SM count; rates are not measured yet
    (0 = unknown).
    """
    spec = parse_target(spec)
    directory = Path(cache_dir) if cache_dir is not None else default_hw_cache_dir()
    hostname, cpu_model = _host_identity()
    path = cache_file(directory, spec.key, hostname, cpu_model)
    cached = None if refresh else _read_json(path)
    if cached is not None and cached.get("cache_version") == CACHE_VERSION:
        try:
            return HardwareFeatures.from_dict(cached)
        except TypeError:
            pass  # stale format: measure again and overwrite

    if spec.kind == "cuda":
        features = _cuda_features(spec, hostname, cpu_model)
    else:
        caches = cache_sizes()
        rates = rates_record(spec.num_threads, directory, refresh=refresh)
        host_lanes = TargetSpec(name="host", kind="llvm", mcpu=detect_host_mcpu()).vector_lanes
        isa_scale = min(1.0, spec.vector_lanes / host_lanes)
        features = HardwareFeatures(
            target_key=spec.key,
            vector_lanes=spec.vector_lanes,
            num_threads=spec.num_threads,
            num_cores=host_num_threads(),
            l1d_bytes=caches["l1d"],
            l2_bytes=caches["l2"],
            l3_bytes=caches["l3"],
            peak_gflops=rates["peak_gflops"] * isa_scale,
            mem_bw_gbs=rates["mem_bw_gbs"],
            measured_gflops=rates["peak_gflops"],
            hostname=hostname,
            cpu_model=cpu_model,
            measurement=dict(rates["protocol"]),
        )
    if features.measurement.get("cached", True):
        # A target measured under load is not cached either: its rates would outlive the load.
        _write_json_atomic(path, {**features.to_dict(), "measured_at": time.time(), "cache_version": CACHE_VERSION})
    return features


def _cuda_features(spec: TargetSpec, hostname: str, cpu_model: str) -> HardwareFeatures:
    if not cuda_available():
        raise ConfigError(f"target {spec.name!r}: hardware features of a CUDA target need a visible GPU")
    import tvm

    dev = tvm.cuda(0)
    return HardwareFeatures(
        target_key=spec.key,
        vector_lanes=32,
        num_threads=int(dev.max_threads_per_block),
        num_cores=int(dev.multi_processor_count),
        l1d_bytes=int(dev.max_shared_memory_per_block),
        l2_bytes=0,
        l3_bytes=0,
        peak_gflops=0.0,
        mem_bw_gbs=0.0,
        is_gpu=True,
        hostname=hostname,
        cpu_model=str(dev.device_name),
    )


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write through :func:`fusion_rl.io.write_atomic` so a concurrent reader never sees half a file."""
    from fusion_rl.errors import OutputError
    from fusion_rl.io import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True), what="hardware cache file")
    except (OSError, OutputError):
        # The cache is an optimization: an unwritable cache dir means measuring next time,
        # not failing the caller.
        pass
