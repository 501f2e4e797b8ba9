"""Shape credit: each group-shape instance priced alone on the one-anchor plan, and the credit
plan that forms the instances worth forming. A stand-in table makes the worth of each instance
known, so the tests can say which instances must be formed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fusion_rl.compiler.shape_credit import CREDIT_BASE_RULE_SET, credit_plan, instance_credits
from fusion_rl.errors import MeasurementError
from fusion_rl.fusion.group_shapes import shape_instances
from fusion_rl.fusion.rules import make_plan

SHAPE = "pointwise_depthwise"


class WorthTable:
    """Estimates 10 ms, less ``worth[i]`` ms for each instance ``i`` a plan holds in one group;
    a plan holding an instance listed in ``broken`` cannot be estimated."""

    def __init__(self, instances, worth, broken=(), base_fails=False):
        self.instances, self.worth, self.broken, self.base_fails = instances, worth, set(broken), base_fails

    def estimate(self, model, plan):
        group_of = plan.group_of()
        formed = [i for i, inst in enumerate(self.instances) if len({group_of[n] for n in inst}) == 1]
        if self.broken & set(formed) or (self.base_fails and not formed):
            raise MeasurementError("kernel could not be built")
        return SimpleNamespace(latency_ms=10.0 - sum(self.worth[i] for i in formed))


@pytest.fixture()
def mobilenet(model_cache):
    model = model_cache("mobilenet_tiny")
    instances = shape_instances(model.graph, SHAPE)
    assert len(instances) >= 3  # the tests need a paying, a losing and a broken instance
    return model, instances


def test_each_instance_is_priced_alone_on_the_one_anchor_plan(mobilenet):
    model, instances = mobilenet
    worth = [0.5 if i % 2 == 0 else -0.25 for i in range(len(instances))]
    credits = instance_credits(WorthTable(instances, worth, broken=[1]), model, [SHAPE])
    expected = {(SHAPE, inst): -math.log((10.0 - w) / 10.0) for i, (inst, w) in enumerate(zip(instances, worth))
                if i != 1}
    assert credits == pytest.approx(expected)


def test_the_credit_plan_forms_exactly_the_paying_instances(mobilenet):
    model, instances = mobilenet
    worth = [0.5 if i % 2 == 0 else -0.25 for i in range(len(instances))]
    plan, formed = credit_plan(WorthTable(instances, worth), model, [SHAPE])
    group_of = plan.group_of()
    together = [len({group_of[n] for n in inst}) == 1 for inst in instances]
    assert together == [w > 0 for w in worth]
    assert formed == sum(together) and plan.name == "credit"
    # Outside the instances, the plan is the base rule's: only the paying pairs were added.
    base = make_plan(CREDIT_BASE_RULE_SET, model.mod, model.graph)
    paired = {n for inst, t in zip(instances, together) if t for n in inst}
    assert {g for g in plan.groups if not set(g) & paired} <= set(base.groups)


def test_no_paying_instance_gives_the_base_plan_and_a_base_without_estimate_raises(mobilenet):
    model, instances = mobilenet
    plan, formed = credit_plan(WorthTable(instances, [-1.0] * len(instances)), model, [SHAPE])
    assert formed == 0 and plan.hash == make_plan(CREDIT_BASE_RULE_SET, model.mod, model.graph).hash
    with pytest.raises(MeasurementError):
        instance_credits(WorthTable(instances, [1.0] * len(instances), base_fails=True), model, [SHAPE])
