"""Shared fixtures and helpers for the whole suite.

- Tiers: every test gets exactly one of the ``unit`` / ``integration`` / ``e2e`` markers.
- Fixtures: loaded zoo models are cached for the whole session (import costs ~1 s).
- CLI helpers, imported by test files as ``from conftest import ...`` (``tests`` is on the import
  path: ``pythonpath`` in pyproject.toml): :func:`run_cli` runs ``fusion-rl`` in-process,
  :func:`cli_child` in a child process, and :func:`one_line_error` / :func:`child_error` check
  the project's rule for bad input (one ``error: ...`` line on stderr, exit status 2).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")
if "PYTEST_XDIST_WORKER" in os.environ:
    # One OpenMP thread per test process: `make test` runs one process per core, and OpenMP
    # threads spin while they wait, so torch's default (a thread per core, in each process)
    # made policy inference ~10x slower (the plugin/CLI/env agreement test: 60 s alone, 616 s
    # beside a copy of itself). Read by torch at import; measurement workers set their own.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

#: The repository root (tests live in ``tests/<package>/``, so ``__file__`` depths differ).
REPO_ROOT = Path(__file__).resolve().parent.parent

_MODELS: dict = {}

#: The tier of each test file; files not listed are ``integration``. A test marked ``slow`` is
#: ``e2e`` whatever its file. ``make test-fast`` runs ``-m unit``.
#: - unit: pure Python and model loading, no TVM build and no worker process;
#: - integration: builds, measures or runs the CLI on tiny models;
#: - e2e: whole jobs (training, the fuzzer, validate re-timing).
_UNIT_FILES = frozenset({
    "test_card.py", "test_cost_model.py", "test_decisions.py", "test_importer.py", "test_opgraph.py", "test_paired.py",
    "test_plan.py", "test_plan_index.py", "test_plan_space.py", "test_policy.py", "test_rewards.py", "test_rules.py", "test_store.py",
    "test_target.py", "test_transfer.py",
})
_E2E_FILES = frozenset({"test_fuzz.py", "test_train.py", "test_validate.py"})
TIERS = ("unit", "integration", "e2e")


def tier_of(filename: str, slow: bool) -> str:
    """The tier marker of a test in ``filename`` (``slow``: it carries the ``slow`` marker)."""
    if slow or filename in _E2E_FILES:
        return "e2e"
    return "unit" if filename in _UNIT_FILES else "integration"


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test with exactly one tier (see :data:`TIERS`), from its file name; then run
    the files that hold ``e2e`` tests first, each file's tests still together."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            tier = tier_of(item.path.name, item.get_closest_marker("slow") is not None)
            item.add_marker(getattr(pytest.mark, tier))
    # The long tests first: with two xdist workers, a two-minute test handed out last leaves
    # the other worker idle for its length. Files stay contiguous, so module fixtures are set up
    # once per worker as before.
    slow_files = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in slow_files)


def load_cached(name: str):
    from fusion_rl.graph.model import load_model

    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


@pytest.fixture(scope="session")
def model_cache():
    return load_cached


@pytest.fixture(scope="session")
def target():
    from fusion_rl.compiler.target import parse_target

    return parse_target("host").to_tvm()


# ---- the CLI ----------------------------------------------------------------------------------


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (scripts are not a package), for calling its
    ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run ``fusion-rl argv...`` in this process; returns (exit status, stdout, stderr)."""
    from fusion_rl.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_child(*argv: str, cwd: Path = REPO_ROOT, env: dict | None = None, limit_gb: int | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m fusion_rl.cli argv...`` in a child, where the outcome depends on the
    interpreter (the working folder on the import path, the real stdout encoding, the
    environment). ``limit_gb`` caps the child's address space, so a huge allocation fails with
    MemoryError instead of pushing the shared machine into the OOM killer. Output is text;
    undecodable bytes become backslash escapes rather than an error in the test."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_gb << 30, limit_gb << 30))

    # This checkout's fusion_rl, not whichever one is installed.
    child_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fusion_rl.cli", *argv], capture_output=True, cwd=cwd,
                          env=child_env, timeout=timeout, preexec_fn=limit if limit_gb else None,
                          text=True, encoding="utf-8", errors="backslashreplace")


def one_line_error(code: int, err: str, *words: str, status: int = 2) -> str:
    """Assert the answer to bad input: exit ``status``, exactly one ``error: ...`` line naming
    every one of ``words``, no traceback, no terminal escapes. Returns that line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "\x1b" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def child_error(proc: subprocess.CompletedProcess, *words: str, status: int = 2) -> str:
    """:func:`one_line_error` for a child from :func:`cli_child`; Python warnings that the child's
    libraries print on import are not part of the answer and are skipped."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    return one_line_error(proc.returncode, "\n".join(lines), *words, status=status)
