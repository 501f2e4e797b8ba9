"""Plan fuzzing: compile many plans, compare each with the reference, keep reproducers.

Two fuzzers live here.

**Plan fuzzer** (:func:`fuzz_plans`). For each model it generates random *legal* plans from
three sources, so that small groups, large groups and plans at the legality boundary are all
covered:

- ``sweep``: :func:`~fusion_rl.fusion.random_plans.random_plan` with ``merge_prob`` swept over
  [0, 1] (near-unfused to near-maximal groups);
- ``boundary``: a plan grown until *no* further merge is legal (:func:`boundary_plan`); every
  one-step extension of it is illegal;
- ``mutant:<rules>``: one to three :func:`~fusion_rl.fusion.random_plans.mutate_plan` steps
  from each hand-written rule set's plan (its legal neighbourhood).

Each plan is compiled, run and compared with the reference
(:func:`fusion_rl.compiler.verify.verify_executable`) under every schedule provider asked for.

*Isolation, and why.* Plans go through :class:`fusion_rl.compiler.measure.Measurer` with
``isolate=True`` and no store: one persistent worker per provider, so a TVM segfault or hang
costs one plan (recorded as ``crashed``/``timeout``), not the fuzzer. The price: one worker
start per provider (TVM + torch import, seconds, once), a pipe round trip per plan (sub-ms), and
one extra run of the model per plan, because the Measurer also times (``FUZZ_PROTOCOL``: one
repeat, no warm-up). In-process compilation would save that, but a single TVM crash would end a
1,000-plan run, and a fuzzer exists to find exactly such plans. Rejected plans forced through
the build (below) run in their own supervised child for the same reason.

A plan whose status is not ``ok`` (wrong output, build failure, crash, timeout) is a *finding*
and gets a reproducer folder ``<repro_dir>/<model>-<planhash>-<provider>/`` (see
:func:`save_reproducer` and docs/reproducers.md): the ONNX model, the plan JSON, the inputs,
the expected (reference) and actual outputs, ``meta.json`` and ``repro.sh``.

**Legality fuzzer** (:func:`fuzz_legality`). It draws *arbitrary* partitions (random labels,
contiguous runs in program order, random pairs merged into a legal plan, and the illegal
one-step extensions of boundary plans) and checks the checker both ways:

- every plan :func:`~fusion_rl.fusion.legality.check_plan` accepts must compile and verify
  (through the Measurer, as above);
- every plan it rejects is *forced* through the plan pass without the legality check
  (:func:`fusion_rl.fusion.apply.group_module` + ``FuseTIR`` + build + verify) in a supervised
  child process (:func:`force_plans`), and the stage at which it fails is recorded. A rejected
  plan that builds and verifies shows the rule to be conservative for that case.

Run it with ``scripts/fuzz_plans.py``.

Modules: :mod:`~fusion_rl.fuzz.generate` (plans and partitions), :mod:`~fusion_rl.fuzz.run` (the
fuzz loops), :mod:`~fusion_rl.fuzz.force` (rejected plans through the build),
:mod:`~fusion_rl.fuzz.reproduce` (reproducer folders), :mod:`~fusion_rl.fuzz.report` (results).
"""

from fusion_rl.fuzz.force import FORCE_STAGES, ForceFailure, child_env, force_fuse, force_plans
from fusion_rl.fuzz.generate import (
    RULE_NAMES,
    arbitrary_partitions,
    bench_models,
    boundary_plan,
    cross_plan,
    default_models,
    generate_plans,
    illegal_extensions,
)
from fusion_rl.fuzz.report import FuzzReport, FuzzResult, LegalityResult
from fusion_rl.fuzz.reproduce import reproduce, save_reproducer
from fusion_rl.fuzz.run import (
    DEFAULT_SCHEDULES,
    FUZZ_PROTOCOL,
    force_rejected,
    fuzz_legality,
    fuzz_model,
    fuzz_plans,
)

__all__ = [
    "DEFAULT_SCHEDULES", "FORCE_STAGES", "FUZZ_PROTOCOL", "RULE_NAMES", "ForceFailure", "FuzzReport",
    "FuzzResult", "LegalityResult", "arbitrary_partitions", "bench_models", "boundary_plan",
    "child_env", "cross_plan", "default_models", "force_fuse", "force_plans", "force_rejected",
    "fuzz_legality", "fuzz_model", "fuzz_plans", "generate_plans", "illegal_extensions",
    "reproduce", "save_reproducer",
]
