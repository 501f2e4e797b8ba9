"""Typed user-facing errors.

Every error a user can cause (bad model file, illegal plan, bad config, ...) is raised as a
subclass of :class:`FusionRLError` with a one-line message that names the problem and, where
possible, how to fix it. The CLI prints ``error: <message>`` and exits non-zero for these; any
other exception is a bug in fusion_rl.
"""

from __future__ import annotations

import os
from pathlib import Path
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


def describe_yaml_error(exc: Exception) -> str:
    """PyYAML's error in one line: the problem and where (its own message spans several
    lines with a caret diagram, which a CLI error must not)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return problem


def read_yaml(path: str | os.PathLike[str], what: str, hint: str = "") -> Any:
    """Parse the YAML file ``path``; an unreadable file or invalid YAML is a one-line
    :class:`ConfigError` naming ``what`` (e.g. "env spec") and the path, plus ``hint``."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}{hint}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {describe_yaml_error(exc)}") from None
