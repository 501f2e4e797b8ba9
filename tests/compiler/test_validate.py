"""Reproducibility, and ``fusion-rl validate``: a stored latency holds, a tampered one does not."""

from __future__ import annotations

import json

import pytest

from fusion_rl.cli import main
from fusion_rl.compiler.result import REL_FLOOR, holds, load_result, target_name, tolerance
from fusion_rl.errors import ConfigError

from conftest import one_line_error, run_cli

MEASURE = ["--repeat", "5", "--min-repeat-ms", "20"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """`fusion-rl measure --json` of cnn_plain / tvm, saved as RESULT.json, plus its store."""
    import io
    from contextlib import redirect_stdout

    d = tmp_path_factory.mktemp("validate")
    store = d / "m.sqlite"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["measure", "cnn_plain", "--rules", "tvm", "--json", "--store", str(store), *MEASURE])
    assert code == 0
    (d / "result.json").write_text(buf.getvalue())
    return {"dir": d, "store": store, "result": d / "result.json", "data": json.loads(buf.getvalue())}


# ---- the criterion ------------------------------------------------------------------------


def test_criterion_uses_iqr_and_a_relative_floor():
    assert tolerance(10.0, 0.0, 0.0) == pytest.approx(REL_FLOOR * 10.0)
    assert tolerance(10.0, 1.0, 1.0) == pytest.approx(3 * 2 ** 0.5)  # noise beyond the floor
    assert holds(10.0, 0.1, 10.9, 0.1).holds and not holds(10.0, 0.1, 11.2, 0.1).holds
    assert holds(10.0, 2.0, 16.5, 1.0).holds  # very noisy runs get a wide band (6.7 ms)
    assert not holds(10.0, 0.1, 1.0, 0.05).holds  # a 10x claim does not hold


def test_target_key_round_trip():
    from fusion_rl.compiler.target import parse_target

    for name in ("haswell-t1", "sapphirerapids-t2", "host"):
        spec = parse_target(name)
        assert parse_target(target_name(spec.key)).key == spec.key
    with pytest.raises(ConfigError):
        target_name("quantum-9000")


# ---- validate -----------------------------------------------------------------------------


@pytest.mark.slow
def test_fresh_result_is_remeasured_and_judged_by_the_criterion(capsys, measured):
    """End to end: validate times the plan again (not from the store) and its verdict and exit
    code are the criterion applied to the numbers it reports. Whether a fresh timing lands
    within 10 % of the stored one depends on machine load, so that is not asserted here; the
    criterion itself is tested deterministically below."""
    from fusion_rl.compiler.result import holds

    code, out, err = run_cli(capsys, "validate", str(measured["result"]), "--json")
    data = json.loads(out)
    assert data["plan_hash"] == measured["data"]["plan_hash"]
    assert data["stored_ms"] == measured["data"]["latency_ms"]
    assert data["new_times_ms"] != measured["data"]["times_ms"]  # fresh timing, not the store
    expected = holds(data["stored_ms"], data["stored_spread_ms"], data["new_ms"], data["new_spread_ms"])
    assert data["holds"] == expected.holds and code == (0 if expected.holds else 1), err
    assert data["verdict"].startswith("HOLDS" if expected.holds else "DOES NOT HOLD")


@pytest.mark.parametrize(
    "old, old_iqr, new, new_iqr, verdict",
    [
        (1.00, 0.01, 1.05, 0.01, True),  # within the 10 % floor
        (1.00, 0.01, 1.15, 0.01, False),  # beyond the floor, spreads small
        (1.00, 0.10, 1.35, 0.10, True),  # beyond 10 %, within 3 x combined IQR (0.42)
        (1.00, 0.10, 1.50, 0.10, False),
        (1.00, 0.01, 10.0, 0.01, False),  # a tampered x10 result
    ],
)
def test_criterion(old, old_iqr, new, new_iqr, verdict):
    from fusion_rl.compiler.result import holds

    assert holds(old, old_iqr, new, new_iqr).holds is verdict


@pytest.mark.slow
@pytest.mark.parametrize("factor, verdict", [(1.0, "HOLDS"), (10.0, "DOES NOT HOLD")])
def test_tampered_result_does_not_hold(capsys, measured, tmp_path, monkeypatch, factor, verdict):
    """The stored result holds and a x10 one does not, end to end through the CLI. The plan is
    compiled, verified and timed again, but the verdict is judged against the original timing:
    on a loaded machine (two test workers on two cores) a fresh IQR on a 0.1 ms model has reached
    23 ms, a band wide enough to let even a x10 claim hold."""
    import dataclasses

    from fusion_rl.compiler.measure import Measurer

    # The spread is pinned at 5% of the median: a first timing taken while the other test
    # worker compiled once had an IQR of 14x its median (0.63 ms on 0.045 ms), a band in which
    # a x10 claim holds. What is under test is the CLI path, not this machine's noise
    # (test_criterion covers the criterion itself).
    first = dict(measured["data"])
    first["spread_ms"] = 0.05 * first["latency_ms"]
    real = Measurer.measure

    def as_first_timed(self, model, plan, **kwargs):
        record = real(self, model, plan, **kwargs)
        assert record.status == "ok", record.error
        return dataclasses.replace(record, median_ms=first["latency_ms"], spread_ms=first["spread_ms"],
                                   times_ms=list(first["times_ms"]))

    monkeypatch.setattr(Measurer, "measure", as_first_timed)
    data = dict(first, latency_ms=first["latency_ms"] * factor)
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, "validate", str(tampered))
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(verdict + ":"), out
    assert code == (0 if verdict == "HOLDS" else 1), out


@pytest.mark.slow
def test_bundle_carries_the_plan(capsys, tmp_path):
    """A saved plan (not a rule set) validates from a bundle without --plan."""
    plan = tmp_path / "p.json"
    assert run_cli(capsys, "plan", "mlp_tiny", "--rules", "tensorrt", "-o", str(plan))[0] == 0
    data = json.loads(plan.read_text())
    data["name"] = "handmade"  # not a rule-set name: nothing to rebuild the plan from
    plan.write_text(json.dumps(data))
    code, out, err = run_cli(capsys, "measure", "mlp_tiny", "--plan", str(plan), "--json", "--no-store", *MEASURE)
    assert code == 0, err
    result = tmp_path / "r.json"
    result.write_text(out)
    # The bare measure JSON names the plan file, not a rule set: validate needs the plan.
    code, _, err = run_cli(capsys, "validate", str(result))
    one_line_error(code, err, "--plan")
    bundle = tmp_path / "bundle.json"
    code, out, err = run_cli(capsys, "validate", str(result), "--plan", str(plan), "-o", str(bundle))
    _judged(code, out, err)
    loaded = load_result(bundle)
    assert loaded.plan is not None and loaded.model == "mlp_tiny" and loaded.protocol["repeat"] == 5
    code, out, err = run_cli(capsys, "validate", str(bundle))
    _judged(code, out, err)


def _judged(code: int, out: str, err: str) -> None:
    """A verdict was reached and the exit status says the same. Which verdict depends on machine
    load (a fresh timing); the criterion itself is tested deterministically in test_criterion."""
    assert "Traceback" not in err and out.startswith(("HOLDS", "DOES NOT HOLD")), err
    assert code == (0 if out.startswith("HOLDS") else 1), (code, out)


def test_wrong_plan_is_refused(capsys, measured):
    code, _, err = run_cli(capsys, "validate", str(measured["result"]), "--rules", "unfused")
    one_line_error(code, err, "hash", measured["data"]["plan_hash"])


def test_wrong_model_is_refused(capsys, measured):
    code, _, err = run_cli(capsys, "validate", str(measured["result"]), "--model", "mlp_tiny")
    one_line_error(code, err, "was measured on model")


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["result file not found"]),
        ("{not json", ["not valid JSON"]),
        ("[1, 2]", ["must hold a JSON object"]),
        ('{"model": "cnn_plain"}', ["lacks", "plan_hash"]),
        ("STATUS", ["failed measurement"]),
        ("LATENCY", ["'latency_ms' must be a finite number"]),
        ("BUDGET", ["'budget' must be an integer"]),
        ('{"format": "fusion_rl.result/99", "measurement": {}}', ["unsupported format"]),
        ("TARGET", ["not a target key"]),
    ],
)
def test_bad_result_files(capsys, measured, tmp_path, content, words):
    path = tmp_path / "r.json"
    data = dict(measured["data"])
    if content == "STATUS":
        data.update(status="crashed", latency_ms=None)
        content = json.dumps(data)
    elif content == "LATENCY":
        data["latency_ms"] = "fast"
        content = json.dumps(data)
    elif content == "BUDGET":
        data["budget"] = -1
        content = json.dumps(data)
    elif content == "TARGET":
        data["target"] = "quantum-9000"
        content = json.dumps(data)
    if content is not None:
        path.write_text(content)
    code, _, err = run_cli(capsys, "validate", str(path))
    one_line_error(code, err, *words)


# ---- reproducibility ----------------------------------------------------------------------


def test_same_seed_same_plan(capsys, tmp_path):
    outs = []
    for _ in range(2):
        code, out, _ = run_cli(capsys, "plan", "resnet_tiny", "--rules", "tvm", "--seed", "3", "--json")
        assert code == 0
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    # Weights change with the seed, the structure (fingerprint) and therefore the plan do not.
    code, out, _ = run_cli(capsys, "plan", "resnet_tiny", "--rules", "tvm", "--seed", "4", "--json")
    assert json.loads(out)["plan"] == outs[0]["plan"]


def test_same_store_same_numbers(capsys, measured):
    """The second identical `measure` is served from the store: identical reported numbers."""
    argv = ["measure", "cnn_plain", "--rules", "tvm", "--json", "--store", str(measured["store"]), *MEASURE]
    code, out, _ = run_cli(capsys, *argv)
    again = json.loads(out)
    first = measured["data"]
    assert code == 0 and again["cached"] and not first["cached"]
    for key in ("plan_hash", "latency_ms", "spread_ms", "times_ms", "repeats", "num_kernels", "target", "fingerprint"):
        assert again[key] == first[key], key
