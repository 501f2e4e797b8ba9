"""The schedule-provider contract.

A schedule provider turns the *fused* module (Relax ``main`` calling one PrimFunc per kernel,
after :class:`fusion_rl.fusion.apply.ApplyFusionPlan` and ``FuseTIR``) into a module whose
PrimFuncs carry a loop schedule. The fusion plan never knows which provider is used, and a
provider never changes the partition: it may only rewrite PrimFunc bodies.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import tvm


#: PrimFunc attribute in which a provider records the schedule a kernel got: a rule name, or
#: ``fallback: <reason>`` when the kernel was left as naive loops although it should not be.
SCHEDULE_ATTR = "fusion_rl.schedule"


def schedule_report(mod: tvm.IRModule) -> dict[str, str]:
    """Kernel name -> the schedule it got (:data:`SCHEDULE_ATTR`; ``"naive"`` if none said).

    ``fallback: ...`` entries are the kernels that run as naive loops against the provider's
    intent; :func:`fallbacks` picks them out.
    """
    from tvm import tirx

    report = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            label = func.attrs.get(SCHEDULE_ATTR) if func.attrs is not None else None
            report[gvar.name_hint] = str(label) if label is not None else "naive"
    return dict(sorted(report.items()))


def fallbacks(report: dict[str, str]) -> dict[str, str]:
    """The kernels of a :func:`schedule_report` that fell back, with the reason."""
    return {k: v.split(":", 1)[1].strip() for k, v in report.items() if v.startswith("fallback:")}


class ScheduleProvider(abc.ABC):
    """Base class of schedule providers (``naive``, ``rules``, ``tuned``)."""

    #: Registry name, used on the CLI (``--schedule NAME``) and as part of the store key.
    name: ClassVar[str]
    #: The multi-anchor group shapes (names in :data:`fusion_rl.fusion.group_shapes.GROUP_SHAPES`)
    #: this provider schedules as one kernel with a shared tile. Any other group with several
    #: conv/matmul anchors it runs anchor by anchor, if at all; a decision mask built from this
    #: declaration (env spec ``group_shapes: provider``) lets a policy fuse past one anchor only
    #: where that pays. Every compiled plan is still verified.
    group_shapes: ClassVar[tuple[str, ...]] = ()

    @property
    def budget(self) -> int:
        """The search budget (trials per task) that this provider spends; 0 for no search.

        Part of a measurement's key: two budgets are two different schedules.
        """
        return 0

    @property
    def key(self) -> str:
        """The provider as a measurement's key records it: its name, plus every option that
        changes the schedules it produces (two such options are two different providers)."""
        return self.name

    def kernel_key(self, func: tvm.tirx.PrimFunc) -> str:
        """The key under which the kernel ``func``'s timings are kept (the kernel table): the
        version of this provider that last changed *this kernel's* schedule.

        :attr:`key` by default. A provider whose new version reschedules only some kernels
        returns the older key for the others, so their timings stay valid instead of being
        taken again (hours for a bench suite on 2 cores)."""
        return self.key

    @property
    def kernel_keys(self) -> tuple[str, ...]:
        """Every key :meth:`kernel_key` may return."""
        return (self.key,)

    @abc.abstractmethod
    def schedule(self, mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        """Return a scheduled *copy* of ``mod``; ``mod`` itself must not be modified.

        ``mod`` is a fused Relax module: ``main`` holds ``call_tir`` to PrimFuncs, one per
        kernel. The result is handed to a lowering-only Relax pipeline, so any PrimFunc left
        unscheduled runs as naive loops.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"


class NaiveSchedule(ScheduleProvider):
    """No schedule at all: TVM's default CPU behaviour (every kernel runs naive loops)."""

    name = "naive"

    def schedule(self, mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        return mod
