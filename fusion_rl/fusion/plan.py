"""FusionPlan: a partition of an OpGraph's nodes into groups (one fused kernel per group)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fusion_rl.errors import IllegalPlanError, PlanMismatchError

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FusionPlan:
    """A partition of node ids ``0..num_nodes-1`` into groups.

    Construct it with :meth:`from_groups` (which canonicalizes); two plans with the same groups
    in any order are equal and hash alike. A group of one node is an unfused kernel.
    """

    groups: tuple[tuple[int, ...], ...]
    num_nodes: int
    fingerprint: str = ""  #: OpGraph fingerprint of the model the plan is for ("" = unchecked)
    name: str = ""  #: who made it (rule set, policy, search); not part of the identity
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_groups(
        cls,
        groups: Iterable[Iterable[int]],
        num_nodes: int,
        fingerprint: str = "",
        name: str = "",
    ) -> "FusionPlan":
        """Canonicalize (sort ids in a group, sort groups by first id) and check it partitions."""
        canon = sorted((tuple(sorted(int(i) for i in g)) for g in groups), key=lambda g: g[:1])
        canon = [g for g in canon if g]
        seen: dict[int, int] = {}
        for gi, group in enumerate(canon):
            for nid in group:
                if nid < 0 or nid >= num_nodes:
                    raise PlanMismatchError(
                        f"group {gi} names node {nid}, but the model has nodes 0..{num_nodes - 1}"
                        " (is the plan for another model?)"
                    )
                if nid in seen:
                    raise IllegalPlanError(f"node {nid} is in two groups ({seen[nid]} and {gi})")
                seen[nid] = gi
        missing = sorted(set(range(num_nodes)) - set(seen))
        if missing:
            raise IllegalPlanError(
                f"nodes {missing[:10]}{'...' if len(missing) > 10 else ''} are in no group"
            )
        return cls(tuple(canon), num_nodes, fingerprint, name)

    @classmethod
    def from_assignment(
        cls, assignment: Sequence[int], fingerprint: str = "", name: str = ""
    ) -> "FusionPlan":
        """From a group label per node (labels are arbitrary ints)."""
        by_label: dict[int, list[int]] = {}
        for nid, label in enumerate(assignment):
            by_label.setdefault(int(label), []).append(nid)
        return cls.from_groups(by_label.values(), len(assignment), fingerprint, name)

    @classmethod
    def singletons(cls, num_nodes: int, fingerprint: str = "", name: str = "unfused") -> "FusionPlan":
        return cls.from_groups(([i] for i in range(num_nodes)), num_nodes, fingerprint, name)

    # ---- views -----------------------------------------------------------------------------
    def group_of(self) -> list[int]:
        """The group index of each node."""
        out = [0] * self.num_nodes
        for gi, group in enumerate(self.groups):
            for nid in group:
                out[nid] = gi
        return out

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def fused_groups(self) -> list[tuple[int, ...]]:
        """Groups of two or more nodes (the ones that become fused kernels)."""
        return [g for g in self.groups if len(g) > 1]

    @property
    def hash(self) -> str:
        """A stable content hash of the partition (independent of name and group order)."""
        blob = json.dumps([self.num_nodes, self.groups], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_name(self, name: str) -> "FusionPlan":
        return FusionPlan(self.groups, self.num_nodes, self.fingerprint, name, dict(self.meta))

    def __str__(self) -> str:
        fused = len(self.fused_groups)
        return (
            f"FusionPlan({self.name or 'plan'}: {self.num_nodes} ops in {self.num_groups} groups, "
            f"{fused} fused, hash {self.hash})"
        )

    # ---- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT_VERSION,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_nodes": self.num_nodes,
            "hash": self.hash,
            "groups": [list(g) for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "FusionPlan":
        if not isinstance(data, dict):
            raise IllegalPlanError("a plan must be a JSON object with 'groups' and 'num_nodes'")
        if data.get("format", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
            raise IllegalPlanError(f"unsupported plan format {data.get('format')!r}")
        groups = data.get("groups")
        num_nodes = data.get("num_nodes")
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
            for g in groups
        ):
            raise IllegalPlanError("plan 'groups' must be a list of lists of integer node ids")
        if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 0:
            raise IllegalPlanError("plan 'num_nodes' must be a non-negative integer")
        return cls.from_groups(
            groups, num_nodes, str(data.get("fingerprint", "")), str(data.get("name", ""))
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)  # atomic: a killed save never leaves half a plan
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionPlan":
        path = Path(path)
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise IllegalPlanError(f"plan file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IllegalPlanError(f"plan file {path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise IllegalPlanError(f"plan file {path} is nested too deeply to be a plan") from None
        except OSError as exc:
            raise IllegalPlanError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
        return cls.from_dict(data)
