"""FusionPlan: a partition of an OpGraph's nodes into groups (one fused kernel per group)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fusion_rl.errors import IllegalPlanError, PlanMismatchError
from fusion_rl.io import check_text, read_json, write_atomic

PLAN_FORMAT_VERSION = 1
#: Most operators a plan may partition (the zoo's largest model has a few hundred).
MAX_NODES = 1 << 20
#: Largest plan file read (a plan of MAX_NODES singletons is about 10 MiB).
MAX_PLAN_BYTES = 32 << 20


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
        """Canonicalize (sort ids in a group, sort groups by first id) and check it partitions.

        Nothing is allocated by ``num_nodes`` itself: a plan claiming 10**12 nodes is refused by
        its size, not by building a set of that many ids.
        """
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or not 0 <= num_nodes <= MAX_NODES:
            raise IllegalPlanError(f"plan 'num_nodes' must be an integer in 0..{MAX_NODES}, got {num_nodes!r}")
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
        if len(seen) != num_nodes:
            # Every id is in range and none repeats, so some of 0..num_nodes-1 are missing; the
            # first ten lie within the first len(seen) + 10 ids.
            missing = [i for i in range(min(num_nodes, len(seen) + 10)) if i not in seen][:10]
            raise IllegalPlanError(
                f"nodes {missing}{'...' if num_nodes - len(seen) > 10 else ''} are in no group"
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
    def from_dict(cls, data: Any, num_nodes: int | None = None, fingerprint: str | None = None) -> "FusionPlan":
        """A plan from its JSON form (untrusted: every field is checked).

        Parameters
        ----------
        num_nodes
            The node count of the model the plan is for, when known: a plan of
            another size is refused before anything is built from its groups.
        fingerprint
            That model's fingerprint, when known: a plan made for another model
            is refused naming both.

        Raises
        ------
        IllegalPlanError
            for a malformed plan, or a name that is not printable text.
        PlanMismatchError
            for a plan of another model or size.
        """
        if not isinstance(data, dict):
            raise IllegalPlanError("a plan must be a JSON object with 'groups' and 'num_nodes'")
        if data.get("format", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
            raise IllegalPlanError(f"unsupported plan format {str(data.get('format'))[:20]!r}")
        # The name and fingerprint are printed; a newline or an ANSI escape in them could fake
        # "legal" or "error:" lines on a terminal.
        name = check_text(data.get("name", ""), "plan 'name'", IllegalPlanError)
        plan_fp = check_text(data.get("fingerprint", ""), "plan 'fingerprint'", IllegalPlanError, 128)
        if fingerprint and plan_fp and plan_fp != fingerprint:
            raise PlanMismatchError(f"plan is for model {plan_fp}, not this model ({fingerprint})")
        groups = data.get("groups")
        size = data.get("num_nodes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IllegalPlanError("plan 'num_nodes' must be a non-negative integer")
        if num_nodes is not None and size != num_nodes:
            raise PlanMismatchError(f"plan has {size} nodes, the model has {num_nodes} (is the plan for another model?)")
        if size > MAX_NODES:
            raise IllegalPlanError(f"plan 'num_nodes' is {size}, more than the {MAX_NODES} this fusion_rl plans for")
        if not isinstance(groups, list) or len(groups) > size or not all(
            isinstance(g, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
            for g in groups
        ):
            raise IllegalPlanError("plan 'groups' must be a list of lists of integer node ids")
        return cls.from_groups(groups, size, plan_fp, name)

    def save(self, path: str | os.PathLike, what: str = "plan file") -> Path:
        """Write the plan as JSON through :func:`fusion_rl.io.write_atomic` (a killed save never
        leaves half a plan; a symlink is written through; a folder or device is refused)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n", what=what)

    @classmethod
    def load(cls, path: str | os.PathLike, num_nodes: int | None = None,
             fingerprint: str | None = None) -> "FusionPlan":
        """Read a plan file (at most :data:`MAX_PLAN_BYTES`; see :meth:`from_dict`)."""
        if not os.path.lexists(path):
            raise IllegalPlanError(f"plan file not found: {path}")
        data = read_json(path, "plan file", IllegalPlanError, MAX_PLAN_BYTES)
        return cls.from_dict(data, num_nodes, fingerprint)
