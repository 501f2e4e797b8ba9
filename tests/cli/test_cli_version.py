"""``fusion-rl --version`` names this package and the libraries a measurement depends on."""

from __future__ import annotations

from importlib import metadata

import pytest

import fusion_rl
from fusion_rl.cli import main


def test_version_prints_one_line_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    assert out.startswith(f"fusion-rl {fusion_rl.__version__} (")
    assert f"apache-tvm {metadata.version('apache-tvm')}" in out
    assert f"torch {metadata.version('torch')}" in out
