"""Real exports import: the corpus (``fusion_rl.graph.corpus``) through both torch exporters.

Every corpus architecture, exported by the TorchScript and the dynamo exporter, imports the way a
user's ONNX file does (``load_onnx_model``), and the plan of every rule set compiles and matches
ONNX Runtime on the exported file. Exports are cached under ``$FUSION_RL_CACHE/corpus``, and
each (architecture, exporter) is imported once per session and shared by the tests below.

All of it but the unit tests is marked ``corpus``: ``make test-corpus`` runs it, ``make test``
does not (the exports alone take minutes). Tiers: importing every export is ``integration``; compiling and verifying every rule set of
every export (about 60 builds) and the 224x224 exports are ``slow``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fusion_rl.cli import main
from fusion_rl.errors import ModelImportError, UnsupportedOperatorError
from fusion_rl.graph import corpus, importer, zoo

CASES = [(name, exporter) for name in corpus.CORPUS for exporter in corpus.EXPORTERS]
IDS = [f"{name}-{exporter}" for name, exporter in CASES]
#: What issue 13 asks the corpus to cover.
REQUIRED = {"tf_padding", "depthwise_conv", "grouped_conv", "squeeze_excite", "rms_norm", "rope",
            "gqa", "causal_mask"}

_LOADED: dict = {}


def loaded(name: str, exporter: str, preset: str = "tiny"):
    """The imported corpus model, once per session (an import costs seconds)."""
    key = (name, exporter, preset)
    if key not in _LOADED:
        _LOADED[key] = corpus.load(name, exporter, preset)
    return _LOADED[key]


@pytest.mark.unit
def test_corpus_covers_the_required_features() -> None:
    assert len(corpus.CORPUS) >= 12
    covered = {c for e in corpus.CORPUS.values() for c in e.covers}
    assert REQUIRED <= covered, REQUIRED - covered
    # Test inputs, not models to train on: none is in the zoo's listing.
    assert not {e.entry.name for e in corpus.CORPUS.values()} & set(zoo.MODELS)
    assert {e.name for e in corpus.CORPUS.values() if e.real} >= {"mobilenet_v2", "efficientnet"}


@pytest.mark.integration
@pytest.mark.corpus
@pytest.mark.parametrize(("name", "exporter"), CASES, ids=IDS)
def test_corpus_export_imports(name: str, exporter: str) -> None:
    model = loaded(name, exporter)
    assert len(model.graph) > 0 and model.onnx_model is not None
    # The reference is the exported file, run by ONNX Runtime, and it is the torch model.
    from fusion_rl.compiler.verify import reference_outputs

    (expected,), source = reference_outputs(model)
    assert source == "onnxruntime"
    module, inputs = zoo.build_entry(corpus.get(name).entry, corpus.get(name).sizes("tiny"))
    with torch.no_grad():
        np.testing.assert_allclose(expected, module(*inputs).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.corpus
def test_tf_padding_export_imports_as_a_user_file() -> None:
    """The TorchScript export of TF "same" padding leaves constant subgraphs that TVM rejects as
    dynamic pads; imported as a user's file, it is folded first (the file stays the reference)."""
    path = corpus.export("mobilenet_v2", "torchscript")
    raw = importer.load_onnx(path)
    assert importer.has_static_subgraphs(raw)
    with pytest.raises(ModelImportError, match="operator Pad: Dynamic pads"):
        importer.from_onnx(raw)
    model = loaded("mobilenet_v2", "torchscript")
    assert "Pad" in {n.op_type for n in model.onnx_model.graph.node}


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize(("name", "exporter"), CASES, ids=IDS)
def test_corpus_export_verifies_every_rule_set(name: str, exporter: str, target) -> None:
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.verify import VerifyReport, verify_rule_sets
    from fusion_rl.fusion.rules import RULE_SETS

    results = verify_rule_sets(loaded(name, exporter), target, make_schedule("naive"))
    assert set(results) == set(RULE_SETS)
    failed = {r: v for r, v in results.items() if not isinstance(v, VerifyReport) or not v.ok}
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("exporter", corpus.EXPORTERS)
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet"])
def test_real_size_exports_import_and_verify(name: str, exporter: str, target) -> None:
    """The published widths at 224x224 (issue 13's "done means"); TVM's own fusion only, as
    the tiny sizes check every rule set."""
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.verify import verify_rule_sets

    model = corpus.load(name, exporter, "real")
    assert model.inputs[0].shape == (1, 3, 224, 224)
    (report,) = verify_rule_sets(model, target, make_schedule("naive"), ["tvm"]).values()
    assert not isinstance(report, str) and report.ok, report


# ------------------------------------------------------------------------------------------
# What a user sees when an operator cannot import
# ------------------------------------------------------------------------------------------


def _pad_with_runtime_pads(path) -> None:
    """Pad whose pads are a graph input: TVM has a Pad converter, but not for dynamic pads."""
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("pads", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _det(path) -> None:
    """Det, a standard operator TVM's frontend has no converter for."""
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.unit
@pytest.mark.parametrize(("make", "words"), [
    (_pad_with_runtime_pads, ["operator Pad", "Dynamic pads are not supported"]),
    (_det, ["operator(s): Det", "no converter"]),
], ids=["converter-fails", "no-converter"])
def test_unsupported_op_is_one_line_naming_op_and_reason(make, words, tmp_path, capsys) -> None:
    path = tmp_path / "model.onnx"
    make(path)
    with pytest.raises((ModelImportError, UnsupportedOperatorError)) as info:
        importer.from_onnx(importer.load_onnx(path))
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)
    # On the CLI: exactly that line on stderr, exit 2, and nothing of TVM's on stdout.
    capsys.readouterr()
    assert main(["plan", str(path), "--rules", "tvm"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words[0] in lines[0], err
