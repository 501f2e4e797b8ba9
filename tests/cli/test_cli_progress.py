"""Progress bars: one helper (fusion_rl/cli/progress.py) draws them on a terminal only, and the
layers below the CLI report progress through a callback (they never import tqdm)."""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import subprocess
import sys
from multiprocessing import Pipe
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT
from fusion_rl.cli.progress import Bar, bar, wanted

ROOT = REPO_ROOT


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- the helper ------------------------------------------------------------------------------


def test_bars_only_for_a_person_at_a_terminal(monkeypatch) -> None:
    tty, pipe = _Tty(), io.StringIO()
    assert wanted(argparse.Namespace(json=False), tty)
    assert not wanted(argparse.Namespace(json=False), pipe)  # a log file or a pipe
    assert not wanted(argparse.Namespace(json=True), tty)  # output for a program
    assert not wanted(argparse.Namespace(json=False, no_progress=True), tty)
    monkeypatch.setattr(sys, "stderr", tty)
    with bar(argparse.Namespace(json=True), "x", total=3) as b:
        assert not b.enabled
    with bar(argparse.Namespace(json=False), "x", total=3) as b:
        assert b.enabled


def test_bar_draws_on_its_stream_and_a_disabled_one_draws_nothing() -> None:
    stream = _Tty()
    b = Bar("search", unit="plan", stream=stream)
    b(1, 4, "best 1.0 ms")
    b.step("best 0.5 ms")
    b.close()
    text = stream.getvalue()
    assert "search" in text and "2/4" in text and "best 0.5 ms" in text
    quiet = _Tty()
    off = Bar("search", enabled=False, stream=quiet)
    off(1, 4, "x")
    off.close()
    assert quiet.getvalue() == "" and off.calls == 1 and off.done == 1


# ---- the callbacks of the lower layers -----------------------------------------------------------


class _FakeMeasurer:
    """Every plan measures ok, 1 ms per kernel group (no TVM, no worker)."""

    def __init__(self) -> None:
        self.stats = SimpleNamespace(misses=0, hits=0, failures=0)

    def measure(self, model, plan, per_kernel=False):
        self.stats.misses += 1
        return SimpleNamespace(status="ok", median_ms=float(len(plan.groups)))

    def cached(self, model, plan):
        return None


@pytest.mark.parametrize("algo", ["random", "greedy", "annealing"])
def test_search_reports_each_evaluation_against_the_budget(model_cache, algo) -> None:
    from fusion_rl.baselines.search import run_search

    calls = []
    result = run_search(algo, model_cache("mlp_tiny"), _FakeMeasurer(), 4, seed=0,
                        progress=lambda done, total, label: calls.append((done, total, label)))
    assert calls and [c[0] for c in calls] == list(range(1, result.evaluations + 1))
    assert {c[1] for c in calls} == {4} and calls[-1][2].startswith("best ")


def test_head_to_head_reports_each_round() -> None:
    from fusion_rl.compiler.paired import head_to_head

    class Scripted:
        store = None

        def time_together(self, model, plans):
            return {"status": "ok", "times_ms": [[1.0, 1.1] for _ in plans]}

    class Plan(str):
        hash = property(str)  # a plan stand-in whose name is its hash

    calls = []
    head_to_head(Scripted(), None, {"a": Plan("a"), "b": Plan("b")}, rounds=3,
                 progress=lambda done, total, label: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_worker_relays_progress_messages_before_the_result() -> None:
    """The tuned provider runs in the worker; its per-task progress reaches the parent as
    messages ahead of the job's result, and the result is still what run() returns."""
    from fusion_rl.compiler.worker import Worker

    recv, send = Pipe(duplex=False)
    send.send(("progress", 0, 2, "tuning fused_conv2d"))
    send.send(("progress", 2, 2, "tuned"))
    send.send({"status": "ok", "times_ms": [1.0]})
    worker = Worker.__new__(Worker)  # no process: the pipe plays the worker
    worker._send, worker._recv = SimpleNamespace(send=lambda job: None), recv
    seen = []
    worker.on_progress = lambda done, total, label: seen.append((done, total, label))
    assert worker.run("job", timeout_s=30) == {"status": "ok", "times_ms": [1.0]}
    assert seen == [(0, 2, "tuning fused_conv2d"), (2, 2, "tuned")]


def test_demo_reports_each_model_and_prints_one_json_object(monkeypatch, tmp_path, capsys) -> None:
    """``demo --json``: stdout is the result alone; progress counts every model; the learned plan is
    timed beside tvm, the card's best fixed rule and ONNX Runtime (time_systems is scripted: the
    numbers are not the point here, and bench models are too big for the suite)."""
    import fusion_rl.demo as demo
    from fusion_rl.cli import main

    seen_systems = []

    def fake_time_systems(model, plans, runtimes, spec, protocol, rounds):
        from fusion_rl.compiler.paired import HeadToHead

        seen_systems.append(list(plans) + list(runtimes))
        names = list(plans) + list(runtimes)
        times = {n: [1.0 + i, 1.1 + i, 1.2 + i] for i, n in enumerate(names)}
        return HeadToHead(1, {n: [t[1]] for n, t in times.items()}, times, {}, {n: 3 for n in plans})

    monkeypatch.setenv("FUSION_RL_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "time_systems", fake_time_systems)
    calls = []
    assert demo.run_demo(quick=True, models=("mlp_tiny",), policy=tmp_path / "no_policy", as_json=True,
                         progress=lambda d, t, label: calls.append((d, t))) == 0
    out = json.loads(capsys.readouterr().out)
    assert calls == [(1, 1)]
    assert [r["system"] for r in out["rows"]] == ["tvm[unfused]", "tvm[tvm]", "ort"]
    tvm_row = next(r for r in out["rows"] if r["system"] == "tvm[tvm]")
    assert tvm_row["speedup_vs_tvm"] == 1.0 and out["rows"][0]["speedup_vs_tvm"] == pytest.approx(2.1 / 1.1)  # median of per-repeat tvm / unfused
    # With the shipped policy: its plan, and the best fixed rule its card names.
    assert demo.run_demo(quick=True, models=("mlp_tiny",), as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    systems = seen_systems[-1]
    assert any(s.startswith("learned") for s in systems) and "ort" in systems
    assert f"tvm[{out['best_rule']}]" in systems
    # Repeats in the far fork-join regime: each system's speedup is shown per regime.
    def far_time_systems(model, plans, runtimes, spec, protocol, rounds):
        h2h = fake_time_systems(model, plans, runtimes, spec, protocol, rounds)
        h2h.fork_join_us = [0.6, 0.6, 1.5]
        return h2h

    monkeypatch.setattr(demo, "time_systems", far_time_systems)
    lines: list[str] = []
    assert demo.run_demo(quick=True, models=("mlp_tiny",), policy=tmp_path / "no_policy", log=lines.append) == 0
    line = next(x for x in lines if "fork-join" in x)
    assert "1 of 3 repeats in the far fork-join regime" in line and "tvm[unfused] near " in line
    monkeypatch.setattr(demo, "time_systems", fake_time_systems)
    # The command: JSON only on stdout.
    assert main(["demo", "--quick", "--json"]) == 0  # the first bench model, planned by the shipped policy
    out = capsys.readouterr().out
    assert json.loads(out)["rows"]


# ---- the commands, on a terminal and off it --------------------------------------------------------


def _run_on_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in a child with stderr on a pseudo-terminal; stdout is a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TVM_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "fusion_rl.cli", *argv]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    err = b""
    while True:  # drain the terminal while the command runs (a full pty would block it)
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the command closed its end
                break
            if not chunk:
                break
            err += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=600), out, err.decode(errors="replace")


MEASURE = ["measure", "mlp_tiny", "--rules", "tvm,unfused", "--rounds", "2", "--no-store",
           "--repeat", "1", "--min-repeat-ms", "1"]


def test_measure_rounds_draws_a_bar_on_a_terminal_only(monkeypatch, capsys) -> None:
    # A real terminal once (the child's stderr is a pseudo-terminal) ...
    code, out, err = _run_on_terminal(MEASURE)
    assert code == 0, err
    assert "rounds" in err and "2/2" in err, err  # the bar, redrawn as each round finished
    # ... then in this process (no second interpreter start): a terminal with --json, and a pipe.
    from fusion_rl.cli import main

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main([*MEASURE, "--json"]) == 0
    assert "2/2" not in tty.getvalue() and "rounds:" not in tty.getvalue(), tty.getvalue()
    assert json.loads(capsys.readouterr().out)["plans"]
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert main(MEASURE) == 0
    assert "2/2" not in pipe.getvalue() and "\r" not in pipe.getvalue(), pipe.getvalue()
