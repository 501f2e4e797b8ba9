"""Typed user-facing errors.

Every error a user can cause (bad model file, illegal plan, bad config, ...) is raised as a
subclass of :class:`FusionRLError` with a one-line message that names the problem and, where
possible, how to fix it. The CLI prints ``error: <message>`` and exits non-zero for these; any
other exception is a bug in fusion_rl.
"""

from __future__ import annotations

import os
from typing import Any


class FusionRLError(Exception):
    """Base class of every error fusion_rl raises for bad input or an unusable environment."""


class ModelImportError(FusionRLError):
    """The model file could not be read or imported into TVM Relax."""


class UnsupportedOperatorError(ModelImportError):
    """The model uses an operator that the TVM frontend or LegalizeOps cannot handle."""


class DynamicShapeError(ModelImportError):
    """The model has dynamic dimensions and no concrete input shapes were given."""


class UnknownModelError(FusionRLError):
    """A model name is neither a zoo entry nor an existing file."""


class IllegalPlanError(FusionRLError):
    """A fusion plan violates a legality rule (non-convex group, cycle, split tuple, ...)."""


class PlanMismatchError(FusionRLError):
    """A fusion plan was made for a different model (fingerprint or node count differs)."""


class VerificationError(FusionRLError):
    """A compiled plan produced outputs that differ from the reference beyond tolerance."""


class CompileError(FusionRLError):
    """TVM failed to build a (model, plan, target, schedule)."""


class MeasurementError(FusionRLError):
    """A measurement failed: the worker crashed, hung past its timeout, or returned garbage."""


class StoreError(FusionRLError):
    """The measurement store is unwritable, locked or corrupt."""


class ConfigError(FusionRLError):
    """A config file, target name, provider name or CLI option is invalid."""


class OutputError(FusionRLError):
    """An output cannot be written without clobbering something (a folder, a device, a pipe)
    or its folder is missing; see :func:`fusion_rl.io.write_atomic`."""


class MissingExtraError(FusionRLError):
    """A feature needs a package of an optional extra (``[train]``, ``[hf]``) that is not installed."""


def require_extra(what: str, extra: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` unless every module in ``modules`` can be imported.

    The core install (plan, measure, compile, the TVM pass) leaves out the training stack and
    ``transformers``; a feature that needs them says which extra to install instead of failing
    with an ImportError deep inside.

    Parameters
    ----------
    what
        The feature, named in the message (``"fusion-rl train"``).
    extra
        The extra that provides the modules (``"train"``).
    modules
        Top-level import names (``"stable_baselines3"``).
    """
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'fusion_rl[{extra}]'"
        )



def read_yaml(path: str | os.PathLike[str], what: str, hint: str = "") -> Any:
    """See :func:`fusion_rl.io.read_yaml`, which bounds and checks the file (kept here for
    existing imports)."""
    from fusion_rl.io import read_yaml as read

    return read(path, what, hint)


def first_line(exc: BaseException) -> str:
    """The first informative line of a (possibly multi-line TVM) exception message, for
    one-line ``error:`` output and schedule reports (at most 300 characters)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors often start with a traceback banner; prefer the line that says what failed.
    for ln in lines:
        if "Error" in ln or "error" in ln or "Check failed" in ln:
            return ln[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]
