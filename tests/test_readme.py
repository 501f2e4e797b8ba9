"""The README's pipeline snippet runs as written (with the shipped policy)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _snippet(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_shipped_policy_exists():
    assert (ROOT / "policies" / "default" / "card.json").is_file()


def test_pipeline_snippet_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # the snippet names policies/default relative to the repo
    scope: dict = {}
    exec(compile(_snippet("## Use it in your TVM pipeline"), "README", "exec"), scope)
    assert scope["out"].numpy().shape == (1, 10)
