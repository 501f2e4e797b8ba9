"""``tuned``: MetaSchedule auto-tuning with an on-disk database, fast enough to run here.

What it does
------------
:meth:`TunedSchedule.schedule` extracts one MetaSchedule task per distinct fused kernel
(``extract_tasks`` with ``module_equality="structural"`` by default), tunes only the tasks the
on-disk JSON database does not already hold, and applies the database kernel by kernel with
``relax.transform.MetaScheduleApplyDatabase``. The database lives in
``<database_dir>/<target kind>-<mcpu>-<hash of target, TVM version>/t<budget>/`` so every distinct
kernel is tuned once per (target, budget) and then reused across runs and fusion plans. Kernels
the shared database cannot serve are tuned one by one in ``.../own/`` (see below).

It runs here thanks to the in-process builder and runner of :mod:`.metaschedule`.

Task granularity: why every distinct fused kernel gets its own tuning by default
------------------------------------------------------------------------------
``module_equality`` decides which kernels share one task (and one tuned trace):

* ``"structural"`` (default): one task per structurally distinct kernel. A fused conv+bias+relu
  is tuned as itself; an identical kernel in another plan or model is served by the database.
* ``"anchor-block"``: kernels with the same anchor (conv/matmul block) share one task, and the
  tuned trace is replayed on the others with their epilogues. Cheaper (resnet_tiny's fused plans
  then cost ~2 s of tuning instead of ~60 s), and it *is* correct: replay onto a fused variant
  gave outputs matching the naive kernels (max abs err 4.8e-7). But it is not *fast*: the
  epilogue is placed by a trace tuned for another kernel: on resnet_tiny and cnn_plain its fused
  plans measured 1.4-2x slower than with ``structural`` databases (at 16 trials MetaSchedule's
  outcome also varies between tuning runs, so compare plans within one
  database.) So fusion decisions are measured under ``structural`` tuning, which is what the plan would
  get in deployment. ``anchor-block`` stays available for cheap exploration; the two are
  different providers in the measurement store (:attr:`TunedSchedule.key`).
* Reuse does **not** replay from a fused kernel onto a bare one (anchor-block only): a
  conv+add+relu trace on a plain conv2d fails in ``MetaScheduleApplyDatabase``
  ("old_outputs.size() == new_outputs.size() (1 vs 0)", the trace's ``get_consumers`` finds none).
  Such kernels fall back to their own tuning (below) instead of silently running naive loops.
* Two or more anchors (:func:`count_anchors` > 1) are never anchor-reused. Tuned on their own they
  are *sometimes* wrong, and which run is wrong is not reproducible: on the same 2-conv kernel
  (conv-bn-relu x2, 1x3x32x32) one run gave max error 6.4e5 with an anchor-block database, the next
  gave 6.1e5 with a structural one and the anchor-block one was right; a 4-trial run on a 16x16
  net was wrong again, and a third kernel (3 convs) crashed the design space generator
  (``reverse-compute-at`` ScheduleError). The wrong schedules look *faster* (they skip work), so
  the tuner prefers them. Cause (docs/design.md §12): conv #2's padding block is computed under conv #1's
  tiles and its border is left unwritten; whether that shows depends on what the reused memory
  held before. Hence: each multi-anchor kernel is tuned alone in a ``structural`` database, then
  checked against its naive kernel on random inputs (:func:`kernel_matches`, alternating runs so
  each one reads memory the other dirtied). A wrong or untunable kernel gets the fallback schedule
  (below), is logged and is remembered in ``untunable.json`` so later calls do not retry it. The check is a test, not a
  proof: plans must still be verified end to end (docs/design.md §7).

Any kernel the database cannot schedule (tuning failed, a multi-anchor kernel computed wrong
values, a trace did not replay) gets the ``rules`` schedule instead (``fallback="rules"``, the
default) or stays naive (``fallback="naive"``); ``schedule`` never raises for that. Why rules:
some fused kernels that a learned policy creates and FuseOps never does (a matmul with a softmax
or layer-norm epilogue) crash MetaSchedule's design space generator (``reverse-compute-at``
ScheduleError); left naive, gpt_tiny's learned plan ran 0.274 ms against 0.069 ms for the `tvm`
plan, which measured MetaSchedule's gaps, not the plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

from fusion_rl.compiler.schedules.base import ScheduleProvider
from fusion_rl.compiler.schedules.metaschedule import (
    InProcessBuilder,
    InProcessRunner,
    ModuleCache,
    count_anchors,
    import_tensor_intrin,
    kernel_matches,
)
from fusion_rl.errors import ConfigError, StoreError, first_line

log = logging.getLogger(__name__)
#: MetaSchedule's per-task search log (DEBUG); kept off stdout unless configured.
_MS_LOG = logging.getLogger(__name__ + ".search")

_MODULE_EQUALITIES = ("anchor-block", "structural", "ignore-tensor")
_FALLBACKS = ("rules", "naive")


# ----------------------------------------------------------------------------- provider


class TunedSchedule(ScheduleProvider):
    """MetaSchedule-tuned kernels with a persistent database keyed by target and budget."""

    name = "tuned"
    #: ``progress(done, total, label)`` after each tuning task (set by the caller; not an option,
    #: not part of :attr:`key`): tuning is the one step that takes minutes.
    progress: Callable[[int, int | None, str], None] | None = None

    def __init__(self, trials_per_task: int = 16, database_dir: str | Path | None = None,
                 module_equality: str = "structural", seed: int = 0, fallback: str = "rules") -> None:
        self.check_options(trials_per_task, database_dir, module_equality, seed, fallback)
        if database_dir is None:
            cache = os.environ.get("FUSION_RL_CACHE")
            root = Path(cache) if cache else Path.home() / ".cache" / "fusion_rl"
            database_dir = root / "tuning"
        self.trials_per_task = trials_per_task
        self.database_dir = Path(database_dir).expanduser()
        self.module_equality = module_equality
        self.seed = seed
        self.fallback = fallback
        #: Measured candidates committed by this provider (stays 0 on a full database hit).
        self.trials_run = 0
        _check_writable(self.database_dir)

    @staticmethod
    def check_options(trials_per_task: int = 16, database_dir: str | Path | None = None,
                      module_equality: str = "structural", seed: int = 0, fallback: str = "rules") -> None:
        """Validate the constructor's options without touching the disk (env specs are checked
        with it when they are read)."""
        if isinstance(trials_per_task, bool) or not isinstance(trials_per_task, int) \
                or not 0 < trials_per_task <= 1_000_000:
            raise ConfigError("tuned: trials_per_task must be a positive int (at most 1e6), "
                              f"got {trials_per_task!r}")
        if module_equality not in _MODULE_EQUALITIES:
            raise ConfigError(f"tuned: module_equality must be one of {_MODULE_EQUALITIES}, "
                              f"got {module_equality!r}")
        if fallback not in _FALLBACKS:
            raise ConfigError(f"tuned: fallback must be one of {_FALLBACKS}, got {fallback!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"tuned: seed must be an int, got {seed!r}")
        if database_dir is not None and not isinstance(database_dir, (str, os.PathLike)):
            raise ConfigError(f"tuned: database_dir must be a path, got {database_dir!r}")

    @property
    def budget(self) -> int:
        return self.trials_per_task

    @property
    def key(self) -> str:
        # The task granularity and the search's seed change which schedules come out.
        seed = f":s{self.seed}" if self.seed else ""
        return f"{self.name}:{self.module_equality}:{self.fallback}{seed}"

    def db_path(self, target: tvm.target.Target) -> Path:
        """Folder of this (target, budget)'s databases: a readable prefix plus an exact hash."""
        digest = hashlib.sha1(f"{target}|tvm={tvm.__version__}".encode()).hexdigest()[:12]
        mcpu = str(target.attrs.get("mcpu", "generic"))
        target_dir = f"{target.kind.name}-{mcpu}-{digest}"
        return self.database_dir / target_dir / f"t{self.trials_per_task}"

    def schedule(self, mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        folder = self.db_path(target)
        # One process at a time per database: JSONDatabase appends records that point at
        # workloads by line number, so two processes tuning into one folder interleave their
        # appends and corrupt it (seen here: a search and an experiment sharing the cache).
        with exclusive(folder):
            out = self._schedule(mod, target, folder)
        if self.fallback == "rules":
            from fusion_rl.compiler.schedules.rules import RulesSchedule

            out = RulesSchedule().schedule(out, target)  # only kernels still unscheduled
        return out

    def _schedule(self, mod: tvm.IRModule, target: tvm.target.Target, folder: Path) -> tvm.IRModule:
        kernels = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        out = mod.clone()
        if not kernels:
            return out
        anchors = {gv: count_anchors(f) for gv, f in kernels.items()}

        # 1. Shared database: one task per distinct anchor (or per kernel, if "structural").
        shared = _open_database(folder / self.module_equality, self.module_equality)
        tasks = list(ms.relax_integration.extract_tasks(mod, target,
                                                        module_equality=self.module_equality))
        for done, task in enumerate(tasks):
            if self.progress is not None:  # before the task: the bar names what takes minutes
                self.progress(done, len(tasks), f"tuning {task.task_name}")
            if count_anchors(task.dispatched[0]["main"]) <= 1:
                self._tune_if_missing(task, shared, self.module_equality)
        if self.progress is not None and tasks:
            self.progress(len(tasks), len(tasks), "tuned")
        own: list[tvm.ir.GlobalVar] = []
        for gv, func in kernels.items():
            new = _apply(func, target, shared) if anchors[gv] <= 1 else None
            if new is not None:
                out[gv] = new
            else:
                own.append(gv)

        # 2. Kernels the shared database cannot serve: several anchors (reuse is unsound) or a
        #    trace that does not replay (e.g. a conv+relu trace on a bare conv): tune each alone.
        if not own:
            return out
        structural = _open_database(folder / "own", "structural")
        untunable = _KeySet(folder / "own" / "untunable.json")
        verified = _KeySet(folder / "own" / "verified.json")
        for done, gv in enumerate(own):
            if self.progress is not None:
                self.progress(done, len(own), f"tuning alone {gv.name_hint}")
            func = kernels[gv]
            key = str(tvm_ffi.structural_hash(func))
            if key in untunable:
                continue
            task_mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            task = ms.ExtractedTask(gv.name_hint, task_mod, target, [task_mod], 1)
            if not self._tune_if_missing(task, structural, "structural"):
                untunable.add(key)
                continue
            new = _apply(func, target, structural)
            if new is not None and anchors[gv] > 1 and key not in verified:
                if kernel_matches(func, new, target, self.seed):
                    verified.add(key)
                else:
                    log.warning("tuned: %s has %d anchors and its tuned schedule computes "
                                "wrong values; it gets the fallback schedule", gv.name_hint, anchors[gv])
                    new = None
            if new is None:
                untunable.add(key)
            else:
                out[gv] = new
        return out

    def _tune_if_missing(self, task: ms.ExtractedTask, database: ms.Database,
                         equality: str) -> bool:
        """Tune ``task`` unless ``database`` has a record; False if tuning raised or found nothing.

        One task per ``tune_tasks`` call: a design space that crashes (seen on multi-anchor
        kernels: ``reverse-compute-at`` ScheduleError) then costs only its own task.
        """
        if database.query_tuning_record(task.dispatched[0], task.target, "main") is not None:
            return True
        attrs = task.dispatched[0]["main"].attrs
        if attrs is not None and attrs.get("tirx.is_scheduled", False):
            return False  # scheduled by someone else: not ours to tune
        import_tensor_intrin()
        cache = ModuleCache()
        before = len(database)
        try:
            with tempfile.TemporaryDirectory(prefix="fusion_rl_ms_") as work_dir:
                # Evolutionary search scores its whole population with the cost model on every
                # round; 512 (the default) is reached at 16 trials, tiny budgets get less.
                strategy = ms.search_strategy.EvolutionarySearch(
                    population_size=min(512, max(64, 32 * self.trials_per_task)))
                # TuneContext directly, not extracted_tasks_to_tune_contexts: that one rebuilds
                # logging.dictConfig on every call and crashes once a nameless handler (pytest's
                # capture, for one) sits on MetaSchedule's logger.
                context = ms.TuneContext(
                    mod=task.dispatched[0], target=task.target,
                    space_generator="post-order-apply", search_strategy=strategy,
                    task_name=task.task_name, logger=_MS_LOG, rand_state=self.seed,
                    num_threads="physical",
                ).clone()
                ms.tune_tasks(
                    tasks=[context], task_weights=[1.0], work_dir=work_dir,
                    max_trials_global=self.trials_per_task,
                    max_trials_per_task=self.trials_per_task,
                    num_trials_per_iter=min(64, self.trials_per_task),
                    builder=InProcessBuilder(cache),
                    runner=InProcessRunner(cache, EvaluatorConfig(number=3, repeat=1,
                                                                   min_repeat_ms=40)),
                    database=database,
                    # Not the default list: its RemoveBuildArtifact would rmtree(dirname(path)).
                    measure_callbacks=[ms.measure_callback.AddToDatabase(),
                                       ms.measure_callback.UpdateCostModel()],
                    module_equality=equality,
                )
        except Exception as err:  # noqa: BLE001 - a task that cannot be tuned stays naive
            log.warning("tuned: tuning %s failed (%s); it gets the fallback schedule", task.task_name,
                        first_line(err))
        self.trials_run += len(database) - before
        return database.query_tuning_record(task.dispatched[0], task.target, "main") is not None


# ----------------------------------------------------------------------------- helpers



def _check_writable(path: Path) -> None:
    """Fail fast with :class:`StoreError`; probe with a real file (root ignores mode bits)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError as err:
        raise StoreError(f"tuning database dir {path} is not writable ({err}); "
                         "pass database_dir= or set FUSION_RL_CACHE") from err


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (an flock on ``folder/.lock``) while inside."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_database(folder: Path, equality: str) -> ms.database.JSONDatabase:
    """Open (or create) a JSON database; a file that no longer loads is moved aside, not fatal.

    Why: JSONDatabase replays every stored trace on load, and a trace committed under an
    anchor-equal but different workload (possible after an interrupted run) aborts the load.
    The database is a cache, so losing it costs tuning time, never correctness.
    """
    _check_writable(folder)
    paths = {"path_workload": str(folder / "workloads.json"),
             "path_tuning_record": str(folder / "records.json")}
    try:
        return ms.database.JSONDatabase(**paths, module_equality=equality)
    except Exception as err:  # noqa: BLE001
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log.warning("tuned: database %s does not load (%s); moved aside, re-tuning",
                    folder, first_line(err))
        for path in paths.values():
            if os.path.exists(path):
                os.replace(path, f"{path}.corrupt-{stamp}")
        return ms.database.JSONDatabase(**paths, module_equality=equality)


def _apply(func: tvm.tirx.PrimFunc, target: tvm.target.Target,
           database: ms.Database) -> tvm.tirx.PrimFunc | None:
    """The database's schedule of one kernel, or None when it has none or replay fails.

    Applied one kernel at a time so one failing kernel does not cost the others.
    """
    try:
        with target, database:
            new = relax.transform.MetaScheduleApplyDatabase()(tvm.IRModule({"main": func}))["main"]
    except Exception as err:  # noqa: BLE001 - an unschedulable kernel stays naive
        log.info("tuned: the database's schedule does not apply (%s)", first_line(err))
        return None
    scheduled = new.attrs is not None and bool(new.attrs.get("tirx.is_scheduled", False))
    return new if scheduled else None


class _KeySet:
    """A persistent set of kernel structural hashes (untunable ones; verified ones)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.keys: set[str] = set(json.loads(path.read_text()))
        except (OSError, ValueError):
            self.keys = set()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str) -> None:
        from fusion_rl.io import write_atomic

        self.keys.add(key)
        # Atomic, with a temp name of its own: parallel workers never read half a file.
        write_atomic(self.path, json.dumps(sorted(self.keys)), what="tuning key set")
