"""Does a GEMM chain pay here? An MLP's two matmuls computed per block of rows (Chimera, HPCA'23).

Usage: python scripts/gemm_chain.py experiments/gemm_chain/config.yaml [--out DIR]

An MLP is two matmuls with constant weights, joined by elementwise ops (``X @ W1 -> GELU -> @ W2``).
Computed per block of ``TM`` rows, the intermediate ``H`` (rows x 4C) stays in the cache instead
of a round trip through memory. That is the one saving a *group shape* for such chains could
add over one anchor per kernel; this script measures it before any provider declares the shape.

For every distinct MLP kernel of the model (its two matmul groups of the config's rule set
merged) it times, head to head on the target, with the same inputs:

- ``rules``: the two kernels the rule set's plan has, scheduled by the ``rules`` provider;
- ``whole H``: one kernel, a prototype register tile for each matmul (:func:`prototype`), the
  intermediate computed whole before the second matmul reads it;
- ``chain TM``: the same tiles, the first matmul (and its epilogue) computed inside each block of
  ``TM`` rows of the second.

``chain`` against ``whole H`` is the chain's own worth (the tiles are the same); against
``rules`` it also holds the difference between the tiles. Every prototype is checked against the
unscheduled kernel before it is timed. Writes results.md and results.json to --out (default: the
config's folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx

from fusion_rl.cli.common import experiment_args, run_script
from fusion_rl.compare import machine_description
from fusion_rl.compiler.kernels import group_signature
from fusion_rl.compiler.schedules.blocks import inline_injective, is_injective, is_mac, root_blocks
from fusion_rl.compiler.schedules.microkernel import NARROW_LANES
from fusion_rl.compiler.schedules.register_tile import loop_extent
from fusion_rl.compiler.schedules.rules import RulesSchedule
from fusion_rl.compiler.target import parse_target
from fusion_rl.errors import ConfigError, read_yaml
from fusion_rl.fusion.apply import apply_plan
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model
from fusion_rl.graph.opgraph import OpGraph
from fusion_rl.io import read_json, write_atomic

KEYS = {"model", "rules", "target", "block_rows", "repeat", "number", "tolerance"}
#: Accumulators a register tile may hold (of 32 AVX-512 registers: the rest for weights and a broadcast).
_ACCUMULATORS = 24


def load_config(path: Path) -> dict:
    cfg = read_yaml(path, "gemm-chain config")
    if not isinstance(cfg, dict) or set(cfg) - KEYS or not isinstance(cfg.get("model"), str):
        raise ConfigError(f"{path}: expected a mapping with 'model' and keys among {sorted(KEYS)}")
    rows = cfg.get("block_rows", [56, 112])
    if not isinstance(rows, list) or not rows or not all(isinstance(r, int) and r > 0 for r in rows):
        raise ConfigError(f"{path}: 'block_rows' must be a list of positive integers")
    return cfg


def mlp_chains(graph: OpGraph) -> list[tuple[int, int]]:
    """``(first, second)`` matmuls by 2-D weights (``rows x K @ K x N``) where the first's result
    reaches the second through injective ops only and nothing else reads it: the chains a
    per-block schedule could join. (Attention's batched matmuls have no 2-D operand.)"""
    succ = graph.successor_lists()

    def dense(n: int) -> bool:
        node = graph.nodes[n]
        return node.op == "matmul" and len(node.arg_shapes) == 2 and len(node.arg_shapes[1]) == 2

    found = []
    for first in range(len(graph.nodes)):
        if not dense(first):
            continue
        reached, frontier, seconds, leaks = {first}, [first], set(), False
        while frontier:
            for nxt in succ[frontier.pop()]:
                if graph.nodes[nxt].is_mac_anchor:
                    seconds.add(nxt)
                elif graph.nodes[nxt].pattern in (0, 1, 2):
                    if nxt not in reached:
                        reached.add(nxt)
                        frontier.append(nxt)
                else:
                    leaks = True
        leaks = leaks or bool(reached & set(graph.outputs))  # the intermediate is also a result
        if len(seconds) == 1 and not leaks and dense(min(seconds)):
            found.append((first, min(seconds)))
    return found


def merge_chains(graph: OpGraph, plan: FusionPlan, chains: list[tuple[int, int]]) -> tuple[FusionPlan, list]:
    """``plan`` with each chain's two groups merged where that stays legal; the chains merged."""
    groups = {k: set(g) for k, g in enumerate(plan.groups)}
    group_of = dict(enumerate(plan.group_of()))
    merged = []
    for a, b in chains:
        ga, gb = group_of[a], group_of[b]
        if ga == gb:
            continue
        trial = {k: set(g) for k, g in groups.items()}
        trial[ga] |= trial.pop(gb)
        candidate = FusionPlan.from_groups(list(trial.values()), len(graph.nodes), plan.fingerprint, "chains")
        if check_plan(graph, candidate).legal:
            groups = trial
            group_of = {n: (ga if g == gb else g) for n, g in group_of.items()}
            merged.append((a, b))
    return FusionPlan.from_groups(list(groups.values()), len(graph.nodes), plan.fingerprint,
                                  f"{plan.name}+chains"), merged


def kernel_of(mod: tvm.IRModule, graph: OpGraph, plan: FusionPlan, node: int) -> str:
    """The name of the kernel that runs ``node``'s group in ``plan``'s fused module: the op's own
    for a singleton, else ``..._n<first node>`` of that group or of an identical one (FuseTIR
    keeps one of identical kernels)."""
    group = plan.groups[plan.group_of()[node]]
    if len(group) == 1:
        return graph.nodes[group[0]].callee
    names = {gv.name_hint for gv in mod.get_global_vars()}
    sig = group_signature(graph, group)
    return next(name for g in plan.groups if group_signature(graph, g) == sig
                for name in names if name.endswith(f"_n{g[0]}"))


def _tile(extent: int, lanes: int, width: int) -> tuple[int, int, int]:
    """(lanes, vectors, rows) of the register tile over ``extent`` channels with the most
    accumulators. Its rows divide ``width`` (the output's innermost row dimension), so a tile
    never straddles two image rows: there its box of rows would cover pixels of other tiles."""
    lanes = lanes if extent % lanes == 0 else NARROW_LANES
    return max(((lanes, v, r) for v in range(1, 7) for r in range(1, 8)
                if (extent // lanes) % v == 0 and width % r == 0 and r * v <= _ACCUMULATORS),
               key=lambda t: (t[1] * t[2], t[2]))


def _register_tile(sch: s_tir.Schedule, block, rows, channels, red, lanes: int, vectors: int, r: int):
    """``block``'s rows x channels as ``r`` rows x ``vectors`` vectors of accumulators in registers,
    summed over ``red``; returns the accumulator block and the loop over the tile's rows."""
    acc = sch.cache_write(block, 0, "local")
    r_out, r_in = sch.split(rows, [None, r])
    c_out, c_vec, c_lane = sch.split(channels, [None, vectors, lanes])
    sch.reorder(r_out, c_out, red, r_in, c_vec, c_lane)
    sch.unroll(r_in)
    sch.unroll(c_vec)
    sch.vectorize(c_lane)
    sch.reverse_compute_at(acc, c_out, preserve_unit_loops=False)
    return acc, r_out


def prototype(func: tirx.PrimFunc, block_rows: int, chain: bool, lanes: int = 16) -> tirx.PrimFunc:
    """The MLP kernel ``func`` (two matmul anchors, rows x channels) with a register tile per
    matmul; with ``chain``, the first matmul and its epilogue computed in each block of
    ``block_rows`` rows of the second, else whole before it. ``block_rows`` is a multiple of
    the output's innermost row dimension (whole image rows), or divides it. ``lanes``: one
    AVX-512 register of fp32 (an AVX2 target splits each vector in two).

    Raises ``ValueError`` for a kernel that is not such a chain, or a block across rows."""
    sch = s_tir.Schedule(func)
    inline_injective(sch)
    if any(not is_injective(sch, b) and not is_mac(sch, b) for b in root_blocks(sch)):
        # A pooling or layer norm after the chain (a model's last block fused with its head):
        # not the chain alone, and not what the tile below computes.
        raise ValueError("the kernel reduces more than its two matmuls")
    first, second = [b for b in root_blocks(sch) if is_mac(sch, b)]
    *rows2, n, k = sch.get_loops(second)
    width = loop_extent(sch, rows2[-1])
    if block_rows % width and width % block_rows:
        raise ValueError(f"a block of {block_rows} rows is not whole rows of {width}")
    rows = sch.fuse(*rows2)
    outer, inner = sch.split(rows, [None, block_rows])
    acc2, at2 = _register_tile(sch, second, inner, n, k, *_tile(loop_extent(sch, n), lanes, width))
    # The epilogue (bias, scale, transpose, residual) once the tile's rows have every channel:
    # placed per channel chunk, a transposed epilogue's region covered more than the chunk.
    for block in sch.get_consumers(acc2):
        sch.reverse_compute_at(block, at2, preserve_unit_loops=False)
    between = [b for b in sch.get_producers(second) if not is_mac(sch, b)]
    if len(between) != 1:
        raise ValueError("no single elementwise block between the two matmuls")
    (between,) = between
    if chain:
        sch.compute_at(between, outer, preserve_unit_loops=False)
        sch.compute_at(first, outer, preserve_unit_loops=False)
        rows1, j, red = [lp for lp in sch.get_loops(first) if (loop_extent(sch, lp) or 0) > 1][-3:]
    else:
        *rows1, j, red = sch.get_loops(first)
        whole, rows1 = sch.split(sch.fuse(*rows1), [None, block_rows])
        sch.parallel(whole)
    acc1, at1 = _register_tile(sch, first, rows1, j, red, *_tile(loop_extent(sch, j), lanes, width))
    sch.reverse_compute_at(between, at1, preserve_unit_loops=False)  # GELU on the tile, in L1 or L2
    sch.parallel(outer)
    sch.decompose_reduction(first, red)
    sch.decompose_reduction(second, k)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _compile(func: tirx.PrimFunc, target) -> "tvm.runtime.Module":
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()


def _inputs(func: tirx.PrimFunc, seed: int) -> list[np.ndarray]:
    """Random arguments in ``func``'s (possibly packed) parameter shapes, the output last."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in func.params]


def _output(lib, inputs: list[np.ndarray], dev) -> np.ndarray:
    args = [tvm.runtime.tensor(x, dev) for x in inputs]
    lib["main"](*args)
    return args[-1].numpy()


def relative_error(reference: np.ndarray, out: np.ndarray) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return float(np.max(np.abs(reference - out)) / max(np.max(np.abs(reference)), 1e-30))


def _build(funcs: list[tirx.PrimFunc], target: tvm.target.Target, dev) -> list:
    """Each kernel built once, alone, with random inputs: ``(lib, args)`` per kernel."""
    built = []
    for f in funcs:
        built.append((_compile(f, target), [tvm.runtime.tensor(x, dev) for x in _inputs(f, 0)]))
    return built


def time_variants(variants: dict[str, list], repeat: int, number: int, dev) -> dict[str, list[float]]:
    """ms per call of each variant (the sum of its kernels), ``repeat`` times, interleaved:
    repeat ``r`` of every variant before repeat ``r + 1`` of any."""
    timers = {name: [(lib.time_evaluator("main", dev, number=number, repeat=1), args) for lib, args in built]
              for name, built in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, kernels in timers.items():
            times[name].append(sum(timer(*args).mean for timer, args in kernels) * 1e3)
    return times


def _quartiles(x) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(x), [25, 50, 75])
    return float(q2), float(q1), float(q3)


def main(argv: list[str] | None = None) -> int:
    args = experiment_args(__doc__, argv)
    cfg = load_config(args.config)
    out_dir = args.out
    if args.render:
        results = read_json(out_dir / "results.json", "gemm-chain results")
        write_atomic(out_dir / "results.md", render(results["meta"], results["rows"], results["skipped"],
                                                    int(cfg.get("repeat", 15))))
        return 0
    spec = parse_target(cfg.get("target", "host"))
    target, dev = spec.to_tvm(), tvm.cpu()
    tolerance = float(cfg.get("tolerance", 1e-4))
    t0 = time.perf_counter()
    model = load_model(cfg["model"])
    graph = model.graph
    base = make_plan(cfg.get("rules", "aggressive_shapes"), model.mod, graph)
    joined, chains = merge_chains(graph, base, mlp_chains(graph))
    if not chains:
        raise ConfigError(f"{cfg['model']}: no MLP chain (matmul -> elementwise -> matmul) to join")
    base_mod = RulesSchedule().schedule(apply_plan(model.mod, base, graph), target)
    joined_mod = apply_plan(model.mod, joined, graph)
    # Identical chains share one kernel: time each distinct one once, count its calls.
    distinct: dict[int, dict] = {}
    for a, b in chains:
        name = kernel_of(joined_mod, graph, joined, a)
        func = joined_mod[name]
        entry = distinct.setdefault(tvm_ffi.structural_hash(func), {"kernel": name, "chains": []})
        entry["chains"].append([a, b])
    rows, skipped = [], {}
    for entry in distinct.values():
        a, b = entry["chains"][0]
        func = joined_mod[entry["kernel"]]
        m_rows = int(np.prod(graph.nodes[a].shapes[0][:-1]))
        try:
            prototype(func, m_rows, chain=False)  # is it a chain the prototype computes?
        except ValueError as exc:
            skipped[entry["kernel"]] = str(exc)
            continue
        k, hidden = graph.nodes[a].arg_shapes[1]
        n = graph.nodes[b].shapes[0][-1]
        separate = [base_mod[kernel_of(base_mod, graph, base, x)] for x in (a, b)]
        variants = {"rules (2 kernels)": _build(separate, target, dev)}
        errors = {}
        # Blocks of whole image rows (of the output's last row dimension) or parts of one: a
        # block that ends elsewhere gives compute_at a box of rows to recompute.
        width = int(graph.nodes[b].shapes[0][-2])
        sizes = [r for r in cfg.get("block_rows", [56, 112])
                 if m_rows % r == 0 and (r % width == 0 or width % r == 0)]
        # Every prototype is checked on the build that is timed, against the unscheduled kernel.
        inputs = _inputs(func, 1)
        reference = _output(_compile(func, "llvm"), inputs, dev)
        for tm in sizes or [m_rows]:
            for chain in (False, True):
                label = f"chain {tm}" if chain else f"whole H {tm}"
                variants[label] = _build([prototype(func, tm, chain)], target, dev)
                errors[label] = relative_error(reference, _output(variants[label][0][0], inputs, dev))
                if errors[label] > tolerance:
                    raise RuntimeError(f"{entry['kernel']} {label}: wrong output (relative error {errors[label]:.2e})")
        times = time_variants(variants, int(cfg.get("repeat", 15)), int(cfg.get("number", 20)), dev)
        ref = np.asarray(times["rules (2 kernels)"])
        for label, ts in times.items():
            ts = np.asarray(ts)
            whole = np.asarray(times.get(label.replace("chain", "whole H"), ts))
            rows.append({
                "kernel": entry["kernel"], "calls": len(entry["chains"]), "chains": entry["chains"],
                "rows": m_rows, "k": int(k), "hidden": int(hidden), "n": int(n),
                "intermediate_kib": m_rows * int(hidden) * 4 / 1024, "variant": label,
                "ms": _quartiles(ts), "vs_rules": _quartiles(ref / ts), "vs_whole_h": _quartiles(whole / ts),
                "relative_error": errors.get(label), "times_ms": ts.tolist()})
    wall = time.perf_counter() - t0
    command = f"TVM_NUM_THREADS={spec.num_threads} python scripts/gemm_chain.py {args.config}"
    meta = {"model": cfg["model"], "rules": base.name, "target": spec.key, "command": command,
            "schedule": RulesSchedule().key,  # the `rules (2 kernels)` reference's schedule
            "machine": machine_description(spec.num_threads), "wall_s": wall,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_atomic(out_dir / "results.json", json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
    write_atomic(out_dir / "results.md", render(meta, rows, skipped, int(cfg.get("repeat", 15))))
    print(f"wrote {out_dir / 'results.md'} ({wall:.0f} s)")
    return 0


def render(meta: dict, rows: list[dict], skipped: dict[str, str], repeat: int) -> str:
    """results.md from the rows of :func:`main` (nothing typed by hand)."""
    lines = [
        f"# GEMM chains on {meta['model']} (`{meta['rules']}` plan, target `{meta['target']}`, "
        f"schedule `{meta['schedule']}`)\n",
        f"Generated by `{meta['command']}` on {meta['date']}; {meta['machine']}; {meta['wall_s']:.0f} s.  ",
        f"Each cell: median of {repeat} interleaved repeats [IQR] of the ms per call (the mean of "
        "the repeat's calls); ratios are per repeat, > 1 means faster than the column's reference.\n",
        "| kernel | calls | rows x K -> hidden -> N | H KiB | variant | ms | vs rules | vs whole H | rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, vr, vw = r["ms"], r["vs_rules"], r["vs_whole_h"]
        err = "" if r["relative_error"] is None else f"{r['relative_error']:.1e}"
        lines.append(
            f"| {r['kernel']} | {r['calls']} | {r['rows']} x {r['k']} -> {r['hidden']} -> {r['n']} | "
            f"{r['intermediate_kib']:.0f} | {r['variant']} | {ms[0]:.4f} [{ms[1]:.4f}, {ms[2]:.4f}] | "
            f"{vr[0]:.3f} [{vr[1]:.3f}, {vr[2]:.3f}] | "
            + (f"{vw[0]:.3f} [{vw[1]:.3f}, {vw[2]:.3f}]" if r["variant"].startswith("chain") else "")
            + f" | {err} |")
    lines += ["", "Per image (each kernel's time x its calls), the chain's own worth: for each kernel, "
              "its fastest `chain` against the same tiles whole (`whole H`), counted only where it "
              "is faster (a policy forms a shape only where it pays):", ""]
    saved = total = 0.0
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        best = min((r for r in mine if r["variant"].startswith("chain")), key=lambda r: r["ms"][0])
        rules = next(r for r in mine if r["variant"].startswith("rules"))
        # From the paired ratio, not a difference of medians taken over different repeats.
        gain = max(best["vs_whole_h"][0] - 1.0, 0.0) * best["ms"][0] * best["calls"]
        saved += gain
        total += rules["ms"][0] * best["calls"]
        lines.append(f"- `{kernel}` ({best['rows']} rows): `{best['variant']}`, "
                     f"{best['vs_whole_h'][0]:.3f}x the same tiles whole, {gain:.4f} ms saved.")
    lines.append(f"- **in all: {saved:.4f} ms of the {total:.3f} ms these kernels take under "
                 f"`rules` ({100 * saved / total:.1f}%).**")
    lines += [f"- not timed: `{kernel}` ({why})." for kernel, why in skipped.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
