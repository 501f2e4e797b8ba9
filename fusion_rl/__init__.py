"""fusion_rl: learn operator-fusion strategies for Apache TVM Relax."""

from __future__ import annotations

__version__ = "0.1.0"
