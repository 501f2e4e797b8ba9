"""TVM's native log lines go to Python logging, never to the terminal unless --debug."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from fusion_rl.tvm_log import parse_tvm_line, tvm_log_to_logging

from conftest import cli_child

TVM_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+\.(cc|h):\d+: ")
#: The children use two TVM threads whatever this process was given (a busy shared machine).
TWO_THREADS = {"TVM_NUM_THREADS": "2"}
SCOPE_LINE = b"[14:14:15] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:\n"


def test_parse_tvm_line_levels():
    assert parse_tvm_line(SCOPE_LINE.rstrip()) == (
        logging.WARNING, "/project/src/runtime/vm/executable.cc:276", "Scope Saving:")
    assert parse_tvm_line(b"[01:02:03] a/b.cc:9: plain info")[0] == logging.INFO
    assert parse_tvm_line(b"[01:02:03] a/b.cc:9: Error: bad")[0] == logging.ERROR
    assert parse_tvm_line(b"Traceback (most recent call last):") is None
    assert parse_tvm_line(b"/project/src/x.cc:1: Warning: no timestamp") is None


def test_native_lines_become_records_and_the_rest_passes_through(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="tvm")
    with tvm_log_to_logging():
        os.write(2, SCOPE_LINE)  # what TVM's std::cerr does
        os.write(2, b"a worker traceback line\n")
        # A child process inherits the redirected fd 2 (measurement workers do).
        subprocess.run([sys.executable, "-c",
                        "import os; os.write(2, b'[01:02:03] x/y.h:7: Warning: from a child\\n')"],
                       check=True)
        print("python-level stderr", file=sys.stderr)
    _, err = capfd.readouterr()
    assert not TVM_LINE.search(err), err
    assert "a worker traceback line" in err and "python-level stderr" in err
    messages = [r.getMessage() for r in caplog.records if r.name == "tvm"]
    assert messages == ["/project/src/runtime/vm/executable.cc:276: Scope Saving:",
                        "x/y.h:7: from a child"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "tvm")


def test_fd2_is_restored_and_blocks_nest(capfd):
    before = os.fstat(2)
    with tvm_log_to_logging():
        with tvm_log_to_logging():
            os.write(2, SCOPE_LINE)
        os.write(2, SCOPE_LINE)
    after = os.fstat(2)
    assert (before.st_ino, before.st_dev) == (after.st_ino, after.st_dev)
    os.write(2, b"after the block\n")
    assert capfd.readouterr().err == "after the block\n"


def test_compile_and_run_print_no_tvm_line_unless_debug(tmp_path):
    lib = tmp_path / "m.so"
    proc = cli_child("compile", "mlp_tiny", "--rules", "tvm", "-o", str(lib), cwd=tmp_path, env=TWO_THREADS)
    assert proc.returncode == 0, proc.stderr
    assert not TVM_LINE.search(proc.stderr) and "Scope" not in proc.stderr, proc.stderr
    proc = cli_child("run", str(lib), cwd=tmp_path, env=TWO_THREADS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "output 0" in proc.stdout
    # With --debug the same lines are there, as records of the `tvm` logger.
    proc = cli_child("--debug", "run", str(lib), cwd=tmp_path, env=TWO_THREADS)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING tvm: " in proc.stderr and "executable.cc:340: Scope Loaded" in proc.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_embedding_import_warning_only_with_debug(tmp_path, debug):
    proc = cli_child(*(["--debug"] if debug else []), "plan", "gpt_tiny", "--rules", "tvm", cwd=tmp_path,
                     env=TWO_THREADS)
    assert proc.returncode == 0, proc.stderr
    assert not TVM_LINE.search(proc.stderr), proc.stderr
    assert ("Fast mode segfaults" in proc.stderr) is debug, proc.stderr
