"""A learned latency cost model: predict a plan's latency without compiling or measuring it.

The model works per *group* (one fused kernel), because groups are what plans share: the same
conv+bias+relu group recurs in many plans and many models, while whole plans rarely repeat.

- **Features of a group** (:func:`group_features`): the sum and the max of its members'
  static node features (:func:`fusion_rl.graph.features.node_features`: op one-hots, pattern
  kinds, log FLOPs and bytes, ...), plus group size, anchors, multiply-accumulate anchors, total
  FLOPs, bytes entering the group, bytes leaving it, and intermediate bytes kept inside it.
- **Regressor**: XGBoost (``backend="xgboost"``) of ``log(group ms + eps)``, trained on per-kernel
  times (records measured with ``per_kernel=True``, mapped to groups with
  :func:`fusion_rl.compiler.kernels.group_kernel_times`). Where xgboost is not installed,
  ``backend="ridge"`` is a closed-form ridge regression in numpy (weaker; no interactions).
- **Plan latency** = sum of predicted group latencies + ``overhead_ms`` per kernel, the launch /
  VM dispatch cost that per-kernel times do not see. :meth:`LatencyCostModel.fit_plans` fits
  it by least squares from end-to-end latencies.

A model is valid for one (target, schedule provider): record them in ``meta``. It is saved as
JSON (the booster embedded in XGBoost's own binary UBJSON format, base64); never pickled.

Example
-------
>>> cm = LatencyCostModel(meta={"target": "llvm-sapphirerapids-t2", "provider": "rules"})
>>> cm.fit(samples)            # doctest: +SKIP  (graph, plan, {group: ms}) triples
>>> cm.fit_plans(plan_samples) # doctest: +SKIP  (graph, plan, end-to-end ms) triples
>>> cm.predict(graph, plan)    # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fusion_rl.errors import ConfigError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.io import read_json, write_atomic
from fusion_rl.graph.features import NODE_FEATURE_NAMES, NUM_NODE_FEATURES, feature_schema, log_scale, node_features
from fusion_rl.graph.opgraph import OpGraph

COST_MODEL_FORMAT = 1
#: Added to group times before the log: a view (reshape) group has time 0, and 0.1 us is
#: below any measurable kernel on these machines.
EPS_MS = 1e-4

GROUP_EXTRA_FEATURES: tuple[str, ...] = (
    "size", "log_size", "anchors", "mac_anchors", "log_flops", "log_bytes_in", "log_bytes_out",
    "log_bytes_saved", "log_weight_bytes", "log_arith_intensity",
)
GROUP_FEATURE_NAMES: tuple[str, ...] = (
    *(f"sum:{n}" for n in NODE_FEATURE_NAMES),
    *(f"max:{n}" for n in NODE_FEATURE_NAMES),
    *GROUP_EXTRA_FEATURES,
)

GroupTimes = dict[tuple[int, ...], float]


def group_features(graph: OpGraph, plan: FusionPlan, x: np.ndarray | None = None) -> np.ndarray:
    """``[num_groups, len(GROUP_FEATURE_NAMES)]`` float32, one row per ``plan.groups`` entry.

    ``x`` is ``node_features(graph)``, passed in when the caller has it already.
    """
    x = node_features(graph) if x is None else x
    group_of = plan.group_of()
    n_groups = plan.num_groups
    bytes_in = np.zeros(n_groups)
    bytes_out: list[dict[tuple[int, int], int]] = [{} for _ in range(n_groups)]
    saved: list[dict[tuple[int, int], int]] = [{} for _ in range(n_groups)]
    internal_in = np.zeros(n_groups)
    for e in graph.edges:
        a, b = group_of[e.src], group_of[e.dst]
        if a == b:
            # A tensor is kept in the kernel unless it also escapes; key by (producer, output).
            saved[a][(e.src, e.index)] = e.bytes
            internal_in[a] += e.bytes
        else:
            bytes_out[a][(e.src, e.index)] = e.bytes
    for nid in graph.outputs:
        node = graph.nodes[nid]
        bytes_out[group_of[nid]][(nid, -1)] = node.bytes_written
    rows = np.zeros((n_groups, len(GROUP_FEATURE_NAMES)), dtype=np.float32)
    for gi, group in enumerate(plan.groups):
        members = list(group)
        nodes = [graph.nodes[i] for i in members]
        # Bytes read from outside: every input read minus what producers inside the group feed.
        bytes_in[gi] = sum(n.bytes_read for n in nodes) - internal_in[gi]
        out = sum(bytes_out[gi].values())
        kept = sum(v for k, v in saved[gi].items() if k not in bytes_out[gi])
        flops = sum(n.flops for n in nodes)
        moved = bytes_in[gi] + out
        extra = (
            float(len(members)),
            log_scale(len(members)),
            float(sum(n.is_anchor for n in nodes)),
            float(sum(n.is_mac_anchor for n in nodes)),
            log_scale(flops),
            log_scale(bytes_in[gi]),
            log_scale(out),
            log_scale(kept),
            log_scale(sum(n.weight_bytes for n in nodes)),
            log_scale(flops / moved if moved > 0 else 0.0) * 4.0,
        )
        sub = x[members]
        rows[gi, :NUM_NODE_FEATURES] = sub.sum(axis=0)
        rows[gi, NUM_NODE_FEATURES:2 * NUM_NODE_FEATURES] = sub.max(axis=0)
        rows[gi, 2 * NUM_NODE_FEATURES:] = extra
    return rows


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); ``nan`` for < 2 points or no spread."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or x.size != y.size:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    # Average the ranks of tied values so that ties do not invent an order.
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def xgboost_available() -> bool:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return False
    return True


class LatencyCostModel:
    """Predicts plan latency (ms) from per-group features; see the module docstring.

    Parameters
    ----------
    backend:
        ``"xgboost"`` (default when installed) or ``"ridge"``.
    params:
        Backend hyperparameters: for xgboost, ``num_boost_round`` and any ``xgboost.train``
        param (``max_depth``, ``eta``, ...); for ridge, ``alpha``.
    seed:
        Seeds xgboost's row/column subsampling.
    meta:
        Free-form facts saved with the model (target key, provider, training models, ...).
    """

    XGB_DEFAULTS: dict[str, Any] = {
        "num_boost_round": 400, "max_depth": 5, "eta": 0.05, "subsample": 0.8,
        "colsample_bytree": 0.8, "min_child_weight": 1.0, "lambda": 1.0, "nthread": 2,
    }

    def __init__(
        self,
        backend: str | None = None,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        backend = backend or ("xgboost" if xgboost_available() else "ridge")
        if backend not in ("xgboost", "ridge"):
            raise ConfigError(f"unknown cost-model backend '{backend}'; choose 'xgboost' or 'ridge'")
        if backend == "xgboost" and not xgboost_available():
            raise ConfigError("backend 'xgboost' needs xgboost: pip install xgboost-cpu (or use backend='ridge')")
        self.backend = backend
        defaults = self.XGB_DEFAULTS if backend == "xgboost" else {"alpha": 1.0}
        self.params = {**defaults, **(params or {})}
        self.seed = seed
        self.meta = dict(meta or {})
        self.overhead_ms = 0.0
        self._booster: Any = None
        self._ridge: dict[str, list[float]] | None = None

    @property
    def fitted(self) -> bool:
        return self._booster is not None or self._ridge is not None

    # ---- training ----------------------------------------------------------------------------
    def fit(self, samples: Sequence[tuple[OpGraph, FusionPlan, GroupTimes]]) -> "LatencyCostModel":
        """Train the group regressor on ``(graph, plan, {group: kernel ms})`` samples.

        Every group of every plan is one training row (groups seen in several plans appear
        several times, weighting common groups more, as they matter in more plans).
        """
        feats, targets = [], []
        xcache: dict[int, np.ndarray] = {}
        for graph, plan, times in samples:
            x = xcache.setdefault(id(graph), node_features(graph))
            rows = group_features(graph, plan, x)
            for gi, group in enumerate(plan.groups):
                if group in times:
                    feats.append(rows[gi])
                    targets.append(math.log(max(0.0, float(times[group])) + EPS_MS))
        if len(targets) < 2:
            raise ConfigError(
                f"cost model needs per-group kernel times of at least 2 groups, got {len(targets)}; "
                "measure plans with per_kernel=True and map them with group_kernel_times"
            )
        X, y = np.stack(feats), np.asarray(targets, dtype=np.float64)
        if self.backend == "xgboost":
            self._fit_xgboost(X, y)
        else:
            self._fit_ridge(X, y)
        return self

    def fit_plans(self, samples: Sequence[tuple[OpGraph, FusionPlan, float]]) -> "LatencyCostModel":
        """Fit ``overhead_ms`` (per kernel, >= 0) from end-to-end plan latencies, by least squares
        of ``latency - sum(predicted group ms)`` on the number of kernels. Call after :meth:`fit`."""
        self._require_fitted()
        if not samples:
            raise ConfigError("fit_plans needs at least one (graph, plan, latency ms) sample")
        n = np.array([plan.num_groups for _, plan, _ in samples], dtype=np.float64)
        resid = np.array([ms - self._group_sum(g, p) for g, p, ms in samples], dtype=np.float64)
        self.overhead_ms = max(0.0, float((n @ resid) / (n @ n)))
        return self

    def _fit_xgboost(self, X: np.ndarray, y: np.ndarray) -> None:
        import xgboost as xgb

        params = dict(self.params)
        rounds = int(params.pop("num_boost_round"))
        params.update({"objective": "reg:squarederror", "seed": self.seed, "verbosity": 0})
        self._booster = xgb.train(params, xgb.DMatrix(X, label=y), num_boost_round=rounds)

    def _fit_ridge(self, X: np.ndarray, y: np.ndarray) -> None:
        mu, sd = X.mean(axis=0), X.std(axis=0)
        sd[sd == 0] = 1.0  # constant features (ops never seen) carry no information
        Z = (X - mu) / sd
        alpha = float(self.params["alpha"])
        w = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
        self._ridge = {"mu": mu.tolist(), "sd": sd.tolist(), "w": w.tolist(), "b": [float(y.mean())]}

    # ---- prediction --------------------------------------------------------------------------
    def predict_groups(self, graph: OpGraph, plan: FusionPlan) -> np.ndarray:
        """Predicted kernel ms of each group of ``plan`` (in ``plan.groups`` order)."""
        self._require_fitted()
        X = group_features(graph, plan)
        if self._booster is not None:
            import xgboost as xgb

            log_ms = self._booster.predict(xgb.DMatrix(X))
        else:
            r = self._ridge
            assert r is not None
            log_ms = ((X - np.asarray(r["mu"])) / np.asarray(r["sd"])) @ np.asarray(r["w"]) + r["b"][0]
        return np.maximum(np.exp(np.asarray(log_ms, dtype=np.float64)) - EPS_MS, 0.0)

    def _group_sum(self, graph: OpGraph, plan: FusionPlan) -> float:
        return float(self.predict_groups(graph, plan).sum())

    def predict(self, graph: OpGraph, plan: FusionPlan) -> float:
        """Predicted end-to-end latency of ``plan`` in ms (> 0)."""
        ms = self._group_sum(graph, plan) + self.overhead_ms * plan.num_groups
        return max(ms, EPS_MS)

    def spearman(self, holdout: Sequence[tuple[OpGraph, FusionPlan, float]]) -> float:
        """Spearman rank correlation of predicted vs measured latency over ``holdout``."""
        return spearman([self.predict(g, p) for g, p, _ in holdout], [ms for _, _, ms in holdout])

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ConfigError("the cost model is not trained: call fit() or load() first")

    # ---- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        model: dict[str, Any]
        if self._booster is not None:
            raw = bytes(self._booster.save_raw(raw_format="ubj"))  # binary: exact floats
            model = {"ubj_base64": base64.b64encode(raw).decode()}
        else:
            model = {"ridge": self._ridge}
        return {
            "format": COST_MODEL_FORMAT,
            "backend": self.backend,
            "params": self.params,
            "seed": self.seed,
            "meta": self.meta,
            "overhead_ms": self.overhead_ms,
            "eps_ms": EPS_MS,
            "feature_schema": feature_schema(),
            "group_features": list(GROUP_FEATURE_NAMES),
            "model": model,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model through :func:`fusion_rl.io.write_atomic` (never half a model)."""
        return write_atomic(path, json.dumps(self.to_dict()) + "\n", what="cost model")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyCostModel":
        path = Path(path)
        if not os.path.lexists(path):
            raise ConfigError(f"cost model file not found: {path}")
        data = read_json(path, "cost model file", ConfigError, 256 << 20)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "cost model") -> "LatencyCostModel":
        if not isinstance(data, dict) or data.get("format") != COST_MODEL_FORMAT:
            raise ConfigError(f"{source}: not a cost model of format {COST_MODEL_FORMAT}; refit it")
        if data.get("group_features") != list(GROUP_FEATURE_NAMES) or data.get("feature_schema") != feature_schema():
            raise ConfigError(
                f"{source} was trained with another feature layout than this fusion_rl's; refit it "
                "with scripts/fit_cost_model.py"
            )
        cm = cls(backend=data["backend"], params=data.get("params"), seed=int(data.get("seed", 0)),
                 meta=data.get("meta"))
        cm.overhead_ms = float(data.get("overhead_ms", 0.0))
        model = data.get("model", {})
        if cm.backend == "xgboost":
            import xgboost as xgb

            cm._booster = xgb.Booster(params={"nthread": cm.params.get("nthread", 2)})
            cm._booster.load_model(bytearray(base64.b64decode(model["ubj_base64"])))
        else:
            cm._ridge = model["ridge"]
        return cm
