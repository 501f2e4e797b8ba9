"""Measure on a remote device through TVM's RPC tracker (the ``rpc`` runner's job).

The same protocol as a local measurement (:func:`fusion_rl.compiler.worker.run_job`), split
between two machines, the way MetaSchedule's ``RPCRunner`` does it:

1. **Here**: apply the plan, schedule and build it for the device's target (a cross target such
   as ``aarch64:cortex-a72:t4`` links with the cross toolchain, ``aarch64-linux-gnu-gcc``), and
   compute the reference outputs with ONNX Runtime (the device need not have it).
2. **On the device**: ask the tracker for a server with the target's key, upload the library,
   load it into a Relax VM, run it once on the model's inputs (compared here with the reference:
   a wrong output is ``wrong_output``, never a latency), then time it with the timing protocol
   (``time_evaluator`` runs on the device, so only the timer's results cross the network).

A device that disconnects mid-job (the server died, the board rebooted, the network dropped)
makes the measurement ``crashed``; one that hangs is stopped by the local worker's timeout and
recorded as ``timeout``. Either way it costs one measurement, as a local worker crash does.

Runs inside a measurement worker (:mod:`fusion_rl.compiler.worker`); tvm is imported lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

from fusion_rl.compiler.target.remote import RemoteDevice
from fusion_rl.errors import ConfigError, FusionRLError

#: Seconds to wait for the tracker to accept a connection (TVM's own client retries for 60 s).
CONNECT_TIMEOUT_S = 10.0
#: Servers the tracker may hand out that turn out dead before the job gives up (a server killed a
#: moment ago can still be listed until the tracker notices its closed connection).
_MAX_TRIES = 3
#: Cross compilers by LLVM triple prefix (Debian packages gcc-<triple>).
CROSS_COMPILERS: dict[str, str] = {"aarch64": "aarch64-linux-gnu-gcc"}


class DeviceError(FusionRLError):
    """The tracker or the device could not be reached, or the device went away mid-job."""


def cross_compiler(mtriple: str | None) -> str | None:
    """The C compiler that links a library for ``mtriple`` (``None``: this machine's default).

    Raises
    ------
    ConfigError
        When the cross compiler is not installed (names the Debian package to install).
    """
    if not mtriple:
        return None
    arch = mtriple.split("-", 1)[0]
    if arch == os.uname().machine:
        return None
    cc = CROSS_COMPILERS.get(arch)
    if cc is None:
        raise ConfigError(f"no cross compiler known for {mtriple}; known: {', '.join(CROSS_COMPILERS)}")
    if shutil.which(cc) is None:
        raise ConfigError(f"cross compiler {cc} for {mtriple} is not installed "
                          f"(Debian/Ubuntu: apt-get install gcc-{cc.removesuffix('-gcc')})")
    return cc


def export_library(executable: Any, spec: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``executable`` as a shared library for ``spec``'s machine; returns its path."""
    path = Path(directory) / "fusion_rl_plan.so"
    cc = cross_compiler(spec.mtriple)
    if cc is None:
        executable.export_library(str(path))
    else:
        from tvm.support import cc as tvm_cc

        executable.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
    return path


def _tracker_call(device: RemoteDevice, message: list, timeout_s: float | None) -> Any:
    """Send one message to the tracker and return its JSON answer (``timeout_s=None`` waits)."""
    from tvm.rpc import base

    try:
        sock = socket.create_connection((device.host, device.port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise DeviceError(f"cannot reach the RPC tracker at {device.host}:{device.port} ({exc})") from exc
    try:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise DeviceError(f"{device.host}:{device.port} is not an RPC tracker")
        base.sendjson(sock, message)
        return base.recvjson(sock)
    except (OSError, struct.error, json.JSONDecodeError) as exc:
        raise DeviceError(f"the RPC tracker at {device.host}:{device.port} closed the connection ({exc})") from exc
    finally:
        sock.close()


def require_device(device: RemoteDevice) -> None:
    """Refuse, before anything is built or stored, a tracker that cannot be reached or that has
    no server under the device key (a request for it would wait until the timeout).

    Raises
    ------
    ConfigError
        Naming the tracker, the key, and how to start a server.
    """
    from tvm.rpc import base

    try:
        summary = _tracker_call(device, [base.TrackerCode.SUMMARY], CONNECT_TIMEOUT_S)
    except DeviceError as exc:
        raise ConfigError(f"{exc}; start one with `python -m tvm.exec.rpc_tracker --port {device.port}`") from None
    keys = {str(s.get("key", "")).removeprefix("server:") for s in summary[1].get("server_info", [])} \
        if summary and summary[0] == base.TrackerCode.SUCCESS else set()
    if device.key not in keys:
        raise ConfigError(
            f"no RPC server of key {device.key!r} at the tracker {device.host}:{device.port} "
            f"(it lists {sorted(keys) or 'none'}); start one on the device with `python -m tvm.exec.rpc_server "
            f"--tracker {device.host}:{device.port} --key {device.key}`")


def _tracker_request(device: RemoteDevice) -> tuple[str, int, str]:
    """Ask the tracker for a free server with the device key: (host, port, match key). Blocks
    while every server of the key is busy (the worker's timeout bounds the wait)."""
    from tvm.rpc import base

    value = _tracker_call(device, [base.TrackerCode.REQUEST, device.key, "", 1], None)
    if value[0] != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the RPC tracker refused a request for key {device.key!r}: {value}")
    host, port, match_key = value[1]
    return str(host), int(port), str(match_key)


def open_session(device: RemoteDevice, session_timeout_s: float = 0.0) -> tuple[Any, str]:
    """An RPC session on a server of ``device``'s key, and that server's ``host:port``.

    ``session_timeout_s`` lets the server end a session that outlives it (0: never).
    """
    from tvm import rpc

    last: Exception | None = None
    for _ in range(_MAX_TRIES):
        host, port, match_key = _tracker_request(device)
        try:
            return rpc.connect(host, port, match_key, session_timeout=session_timeout_s), f"{host}:{port}"
        except Exception as exc:  # noqa: BLE001 - a dead server; ask the tracker again
            last = exc
    raise DeviceError(f"no server of key {device.key!r} at tracker {device.host}:{device.port} accepted "
                      f"a session after {_MAX_TRIES} tries ({str(last).splitlines()[0] if last else ''})")


def _alive(session: Any) -> bool:
    """Whether the session still answers (after an error: the device or the plan?)."""
    try:
        # A round trip (``Device.exist`` may be answered without one).
        session.get_function("tvm.rpc.server.workpath")("alive")
        return True
    except Exception:  # noqa: BLE001
        return False


def run_remote_job(job: Any, models: dict | None = None) -> dict:
    """Build ``job`` here, verify and time it on the device of ``job.target.remote``.

    Returns the same result dict as :func:`fusion_rl.compiler.worker.run_job`, plus ``device``
    (the server's ``host:port``) once a server was reached.
    """
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.compiler.verify import reference_outputs
    from fusion_rl.compiler.worker import build_job, guarded
    from fusion_rl.errors import VerificationError

    spec = parse_target(job.target)

    def body(result: dict[str, Any]) -> None:
        model, plan, compiled = build_job(job, models, result)
        expected, reference = reference_outputs(model)
        with tempfile.TemporaryDirectory(prefix="fusion_rl_rpc_") as tmp:
            path = export_library(compiled.executable, spec, tmp)
            try:
                session, where = open_session(spec.remote, session_timeout_s=job.timeout_s)
            except DeviceError as exc:
                # Says nothing about the plan: not stored, but it cost the measurement.
                result.update(status="crashed", error=str(exc), transient=True)
                return
            result["device"] = where
            try:
                _on_device(session, path, model, plan, (expected, reference), job, result)
            except VerificationError:
                raise
            except Exception as exc:  # noqa: BLE001 - an RPC error: the device or the plan
                message = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
                if _alive(session):
                    result.update(status="failed", error=f"on device {where}: {message}")
                else:
                    result.update(status="crashed", error=f"device {where} (key {spec.remote.key}) "
                                                          f"disconnected mid-job: {message}")

    return guarded(body, {"status": "failed", "times_ms": [], "num_kernels": None})


def _on_device(session: Any, path: Path, model: Any, plan: Any, reference: tuple[list, str],
               job: Any, result: dict) -> None:
    """Upload, load, verify and time on the device; fills ``result``."""
    import tvm
    from tvm import relax

    from fusion_rl.compiler.timing import TimingProtocol, time_executable
    from fusion_rl.compiler.verify import compare_outputs, flatten_outputs
    from fusion_rl.errors import VerificationError

    expected, where_from = reference
    session.upload(str(path))
    lib = session.load_module(path.name)
    dev = session.cpu()
    vm = relax.VirtualMachine(lib, dev)
    outputs = flatten_outputs(vm["main"](*[tvm.runtime.tensor(a, dev) for a in model.inputs]))
    report = compare_outputs(outputs, expected, where_from)
    if not report.ok:
        raise VerificationError(
            f"plan {plan.hash} on {model.name} gives wrong output on the device: max abs error "
            f"{report.max_abs_err:.3g} (max rel {report.max_rel_err:.3g}) against {where_from}")
    result["verify"] = report.to_dict()
    if job.fault == "hang_run":
        _hang_on_device(vm, dev, model, result)
    timing = time_executable(lib, model.inputs, job.protocol or TimingProtocol(), device=dev)
    result.update(status="ok", times_ms=list(timing.times_ms))


def _hang_on_device(vm: Any, dev: Any, model: Any, result: dict) -> None:
    """The ``hang_run`` fault on a device: keep the device running the model until it goes away
    (or the worker's timeout ends the job). Writes the serving device's address to
    ``$FUSION_RL_FAULT_MARKER`` first, so a test can stop exactly that server."""
    import tvm

    marker = os.environ.get("FUSION_RL_FAULT_MARKER")
    if marker:
        Path(marker).write_text(str(result.get("device", "")))
    args = [tvm.runtime.tensor(a, dev) for a in model.inputs]
    while True:
        vm["main"](*args)
