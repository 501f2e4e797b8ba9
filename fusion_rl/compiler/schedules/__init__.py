"""Schedule providers, chosen by name: ``naive``, ``rules``, ``tuned``.

The plan never knows which provider is used (see :mod:`.base`).
"""

from __future__ import annotations

from typing import Any, Mapping

from fusion_rl.compiler.schedules.base import NaiveSchedule, ScheduleProvider
from fusion_rl.errors import ConfigError

SCHEDULE_NAMES = ("naive", "rules", "tuned")
#: What every command, the env and the plugin use when no schedule is named: packed
#: micro-kernels, no search (``naive`` makes every plan equally slow: fusion changes nothing).
DEFAULT_SCHEDULE = "rules"


def _provider_class(name: str) -> type[ScheduleProvider]:
    """The provider class registered as ``name`` (imported on demand: ``tuned`` pulls in
    MetaSchedule)."""
    if name == "naive":
        return NaiveSchedule
    if name == "rules":
        from fusion_rl.compiler.schedules.rules import RulesSchedule

        return RulesSchedule
    if name == "tuned":
        from fusion_rl.compiler.schedules.tuned import TunedSchedule

        return TunedSchedule
    raise ConfigError(f"unknown schedule provider '{name}'; choose one of {', '.join(SCHEDULE_NAMES)}")


def make_schedule(name: str, **kwargs: Any) -> ScheduleProvider:
    """Build a provider by name; ``kwargs`` go to its constructor (e.g. ``trials_per_task``)."""
    cls = _provider_class(name)
    if cls is NaiveSchedule and kwargs:
        raise ConfigError(f"schedule 'naive' takes no options, got {sorted(kwargs)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for schedule '{name}': {exc}") from None


def declared_group_shapes(name: str) -> tuple[str, ...]:
    """The group shapes provider ``name`` declares (:attr:`.ScheduleProvider.group_shapes`),
    without building it."""
    return _provider_class(name).group_shapes


def check_schedule(name: str, options: Mapping[str, Any]) -> None:
    """Validate a provider name and its options as :func:`make_schedule` would, without building
    the provider (``tuned`` would create its database folder)."""
    if name == "tuned":
        from fusion_rl.compiler.schedules.tuned import TunedSchedule

        try:
            TunedSchedule.check_options(**options)
        except TypeError as exc:
            raise ConfigError(f"bad options for schedule 'tuned': {exc}") from None
        return
    make_schedule(name, **options)


__all__ = ["DEFAULT_SCHEDULE", "SCHEDULE_NAMES", "NaiveSchedule", "ScheduleProvider", "check_schedule",
           "declared_group_shapes", "make_schedule"]
