"""Tests of fusion_rl.compiler.target: names, TVM targets, host detection, threads, hw features."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from fusion_rl.compiler import target as tgt
from fusion_rl.compiler.target import (
    NAMED_TARGETS,
    TARGET_NAMES,
    HardwareFeatures,
    TargetSpec,
    detect_host_mcpu,
    hardware_features,
    parse_target,
    threads_env,
    worker_env,
)
from fusion_rl.errors import ConfigError

# ---- names and TVM targets --------------------------------------------------------------------


def test_named_targets_cover_mcpu_by_threads() -> None:
    expected = {f"{m}-t{n}" for m in ("x86-64", "haswell", "sapphirerapids") for n in (1, 2)}
    assert set(NAMED_TARGETS) == expected
    assert set(TARGET_NAMES) == expected | {"host", "cuda"}


@pytest.mark.parametrize("name", sorted(NAMED_TARGETS))
def test_parse_named_target_and_build_tvm_target(name: str) -> None:
    spec = parse_target(name)
    mcpu, _, threads = name.rpartition("-t")
    assert (spec.name, spec.kind, spec.mcpu, spec.num_threads) == (name, "llvm", mcpu, int(threads))
    assert spec.key == f"llvm-{mcpu}-t{threads}"
    target = spec.to_tvm()
    assert str(target.kind.name) == "llvm"
    assert str(target.attrs["mcpu"]) == mcpu
    assert int(target.attrs["num-cores"]) == int(threads)


def test_keys_are_unique_across_named_targets() -> None:
    keys = [spec.key for spec in NAMED_TARGETS.values()]
    assert len(set(keys)) == len(keys)


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        parse_target("skylake-t9")
    for name in TARGET_NAMES:
        assert name in str(info.value)


def test_free_llvm_form() -> None:
    spec = parse_target(" llvm:haswell:t3 ")
    assert (spec.mcpu, spec.num_threads, spec.key) == ("haswell", 3, "llvm-haswell-t3")
    # A CPU outside the known table is accepted when LLVM knows it; lanes come from LLVM.
    znver4 = parse_target("llvm:znver4:t1")
    assert znver4.vector_lanes == 16
    with pytest.raises(ConfigError, match="does not know CPU"):
        parse_target("llvm:notacpu:t1")
    with pytest.raises(ConfigError):
        parse_target("llvm:haswell:t0")


def test_cuda_forms() -> None:
    spec = parse_target("cuda:sm_90")
    assert spec.key == "cuda-sm_90"
    target = spec.to_tvm()
    assert str(target.kind.name) == "cuda" and str(target.attrs["arch"]) == "sm_90"
    if tgt.cuda_available():
        assert parse_target("cuda").arch.startswith("sm_")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            parse_target("cuda")


def test_spec_validation() -> None:
    with pytest.raises(ConfigError):
        TargetSpec(name="x", kind="rocm")
    with pytest.raises(ConfigError):
        TargetSpec(name="x", kind="llvm", mcpu=None)
    with pytest.raises(ConfigError):
        TargetSpec(name="x", kind="llvm", mcpu="haswell", num_threads=0)


def test_vector_lanes_by_isa() -> None:
    lanes = {m: parse_target(f"{m}-t1").vector_lanes for m in ("x86-64", "haswell", "sapphirerapids")}
    assert lanes == {"x86-64": 4, "haswell": 8, "sapphirerapids": 16}


# ---- host detection ---------------------------------------------------------------------------


def test_host_detection_returns_valid_named_mcpu() -> None:
    mcpu = detect_host_mcpu()
    assert mcpu in tgt.MCPU_LADDER
    assert tgt.llvm_accepts(mcpu)
    host = parse_target("host")
    assert host.mcpu == mcpu and host.num_threads == tgt.host_num_threads() >= 1
    assert host.key == f"llvm-{mcpu}-t{host.num_threads}"


_HASWELL = "fpu sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 abm popcnt movbe aes pclmulqdq"
_SKYLAKE_SP = _HASWELL + " adx avx512f avx512bw avx512cd avx512dq avx512vl"
_ICE = _SKYLAKE_SP + (" sha_ni gfni vaes vpclmulqdq avx512ifma avx512vbmi avx512_vbmi2 avx512_bitalg"
                      " avx512_vnni avx512_vpopcntdq avx512_bf16")
_SAPPHIRE_RAPIDS = _ICE + " avx512_fp16 avx_vnni amx_tile amx_bf16 amx_int8"
_ZEN4 = _ICE + " sse4a"  # AVX-512 with BF16/VNNI, but no AMX, AVX512-FP16 or VEX AVX-VNNI


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (_SAPPHIRE_RAPIDS, "sapphirerapids"),
        (_ZEN4, "znver4"),  # not sapphirerapids: that code died with SIGILL (AVX-VNNI) on Zen 4
        (_SKYLAKE_SP, "skylake-avx512"),
        (_HASWELL, "haswell"),
        (_HASWELL.replace(" fma", ""), "x86-64"),  # AVX2 without FMA is not haswell
        ("fpu sse2", "x86-64"),
    ],
)
def test_host_mcpu_from_cpuinfo_flags(tmp_path, monkeypatch, flags: str, expected: str) -> None:
    monkeypatch.setattr(tgt.host.platform, "machine", lambda: "x86_64")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert detect_host_mcpu(cpuinfo) == expected


def test_host_mcpu_override(monkeypatch) -> None:
    monkeypatch.setenv("FUSION_RL_HOST_MCPU", "haswell")
    assert detect_host_mcpu() == "haswell" and parse_target("host").mcpu == "haswell"
    monkeypatch.setenv("FUSION_RL_HOST_MCPU", "not-a-cpu")
    with pytest.raises(ConfigError, match="FUSION_RL_HOST_MCPU"):
        detect_host_mcpu()


# ---- threads ----------------------------------------------------------------------------------


def test_worker_env_sets_thread_counts() -> None:
    env = worker_env(parse_target("haswell-t2"), base={"PATH": "/bin"})
    assert env["TVM_NUM_THREADS"] == "2" and env["OPENBLAS_NUM_THREADS"] == "2" and env["PATH"] == "/bin"


def test_threads_env_sets_and_restores(monkeypatch) -> None:
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    import tvm

    num_threads = tvm.get_global_func("runtime.NumThreads")
    size = num_threads()  # creates the pool at 2 threads, unless an earlier test created it
    with threads_env(parse_target("x86-64-t1")) as n:
        assert n == 1
        assert os.environ["TVM_NUM_THREADS"] == "1"
        assert num_threads() == 1  # the live pool was lowered to 1
    assert os.environ["TVM_NUM_THREADS"] == "2"
    assert num_threads() == size  # and given back its size
    # TVM cannot grow a pool past its creation size: this must be an error, not a silent lie.
    with pytest.raises(ConfigError, match="fresh"):
        with threads_env(size + 1):
            pass
    assert num_threads() == size
    assert os.environ["TVM_NUM_THREADS"] == "2"


# ---- hardware features ------------------------------------------------------------------------


@pytest.fixture
def fake_bench(monkeypatch):
    """Replace the micro-benchmark with a counter so tests are fast and deterministic."""
    calls: list[int] = []

    def bench(num_threads: int, seconds: float = 0.25) -> dict[str, float]:
        calls.append(num_threads)
        return {"peak_gflops": 100.0 * num_threads, "mem_bw_gbs": 20.0}

    monkeypatch.setattr(tgt.hardware, "run_microbenchmark", bench)
    # An idle machine: a loaded one is measured again and not cached (tests/test_hardware_features.py).
    monkeypatch.setattr(tgt.hardware, "machine_load", lambda: 0.0)
    return calls


def test_feature_vector_shape_and_values(tmp_path, fake_bench) -> None:
    feats = hardware_features("haswell-t2", cache_dir=tmp_path)
    vec = feats.as_vector()
    assert vec.shape == (len(HardwareFeatures.FEATURE_NAMES),) and vec.dtype == np.float32
    assert np.all(np.isfinite(vec)) and np.all(vec >= 0) and np.all(vec < 3)
    assert feats.num_threads == 2 and feats.vector_lanes == 8 and feats.mem_bw_gbs == 20.0
    assert feats.measured_gflops == 200.0
    host_lanes = TargetSpec(name="h", kind="llvm", mcpu=detect_host_mcpu()).vector_lanes
    assert math.isclose(feats.peak_gflops, 200.0 * min(1.0, 8 / host_lanes))
    # Targets differ in the vector: ISA and threads.
    other = hardware_features("sapphirerapids-t1", cache_dir=tmp_path).as_vector()
    assert not np.allclose(vec, other)


def test_features_measured_once_then_cached(tmp_path, fake_bench, monkeypatch) -> None:
    first = hardware_features("x86-64-t1", cache_dir=tmp_path)
    assert fake_bench == [1]
    assert hardware_features("x86-64-t1", cache_dir=tmp_path) == first
    assert fake_bench == [1]  # served from the JSON cache
    hardware_features("haswell-t1", cache_dir=tmp_path)
    assert fake_bench == [1]  # same thread count: the raw rates are shared
    hardware_features("haswell-t2", cache_dir=tmp_path)
    assert fake_bench == [1, 2]
    hardware_features("x86-64-t1", cache_dir=tmp_path, refresh=True)
    assert fake_bench == [1, 2, 1]
    # Another machine (hostname) must not reuse this machine's numbers.
    monkeypatch.setattr(tgt.hardware.socket, "gethostname", lambda: "other-host")
    hardware_features("x86-64-t1", cache_dir=tmp_path)
    assert fake_bench == [1, 2, 1, 1]


def test_corrupt_feature_cache_is_remeasured(tmp_path, fake_bench) -> None:
    hardware_features("x86-64-t1", cache_dir=tmp_path)
    for path in tmp_path.glob("*.json"):
        path.write_text("{not json")
    feats = hardware_features("x86-64-t1", cache_dir=tmp_path)
    assert fake_bench == [1, 1] and feats.peak_gflops > 0
    assert all(json.loads(p.read_text()) for p in tmp_path.glob("*.json"))


def test_default_cache_dir_honours_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FUSION_RL_CACHE", str(tmp_path))
    assert tgt.default_hw_cache_dir() == tmp_path / "hw"


def test_real_microbenchmark_is_positive() -> None:
    rates = tgt.run_microbenchmark(1, seconds=0.05)
    assert set(rates) == {"peak_gflops", "mem_bw_gbs"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())


def test_cache_sizes_from_sysfs(tmp_path) -> None:
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"), (3, "Unified", "105M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert tgt.cache_sizes(tmp_path) == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 105 << 20}
    real = tgt.cache_sizes()
    assert real["l1d"] > 0
