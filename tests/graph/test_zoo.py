"""Tests of the built-in model zoo (``fusion_rl.graph.zoo``).

Fast tier: registry contents, errors, determinism and the export cache.
Slow tier (``-m slow``): every zoo model imports into TVM Relax, legalizes into ``call_tir``
bindings only, compiles, and matches ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_rl.errors import ConfigError, FusionRLError, UnknownModelError
from fusion_rl.graph import zoo

REQUIRED_FAMILIES = {
    "cnn", "residual_cnn", "mobile_cnn", "transformer", "decoder", "vit", "mixer", "hf"
}


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "zoo"


# ------------------------------------------------------------------------------------------
# Fast tier
# ------------------------------------------------------------------------------------------


def test_zoo_lists_enough_models_with_required_coverage() -> None:
    entries = zoo.list_models("tiny")
    assert len(entries) >= 12
    assert [e.name for e in entries] == list(zoo.ZOO)
    assert zoo.list_models() == entries + zoo.list_models("bench")
    assert REQUIRED_FAMILIES <= {e.family for e in entries}
    hf = [e for e in entries if e.source == "transformers"]
    assert len(hf) >= 2
    for e in entries:
        assert e.source in {"torch", "transformers"}
        assert e.description and "\n" not in e.description
        assert "batch" in e.defaults
        assert zoo.get_entry(e.name) is e


def test_mobile_family_uses_depthwise_convs() -> None:
    for entry in zoo.list_models("tiny"):
        if entry.family != "mobile_cnn":
            continue
        model, _ = zoo.build_torch(entry.name)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert any(c.groups > 1 and c.groups == c.in_channels for c in convs), entry.name


def test_unknown_model_names_valid_names() -> None:
    with pytest.raises(UnknownModelError, match="resnet_tiny"):
        zoo.get_entry("resnet_huge")
    with pytest.raises(UnknownModelError):
        zoo.build_torch("no_such_model")
    assert issubclass(UnknownModelError, FusionRLError)


def test_unknown_size_kwarg_is_config_error(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="widths"):
        zoo.build_torch("resnet_tiny", depth=50)
    with pytest.raises(ConfigError):
        zoo.export_onnx("mlp_tiny", cache_dir=cache_dir, hiddenn=3)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("transformer_encoder", {"hidden": 30, "heads": 4}),  # heads must divide hidden
        ("vit_tiny", {"image_size": 30}),  # patch must divide the image
        ("resnet_tiny", {"widths": (0, 16)}),  # zero channels
        ("mlp_tiny", {"hidden": -1}),
        ("mlp_tiny", {"hidden": 8.5}),
        ("cnn_plain", {"channels": 16}),  # a sequence is expected
    ],
)
def test_bad_sizes_are_config_error(name: str, sizes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        zoo.build_torch(name, **sizes)


def test_equal_sizes_share_a_cache_entry(cache_dir: Path) -> None:
    a = zoo.export_onnx("resnet_tiny", cache_dir=cache_dir, widths=[16, 32])
    b = zoo.export_onnx("resnet_tiny", cache_dir=cache_dir, widths=(np.int64(16), 32))
    assert a == b == zoo.export_onnx("resnet_tiny", cache_dir=cache_dir)


def test_build_torch_is_deterministic_and_seeded() -> None:
    m1, x1 = zoo.build_torch("se_cnn", seed=3)
    m2, x2 = zoo.build_torch("se_cnn", seed=3)
    m3, x3 = zoo.build_torch("se_cnn", seed=4)
    assert not m1.training
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(x1[0], x2[0])
    assert not torch.equal(x1[0], x3[0])
    with torch.no_grad():
        assert torch.equal(m1(*x1), m2(*x2))


def test_build_torch_does_not_disturb_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build_torch("mlp_tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_sizes_override_defaults() -> None:
    model, (x,) = zoo.build_torch("mlp_tiny", in_features=16, hidden=8, num_classes=3)
    assert x.shape == (1, 16)
    with torch.no_grad():
        assert model(x).shape == (1, 3)


def test_example_inputs_keyed_by_onnx_names() -> None:
    ids = zoo.example_inputs("gpt_tiny")
    assert list(ids) == ["input_ids"]
    assert ids["input_ids"].dtype == np.int64
    assert ids["input_ids"].max() < zoo.get_entry("gpt_tiny").defaults["vocab"]


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FUSION_RL_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / "zoo"
    monkeypatch.delenv("FUSION_RL_CACHE")
    assert zoo.default_cache_dir() == Path.home() / ".cache" / "fusion_rl" / "zoo"


def test_export_onnx_caches_and_keys_on_sizes_and_seed(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    path = zoo.export_onnx("mlp_tiny", cache_dir=cache_dir)
    assert path.is_file() and path.parent == cache_dir
    onnx.checker.check_model(onnx.load(path))
    mtime = path.stat().st_mtime_ns

    # A cache hit must not even build the model.
    def _fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("export_onnx re-exported a cached model")

    monkeypatch.setattr(zoo, "build_torch", _fail)
    again = zoo.export_onnx("mlp_tiny", cache_dir=cache_dir)
    assert again == path and path.stat().st_mtime_ns == mtime
    # Passing a default explicitly is the same key.
    assert zoo.export_onnx("mlp_tiny", cache_dir=cache_dir, hidden=128) == path
    monkeypatch.undo()

    other_seed = zoo.export_onnx("mlp_tiny", cache_dir=cache_dir, seed=1)
    other_size = zoo.export_onnx("mlp_tiny", cache_dir=cache_dir, hidden=32)
    assert len({path, other_seed, other_size}) == 3
    # No temp files are left behind.
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".onnx"] * 3


def test_cache_key_hashes_the_whole_graph_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # Builders use layers from sibling modules: an edit anywhere in fusion_rl/graph must
    # invalidate cached exports, not only an edit of the catalogue.
    zoo._zoo_source_digest.cache_clear()
    before = zoo._zoo_source_digest()
    real = Path.read_bytes

    def edited(self: Path) -> bytes:
        return real(self) + (b"# edited" if self.name == "opgraph.py" else b"")

    monkeypatch.setattr(Path, "read_bytes", edited)
    zoo._zoo_source_digest.cache_clear()
    try:
        assert zoo._zoo_source_digest() != before
    finally:
        monkeypatch.undo()
        zoo._zoo_source_digest.cache_clear()
    assert zoo._zoo_source_digest() == before


def test_export_onnx_failure_leaves_no_partial_file(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def _boom(model: object, args: object, f: str, **kwargs: object) -> None:
        Path(f).write_bytes(b"truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", _boom)
    with pytest.raises(KeyboardInterrupt):
        zoo.export_onnx("mlp_tiny", cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []


def test_export_onnx_uses_env_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FUSION_RL_CACHE", str(tmp_path))
    path = zoo.export_onnx("mlp_tiny", hidden=16)
    assert path.parent == tmp_path / "zoo"


# ------------------------------------------------------------------------------------------
# The bench suite: checked on tiny instances (size overrides), never built at default sizes
# ------------------------------------------------------------------------------------------

#: Size overrides that make each bench entry a tiny model of the same architecture.
TINY_BENCH: dict[str, dict[str, object]] = {
    "bench_resnet18": {"image_size": 32, "embedding_size": 8, "hidden_sizes": (8, 16), "depths": (1, 1)},
    "bench_mobilenet_v2": {"image_size": 32, "width_percent": 35},
    "bench_efficientnet_b0": {"image_size": 32, "width_percent": 25, "depth_percent": 25},
    "bench_regnetx": {"image_size": 32, "embedding_size": 8, "hidden_sizes": (8, 16), "depths": (1, 1),
                      "groups_width": 4},
    "bench_convnext": {"image_size": 32, "hidden_sizes": (8, 16), "depths": (1, 1)},
    "bench_bert": {"seq": 16, "vocab": 64, "hidden": 32, "heads": 4, "ff": 64, "layers": 1},
    "bench_gpt2": {"seq": 16, "vocab": 64, "hidden": 32, "heads": 4, "layers": 1},
    "bench_llama": {"seq": 16, "vocab": 64, "hidden": 32, "heads": 4, "kv_heads": 2, "ff": 64, "layers": 1},
    "bench_vit": {"image_size": 32, "patch": 8, "hidden": 32, "heads": 4, "ff": 64, "layers": 1},
}
CNN_FAMILIES = {"residual_cnn", "mobile_cnn", "efficientnet", "grouped_cnn", "convnext"}
TRANSFORMER_FAMILIES = {"transformer", "decoder", "vit"}


def test_bench_suite_is_separate_and_at_deployment_sizes() -> None:
    bench = zoo.list_models("bench")
    assert len(bench) >= 8 and set(TINY_BENCH) == {e.name for e in bench}
    for e in bench:
        assert e.name.startswith("bench_") and e.suite == "bench"
        assert e.name in zoo.MODELS and e.name not in zoo.ZOO and zoo.get_entry(e.name) is e
        assert e.defaults["batch"] == 1
    cnns = [e for e in bench if e.family in CNN_FAMILIES]
    assert {e.family for e in cnns} == CNN_FAMILIES
    assert all(e.defaults["image_size"] == 224 for e in cnns)
    texts = [e for e in bench if e.family in TRANSFORMER_FAMILIES]
    assert {e.family for e in texts} == TRANSFORMER_FAMILIES
    for e in texts:
        if e.family == "vit":
            assert (e.defaults["image_size"], e.defaults["patch"]) == (224, 16)
        else:
            assert e.defaults["seq"] == 128 and e.defaults["hidden"] == 768
    assert all(e.suite == "tiny" and not e.name.startswith("bench_") for e in zoo.ZOO.values())
    with pytest.raises(ConfigError, match="suite"):
        zoo.list_models("huge")


@pytest.mark.parametrize("name", sorted(TINY_BENCH))
def test_bench_builders_make_tiny_instances(name: str) -> None:
    model, inputs = zoo.build_torch(name, **TINY_BENCH[name])
    assert sum(p.numel() for p in model.parameters()) < 500_000  # really a tiny instance
    with torch.no_grad():
        out = model(*inputs)
    assert torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if zoo.get_entry(name).family == "grouped_cnn":
        assert any(1 < c.groups < c.in_channels for c in convs)
    if zoo.get_entry(name).family in ("mobile_cnn", "efficientnet", "convnext"):
        assert any(c.groups == c.in_channels > 1 for c in convs)


def test_flops_count_multiply_accumulates_twice() -> None:
    # mlp_tiny: 64 -> 128 -> 128 -> 128 -> 10, batch 1.
    assert zoo.flops("mlp_tiny") == 2 * (64 * 128 + 128 * 128 + 128 * 128 + 128 * 10)
    assert zoo.flops("mlp_tiny", hidden=32) == 2 * (64 * 32 + 32 * 32 + 32 * 32 + 32 * 10)
    # A 1-layer encoder of width h, ffn f, s tokens: QKV + out projections, two FFN matmuls and
    # the two attention matmuls (embeddings are gathers, not counted).
    s, h, f = 16, 32, 64
    expected = 2 * (s * h * 3 * h + s * h * h + 2 * s * h * f + 2 * s * s * h)
    assert zoo.flops("bench_bert", **TINY_BENCH["bench_bert"]) == expected


def test_bench_flops_match_the_published_architectures() -> None:
    # Counted on torch's meta device: shapes only, no weights are made.
    names = ("bench_resnet18", "bench_mobilenet_v2", "bench_efficientnet_b0")
    gmacs = {name: zoo.flops(name) / 2e9 for name in names}
    assert gmacs["bench_resnet18"] == pytest.approx(1.81, rel=0.01)  # ResNet-18 at 224x224
    assert gmacs["bench_mobilenet_v2"] == pytest.approx(0.30, rel=0.01)  # MobileNetV2 1.0
    assert gmacs["bench_efficientnet_b0"] == pytest.approx(0.39, rel=0.02)  # EfficientNet-B0


# ------------------------------------------------------------------------------------------
# Slow tier: TVM import, legalization and numerics for every model
# ------------------------------------------------------------------------------------------


def _legalized_module(path: Path):  # -> tvm.IRModule
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(path), keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
        ]
    )(mod)


def _binding_kinds(mod) -> tuple[int, list[str], int]:
    """(call_tir count, offending bindings, trivial var aliases) of main's dataflow block."""
    import tvm
    from tvm import relax

    blocks = mod["main"].body.blocks
    assert len(blocks) == 1
    n_call_tir, aliases, bad = 0, 0, []
    for binding in blocks[0].bindings:
        value = binding.value
        if (
            isinstance(value, relax.Call)
            and isinstance(value.op, tvm.ir.Op)
            and value.op.name == "relax.call_tir"
        ):
            n_call_tir += 1
        elif isinstance(value, (relax.TupleGetItem, relax.Tuple)):
            pass
        elif isinstance(value, relax.Var):
            # The ONNX frontend binds the graph output as `gv = lvN` when the last converter
            # (e.g. LayerNormalization) emits its own binding; CanonicalizeBindings removes it.
            aliases += 1
        else:
            bad.append(str(binding.var))
    return n_call_tir, bad, aliases


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_model_imports_legalizes_and_matches_onnxruntime(name: str, cache_dir: Path, target) -> None:
    import onnxruntime as ort
    import tvm
    from tvm import relax

    path = zoo.export_onnx(name, cache_dir=cache_dir)
    inputs = zoo.example_inputs(name)

    mod = _legalized_module(path)
    n_call_tir, bad, aliases = _binding_kinds(mod)
    assert not bad, f"non-call_tir bindings after legalization: {bad}"
    assert 0 < n_call_tir <= 120, n_call_tir
    assert aliases <= 1
    if aliases:
        canon = relax.transform.CanonicalizeBindings()(mod)
        assert _binding_kinds(canon)[2] == 0

    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()])
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # The torch module is the source of truth for both; check it agrees with the export too.
    model, torch_inputs = zoo.build_torch(name)
    with torch.no_grad():
        ref = model(*torch_inputs).numpy()
    np.testing.assert_allclose(expected, ref, rtol=1e-4, atol=1e-4)



@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_BENCH))
def test_bench_tiny_instance_imports_and_matches_onnxruntime(name: str, cache_dir: Path, target) -> None:
    """The bench builders' graphs (at tiny sizes) import, legalize, compile and match ORT on the
    original export, through the shape-folded copy where the entry needs one."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from fusion_rl.graph import importer

    sizes = TINY_BENCH[name]
    path = zoo.export_onnx(name, cache_dir=cache_dir, **sizes)
    tvm_path = zoo.import_path(name, cache_dir=cache_dir, **sizes)
    assert (tvm_path != path) == zoo.get_entry(name).fold_shapes
    assert zoo.import_path(name, cache_dir=cache_dir, **sizes) == tvm_path  # cached
    inputs = zoo.example_inputs(name, **sizes)

    mod = importer.from_onnx(importer.load_onnx(tvm_path))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()])
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    model, torch_inputs = zoo.build_torch(name, **sizes)
    with torch.no_grad():
        np.testing.assert_allclose(expected, model(*torch_inputs).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tf_same_padding_imports_only_after_folding(cache_dir: Path) -> None:
    from fusion_rl.errors import ModelImportError
    from fusion_rl.graph import importer

    sizes = TINY_BENCH["bench_mobilenet_v2"]
    path = zoo.export_onnx("bench_mobilenet_v2", cache_dir=cache_dir, **sizes)
    with pytest.raises(ModelImportError, match="[Dd]ynamic"):
        importer.from_onnx(importer.load_onnx(path))
    folded = importer.load_onnx(zoo.import_path("bench_mobilenet_v2", cache_dir=cache_dir, **sizes))
    assert not {"Shape", "Pad"} & {n.op_type for n in folded.graph.node}
