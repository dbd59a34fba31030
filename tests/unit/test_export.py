"""ptqbench export-model: recorded runs on a tiny Llama written as compressed-tensors checkpoints, reloaded
with transformers + compressed-tensors, and compared bit for bit with the model the run evaluated."""
import json
import shutil

import pytest
import torch

pytest.importorskip("compressed_tensors")

from harness.cli import main  # noqa: E402
from harness.driver import run_matrix  # noqa: E402
from harness.errors import PtqbenchError  # noqa: E402
from harness.export import export_model, read_metadata  # noqa: E402
from harness.export.compressed import UnsupportedExport, load_dequantized, weight_args  # noqa: E402
from harness.export.factor import FactorError, factor_nv, factor_weight  # noqa: E402
from harness.export.rebuild import RebuildError, rebuild  # noqa: E402
from harness.formats import get_format, quantize  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.store import Store  # noqa: E402

SPEC = """
name: export
models: [tiny-llama]
methods: [rtn, {name: gptq, params: {block_size: 32}}, quarot]
schemes:
  - w4a16
  - {name: w4g32_asym, weight: {format: int4_asym_g32}}
  - w8a8
  - {name: fp8_w, weight: {format: fp8_e4m3}}
  - mxfp4_w
  - {name: nvfp4_w, weight: {format: nvfp4}}
  - mxfp4
tasks: [wikitext2]
ppl: {seqlen: 32, max_windows: 1}
calib: {corpus: c4, n: 4, seqlen: 32}
exclude:
  - {method: gptq, scheme: [w8a8, fp8_w, nvfp4_w, mxfp4]}
  - {method: quarot, scheme: [w4g32_asym, w8a8, fp8_w, mxfp4_w, nvfp4_w, mxfp4]}
"""
EXACT = [("rtn", s) for s in ("w4a16", "w4g32_asym", "w8a8", "fp8_w", "mxfp4_w")] + [
    ("gptq", s) for s in ("w4a16", "w4g32_asym", "mxfp4_w")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "spec.yaml").write_text(SPEC)
    store = Store(root / "results")
    summary = run_matrix(load_spec(root / "spec.yaml").cells(), store)
    assert summary.failed == 0, summary.failures
    by_cell = {(r["method"], r["scheme"]): r["run_id"] for r in store.records()}
    return root, by_cell


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7, 3, 2, 11, 42]])


@pytest.mark.parametrize("method,scheme", EXACT)
def test_exported_weights_reload_bit_identical(runs, tmp_path, method, scheme):
    root, by_cell = runs
    run_id = by_cell[(method, scheme)]
    meta = export_model(run_id, tmp_path / "ckpt", root / "results")
    check = meta["verification"]
    assert check["bit_identical"] == check["tensors_compared"] == 21 and check["max_abs_diff"] == 0
    # independently of the exporter's own check: the evaluated model, rebuilt, against the reloaded checkpoint
    store = Store(root / "results")
    built = rebuild(store.get(run_id), store)
    loaded = load_dequantized(tmp_path / "ckpt")
    evaluated = {n.replace(".linear.", "."): p for n, p in built.model.named_parameters()}
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, evaluated[name]), name
    qconfig = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["ignore"] == ["lm_head"]
    group = qconfig["config_groups"]["group_0"]
    if scheme == "w8a8":  # activations: vLLM's dynamic per-token INT8; the dense reload runs none
        assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    else:
        assert group["input_activations"] is None
        assert torch.equal(_logits(loaded, IDS), _logits(built.model, IDS))
    assert meta["calibration"] == ("cache" if method == "gptq" else "none")


def test_nvfp4_is_refused_unless_inexact_is_allowed(runs, tmp_path):
    root, by_cell = runs
    with pytest.raises(UnsupportedExport) as err:
        export_model(by_cell[("rtn", "nvfp4_w")], tmp_path / "a", root / "results")
    assert "--allow-inexact" in str(err.value) and "\n" not in str(err.value)
    meta = export_model(by_cell[("rtn", "nvfp4_w")], tmp_path / "b", root / "results", allow_inexact=True)
    check = meta["verification"]
    assert check["bit_identical"] == 7 and check["mismatched"]  # norms + embeddings exact, the 14 linears not
    assert meta["weights"]["inexact_blocks"] > 0
    store = Store(root / "results")
    evaluated = {n.replace(".linear.", "."): p for n, p in rebuild(store.get(by_cell[("rtn", "nvfp4_w")]), store)
                 .model.named_parameters()}
    for name, param in load_dequantized(tmp_path / "b").named_parameters():
        # compressed-tensors' NVFP4 dequantizes to bf16: within bf16's rounding of the evaluated weight
        assert torch.allclose(param, evaluated[name], rtol=2**-8, atol=0), name


def test_online_transforms_refused_in_one_line_and_fake_works(runs, tmp_path):
    root, by_cell = runs
    run_id = by_cell[("quarot", "w4a16")]
    with pytest.raises(UnsupportedExport) as err:
        export_model(run_id, tmp_path / "ct", root / "results")
    message = str(err.value)
    assert "online input transforms" in message and "R3" in message and "--fake" in message and "\n" not in message
    meta = export_model(run_id, tmp_path / "fake", root / "results", fake=True)
    assert meta["folded_online_transforms"] and any("R3" in d for d in meta["dropped"])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32)
    assert not hasattr(loaded.config, "quantization_config")
    store = Store(root / "results")
    built = rebuild(store.get(run_id), store)
    expected, got = _logits(built.model, IDS), _logits(loaded, IDS)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_activation_formats_without_a_compressed_form_are_refused(runs, tmp_path):
    root, by_cell = runs
    with pytest.raises(UnsupportedExport, match="activation format mxfp4"):
        export_model(by_cell[("rtn", "mxfp4")], tmp_path / "x", root / "results")
    meta = export_model(by_cell[("rtn", "mxfp4")], tmp_path / "fake", root / "results", fake=True)
    assert meta["dropped"] == ["activation quantization (mxfp4)"]


def test_metadata_round_trips_and_traces_back_to_the_record(runs, tmp_path):
    root, by_cell = runs
    run_id = by_cell[("gptq", "w4a16")]
    meta = export_model(run_id, tmp_path / "ckpt", root / "results")
    assert read_metadata(tmp_path / "ckpt") == json.loads(json.dumps(meta, default=str))
    record = Store(root / "results").get(run_id)
    saved = read_metadata(tmp_path / "ckpt")
    assert saved["run_id"] == run_id and saved["record"]["metrics"] == record["metrics"]
    assert saved["record"]["method_params"] == record["method_params"] and saved["code_matches_record"] is True
    assert saved["versions"]["compressed-tensors"] and saved["weights"] == {"format": ["int4"], "linears": 14,
                                                                            "inexact_blocks": 0}


def test_changed_code_and_bad_targets_are_refused(runs, tmp_path):
    root, by_cell = runs
    copy = tmp_path / "results"
    shutil.copytree(root / "results", copy)
    run_id = by_cell[("rtn", "w4a16")]
    path = copy / "runs" / f"{run_id}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "code": "0" * 16}))
    with pytest.raises(RebuildError, match="--allow-code-change"):
        export_model(run_id, tmp_path / "a", copy)
    assert export_model(run_id, tmp_path / "b", copy, allow_code_change=True)["code_matches_record"] is False
    with pytest.raises(PtqbenchError, match="not empty"):
        export_model(run_id, tmp_path / "b", copy, allow_code_change=True)
    with pytest.raises(PtqbenchError, match="gguf"):
        export_model(run_id, tmp_path / "c", copy, fmt="gguf")


def test_a_failed_export_leaves_no_checkpoint(runs, tmp_path, monkeypatch):
    import harness.export.compressed as compressed

    def broken(weight, fmt, name="weight"):
        raise FactorError(f"{name}: broken on purpose")

    root, by_cell = runs
    monkeypatch.setattr(compressed, "factor_weight", broken)
    with pytest.raises(FactorError, match="on purpose"):
        export_model(by_cell[("rtn", "w4a16")], tmp_path / "ckpt", root / "results")
    assert list(tmp_path.iterdir()) == []


def test_cli(runs, tmp_path, capsys):
    root, by_cell = runs
    assert main(["export-model", by_cell[("rtn", "mxfp4_w")][:8], str(tmp_path / "ok"),
                 "--results-dir", str(root / "results")]) == 0
    assert "21/21 tensors bit-identical" in capsys.readouterr().out
    assert main(["export-model", by_cell[("quarot", "w4a16")], str(tmp_path / "no"),
                 "--results-dir", str(root / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqbench: error: cannot export run") and "\n" not in err


@pytest.mark.parametrize("name,overrides", [
    ("int4", {}), ("int8", {}), ("int4_g32", {"clip_ratio": 0.9}), ("int4_asym_g128", {}), ("int3_asym_g64", {}),
    ("int8_tensor", {}), ("fp8_e4m3", {}), ("mxfp4", {}), ("mxfp4", {"scale_rounding": "ceil"}),
    ("mxfp4", {"scale_rounding": "rceil"}), ("mxfp8_e4m3", {}), ("mxint8", {})])
def test_factoring_gives_back_the_fake_quantized_weight_exactly(name, overrides):
    fmt = get_format(name, **overrides)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(64, 256, generator=g))
    w[3] = 0  # an all-zero row / groups
    w_hat = quantize(w, fmt)
    factored = factor_weight(w_hat, fmt)
    assert torch.equal(factored.dequantize(), w_hat)
    with pytest.raises(FactorError, match="not codes x scales"):
        factor_weight(w, fmt)  # a weight that was never quantized


def test_nv_factoring_keeps_codes_and_block_codes():
    fmt = get_format("nvfp4")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(64, 256, generator=g))
    w_hat = quantize(w, fmt)
    factored, inexact = factor_nv(w_hat, fmt)
    code = factored.block_code
    assert torch.equal(code, code.to(torch.float8_e4m3fn).float()) and code.max() == 448  # the largest block
    served = factored.dequantize()  # code / global_scale, compressed-tensors' convention
    differs = (served != w_hat).reshape(64, -1, 16).any(-1)
    assert 0 < inexact == int(differs.sum()) < code.numel()
    assert torch.allclose(served, w_hat, rtol=2**-22, atol=0)  # one fp32 rounding of the block scale


def test_formats_without_a_compressed_tensors_scheme_say_why():
    with pytest.raises(UnsupportedExport, match="floor43"):
        weight_args(get_format("mxfp4", scale_rounding="floor43"))
    for name in ("nvint4", "mxfp6_e2m3", "fp8_e5m2", "mxint8"):
        with pytest.raises(UnsupportedExport, match=name):
            weight_args(get_format(name))


GEMMA_SPEC = """
name: export_gemma
models: [tiny-gemma3]
methods: [rtn, smoothquant]
schemes: [mxfp4_w, w8a8]
tasks: [wikitext2]
ppl: {seqlen: 32, max_windows: 1}
calib: {corpus: c4, n: 4, seqlen: 32}
exclude:
  - {method: rtn, scheme: w8a8}
  - {method: smoothquant, scheme: mxfp4_w}
"""


def test_gemma_exports_and_its_folded_norms_go_back_to_the_models_own_class(tmp_path):
    (tmp_path / "spec.yaml").write_text(GEMMA_SPEC)
    store = Store(tmp_path / "results")
    run_matrix(load_spec(tmp_path / "spec.yaml").cells(), store)  # random tiny Gemma: ppl > 1e4, recorded diverged
    by_method = {r["method"]: r for r in store.records()}
    meta = export_model(by_method["rtn"]["run_id"], tmp_path / "rtn", tmp_path / "results")
    # the adapter holds every Gemma norm as UnitOffsetRMSNorm (2 layers x 4 + q/k norms + the final norm)
    assert meta["verification"]["max_abs_diff"] == 0 and meta["native_modules_restored"] == 13
    assert meta["norm_gain_max_rel_change"] == 0
    built = rebuild(by_method["rtn"], store)
    assert torch.equal(_logits(load_dequantized(tmp_path / "rtn"), IDS), _logits(built.model, IDS))
    # SmoothQuant folds its scales into Gemma's (1 + w) norms, held as UnitOffsetRMSNorm; some gains are small
    run_id = by_method["smoothquant"]["run_id"]
    with pytest.raises(PtqbenchError, match="--allow-inexact"):
        export_model(run_id, tmp_path / "sq", tmp_path / "results")
    meta = export_model(run_id, tmp_path / "sq2", tmp_path / "results", allow_inexact=True)
    assert meta["native_modules_restored"] > 0 and 0 < meta["norm_gain_max_rel_change"] < 1e-5
    loaded = load_dequantized(tmp_path / "sq2")
    norm = type(loaded.model.layers[0].input_layernorm).__name__
    assert norm == "Gemma3RMSNorm"
