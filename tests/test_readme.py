"""The README's pipeline snippet runs as written (with the shipped policy)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _snippet(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_shipped_policy_exists():
    assert (ROOT / "policies" / "default" / "card.json").is_file()


def test_pipeline_snippet_runs():
    """In a child process: code compiled for a CPU this machine lacks dies with SIGILL, which
    would take the test session with it. The snippet must compile for the detected host."""
    snippet = _snippet("## Use it in your TVM pipeline")
    code = "\n".join(line.split("#")[0] for line in snippet.splitlines())
    assert '"mcpu"' not in code, "hard-coded CPU: use the detected host target"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TVM_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, "-c", snippet + "\nprint('shape', tuple(out.numpy().shape))"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip().splitlines()[-1] == "shape (1, 10)"
