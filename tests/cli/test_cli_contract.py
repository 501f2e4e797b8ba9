"""The CLI's contract, checked on the parser itself: help on every option, ``--json`` on every
command, one output spelling, the exit statuses 0/1/2/3, numbers checked in argparse, and a
README block that matches ``--help``. Measurements are scripted here (no TVM build)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT
from fusion_rl.cli import build_parser, main
from fusion_rl.cli.reference import current_block, readme_block

ROOT = REPO_ROOT
pytestmark = pytest.mark.unit  # no build, no worker: the measurer is scripted


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"fusion-rl": parser, **sub.choices}


def _visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.help != argparse.SUPPRESS]


# ---- help ----------------------------------------------------------------------------------------


def test_every_option_and_positional_has_help() -> None:
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in _subparsers().items()
               for a in _visible(p) if not (a.help or "").strip()]
    assert not missing, f"no help text: {missing}"


def test_help_shows_no_rst_markup() -> None:
    for name, p in _subparsers().items():
        texts = [p.description or "", *(a.help or "" for a in _visible(p))]
        for text in texts:
            assert "``" not in text and ":mod:`" not in text and ":func:`" not in text \
                and ":class:`" not in text, (name, text)


def test_every_command_takes_json_with_help() -> None:
    for name, p in _subparsers().items():
        if name == "fusion-rl":
            continue
        json_opts = [a for a in p._actions if "--json" in a.option_strings]
        assert json_opts and json_opts[0].help, f"{name} has no documented --json"


# ---- one output spelling -------------------------------------------------------------------------


WRITERS = {"plan", "compare", "evaluate", "export", "compile", "run", "search", "validate"}


def test_every_command_that_writes_a_file_spells_it_o_output() -> None:
    subs = _subparsers()
    for name in WRITERS:
        shown = [a for a in _visible(subs[name]) if a.dest == "output"]
        assert len(shown) == 1 and shown[0].option_strings == ["-o", "--output"], name
    for name, p in subs.items():  # no other visible spelling anywhere
        for a in _visible(p):
            assert not set(a.option_strings) & {"--out", "--save-bundle", "--save"}, (name, a.option_strings)


@pytest.mark.parametrize("argv, old", [
    (["compare", "mlp_tiny", "--out", "report"], "--out"),
    (["validate", "r.json", "--save-bundle", "report"], "--save-bundle"),
])
def test_old_output_spellings_still_work_with_one_warning(capsys, argv, old) -> None:
    args = build_parser().parse_args(argv)
    assert args.output == Path("report")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {old} is deprecated; use -o/--output"]


# ---- exit statuses ---------------------------------------------------------------------------------


def _scripted_measure(monkeypatch, status: str, median_ms: float | None = None) -> None:
    from fusion_rl.compiler.measure import Measurer

    def measure(self, model, plan, per_kernel=False, fault=None):
        self.stats.misses += 1
        ok = status == "ok"
        return SimpleNamespace(status=status, median_ms=median_ms if ok else None,
                               spread_ms=0.01 if ok else None, repeats=3 if ok else 0,
                               times_ms=[median_ms] * 3 if ok else [], num_kernels=None,
                               error=None if ok else f"scripted {status}", kernel_schedules={},
                               kernel_times_ms=None, created=0.0)

    monkeypatch.setattr(Measurer, "measure", measure)


def test_exit_0_ok(capsys) -> None:
    assert main(["zoo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_exit_1_wrong_output(monkeypatch, capsys) -> None:
    _scripted_measure(monkeypatch, "wrong_output")
    assert main(["measure", "mlp_tiny", "--rules", "tvm", "--no-store"]) == 1
    assert "wrong_output" in capsys.readouterr().err


def test_exit_1_validate_does_not_hold(monkeypatch, tmp_path, capsys) -> None:
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.fusion.rules import make_plan
    from fusion_rl.graph.model import load_model

    model = load_model("mlp_tiny")
    with Measurer("host", "rules") as m:
        target, budget = m.spec.key, m.provider.budget
    result = {"model": "mlp_tiny", "fingerprint": model.fingerprint, "plan": "tvm",
              "plan_hash": make_plan("tvm", model.mod, model.graph).hash, "target": target,
              "schedule": "rules", "budget": budget, "status": "ok", "latency_ms": 1.0,
              "spread_ms": 0.01, "repeats": 3}
    (tmp_path / "r.json").write_text(json.dumps(result))
    _scripted_measure(monkeypatch, "ok", median_ms=10.0)  # ten times slower now
    assert main(["validate", str(tmp_path / "r.json")]) == 1
    assert capsys.readouterr().out.startswith("DOES NOT HOLD")


def test_exit_2_bad_input(capsys) -> None:
    assert main(["plan", "no_such_model", "--rules", "tvm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_exit_3_internal_error(monkeypatch, capsys) -> None:
    import fusion_rl.cli.core as core

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(core, "cmd_zoo", broken)
    assert main(["zoo"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("internal error: RuntimeError: a bug")


def test_exit_3_measurement_that_crashed(monkeypatch, capsys) -> None:
    _scripted_measure(monkeypatch, "crashed")
    assert main(["measure", "mlp_tiny", "--rules", "tvm", "--no-store"]) == 3
    assert "crashed" in capsys.readouterr().err


# ---- numbers are checked in argparse -------------------------------------------------------------


@pytest.mark.parametrize("argv, option", [
    (["measure", "mlp_tiny", "--rules", "tvm", "--min-repeat-ms", "-5"], "--min-repeat-ms"),
    (["measure", "mlp_tiny", "--rules", "tvm", "--min-repeat-ms", "0"], "--min-repeat-ms"),
    (["measure", "mlp_tiny", "--rules", "tvm", "--min-repeat-ms", "70000"], "--min-repeat-ms"),
    (["measure", "mlp_tiny", "--rules", "tvm", "--repeat", "5000"], "--repeat"),
    (["measure", "mlp_tiny", "--rules", "tvm", "--timeout", "nan"], "--timeout"),
    (["measure", "mlp_tiny", "--rules", "tvm", "--seed", "-1"], "--seed"),
    (["compare", "mlp_tiny", "--min-repeat-ms", "-5"], "--min-repeat-ms"),
    (["validate", "r.json", "--min-repeat-ms", "-5"], "--min-repeat-ms"),
    (["search", "mlp_tiny", "--budget", "0"], "--budget"),
    (["compile", "mlp_tiny", "--rules", "tvm", "-o", "m.so", "--trials", "0"], "--trials"),
    (["run", "m.so", "--seed", "-3"], "--seed"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--total-timesteps", "0"], "--total-timesteps"),
])
def test_bad_numbers_fail_in_argparse_with_one_error_line(capsys, argv, option) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"argument {option}" in err[0], err
    assert "TimingProtocol" not in err[0]


# ---- the README --------------------------------------------------------------------------------------


def test_readme_cli_block_matches_help() -> None:
    """The README's CLI block is generated from the parser; regenerate it with
    ``python scripts/readme_cli.py`` after changing a command."""
    readme = (ROOT / "README.md").read_text()
    assert current_block(readme) == readme_block()


def test_readme_block_lists_every_command_and_exit_status() -> None:
    block = readme_block()
    for name in _subparsers():
        if name != "fusion-rl":
            assert f"fusion-rl {name} " in block, name
    for code in range(4):
        assert f"- `{code}`: " in block
