"""Remote devices: where an ``rpc://HOST:PORT/KEY:<target>`` target runs its code.

A :class:`RemoteDevice` names a TVM RPC tracker (``python -m tvm.exec.rpc_tracker``) and the
device key its servers registered under (``python -m tvm.exec.rpc_server --tracker=HOST:PORT
--key=KEY``). Any server with that key may serve a measurement, so every server under one key
must be the same kind of machine: the tracker address and the key are part of the target's store
key for that reason.

Parsing only; nothing here opens a connection or imports TVM (see
:mod:`fusion_rl.compiler.rpc` for the session).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fusion_rl.errors import ConfigError

#: The URL scheme of remote targets.
SCHEME = "rpc://"
_FORM = "rpc://HOST:PORT/KEY:<target>, e.g. rpc://127.0.0.1:9190/rasp4:aarch64:cortex-a72:t4"
_HOST = r"[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]"
_KEY = r"[A-Za-z0-9_.\-]+"


@dataclass(frozen=True)
class RemoteDevice:
    """A device reached through an RPC tracker.

    Parameters
    ----------
    host, port:
        The tracker's address.
    key:
        The device key the RPC servers registered with the tracker.
    """

    host: str
    port: int
    key: str

    @property
    def address(self) -> str:
        """``HOST:PORT/KEY``: the tracker and key, as written in a target."""
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{host}:{self.port}/{self.key}"


def split_rpc_target(text: str) -> tuple[RemoteDevice, str]:
    """Split ``rpc://HOST:PORT/KEY:<target>`` into the device and the inner target name.

    Parameters
    ----------
    text:
        The target as given (must start with ``rpc://``).

    Returns
    -------
    (RemoteDevice, str)
        The device, and the target the code is compiled for (``host``, ``llvm:<mcpu>:t<N>``,
        ``aarch64:<mcpu>:t<N>``, ...), which the caller parses.

    Raises
    ------
    ConfigError
        For a malformed address, a port outside 1..65535, a missing key or inner target, or a
        nested ``rpc://``.
    """
    if not text.startswith(SCHEME):
        raise ConfigError(f"remote target {text!r} must start with {SCHEME}; the form is {_FORM}")
    m = re.fullmatch(rf"({_HOST}):(\d+)/({_KEY}):(.+)", text[len(SCHEME):])
    if not m:
        raise ConfigError(f"malformed remote target {text!r}; the form is {_FORM}")
    host, port, key, inner = m.group(1), int(m.group(2)), m.group(3), m.group(4).strip()
    if not 1 <= port <= 65535:
        raise ConfigError(f"remote target {text!r}: tracker port {port} is not in 1..65535")
    if inner.startswith(SCHEME):
        raise ConfigError(f"remote target {text!r}: the device target cannot itself be remote")
    return RemoteDevice(host.strip("[]"), port, key), inner
