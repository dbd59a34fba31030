"""The built-in methods fp / rtn / gptq on a tiny Llama, with the real quant, GPTQ and eval layers."""
import pytest
import torch

from harness.data import calibration_windows
from harness.driver import run_matrix
from harness.formats import quantize
from harness.method import CalibConfig, CalibContext, State
from harness.models import load_model
from harness.quant import QuantLinear, get_scheme
from harness.registry import get_method
from harness.spec import load_spec
from harness.store import Store


@pytest.fixture(scope="module")
def data():
    _, tok, _ = load_model("tiny-llama")
    return calibration_windows(tok, "c4", 8, 64, 0), calibration_windows(tok, "wikitext2", 4, 64, 1)


def run_method(name, scheme_name, calib, params=None):
    model, tok, adapter = load_model("tiny-llama")
    method = get_method(name)(params)
    scheme = get_scheme(scheme_name)
    ctx = CalibContext(model, tok, adapter, scheme, CalibConfig("c4", 8, 64), seed=0)
    ctx._inputs = calib
    state = method.calibrate(ctx)
    return method.apply(model, adapter, state, scheme), state


def decoder_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}


def test_fp_is_the_loaded_model(data):
    calib, test = data
    fresh, _, _ = load_model("tiny-llama")
    model, state = run_method("fp", "w4a4", calib)
    assert state == State() and not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(model(test).logits, fresh(test).logits)
    cls = get_method("fp")
    assert not cls.uses_scheme and not cls.needs_calibration and not cls.uses_seed


def test_rtn_rounds_every_decoder_weight_and_nothing_else(data):
    calib, test = data
    fresh, _, _ = load_model("tiny-llama")
    before = decoder_weights(fresh)
    model, _ = run_method("rtn", "w4a16", calib)
    names = {n.replace(".linear.", "."): p for n, p in model.named_parameters()}
    assert len(before) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, w in before.items():
        assert torch.equal(names[name], quantize(w, "int4")), name
    assert torch.equal(names["lm_head.weight"], fresh.lm_head.weight)
    assert torch.equal(names["model.embed_tokens.weight"], fresh.model.embed_tokens.weight)
    # W4A4 adds activation quantization on top of the same weights
    w4a4, _ = run_method("rtn", "w4a4", calib)
    assert not torch.equal(w4a4(test).logits, model(test).logits)


@pytest.mark.parametrize("scheme", ["w4a16", "mxfp4_w"])
def test_gptq_beats_rtn_on_held_out_logits(data, scheme):
    calib, test = data
    fresh, _, _ = load_model("tiny-llama")
    ref = fresh(test).logits
    rtn, _ = run_method("rtn", scheme, calib)
    gptq, state = run_method("gptq", scheme, calib)
    err_rtn = (rtn(test).logits - ref).pow(2).mean().item()
    err_gptq = (gptq(test).logits - ref).pow(2).mean().item()
    assert err_gptq < err_rtn
    assert len(state.weights) == 14 and state.meta["report"]["settings"]["block_size"] == 128


def test_gptq_cached_state_rebuilds_the_same_model(data, tmp_path):
    calib, test = data
    model, state = run_method("gptq", "w4a4", calib, {"act_order": True})
    state.save(tmp_path / "s")
    fresh, _, adapter = load_model("tiny-llama")
    method = get_method("gptq")({"act_order": True})
    rebuilt = method.apply(fresh, adapter, method.state_type.load(tmp_path / "s"), get_scheme("w4a4"))
    assert torch.equal(rebuilt(test).logits, model(test).logits)


def test_gptq_calibration_key_depends_on_the_weight_format_only():
    gptq = get_method("gptq")()
    assert gptq.calib_scheme_key(get_scheme("w4a4")) == gptq.calib_scheme_key(get_scheme("w4a16"))
    assert gptq.calib_scheme_key(get_scheme("mxfp4")) == gptq.calib_scheme_key(get_scheme("mxfp4_w"))
    assert gptq.calib_scheme_key(get_scheme("mxfp4")) != gptq.calib_scheme_key(get_scheme("nvfp4"))


def test_gptq_without_weight_format_only_installs_activation_quantizers(data):
    calib, test = data
    model, state = run_method("gptq", "mxfp4_a", calib)
    fresh, _, _ = load_model("tiny-llama")
    assert state.weights == {}
    for name, w in decoder_weights(fresh).items():
        assert torch.equal(model.get_parameter(name.replace("_proj.weight", "_proj.linear.weight")), w)
    assert any(isinstance(m, QuantLinear) and m.act_format is not None for m in model.modules())


SPEC = """
name: builtin
models: [tiny-llama]
methods: [fp, rtn, {name: gptq, params: {block_size: 32}}]
schemes: [w4a16, mxfp4]
tasks: [wikitext2, {name: kl, seqlen: 64, max_windows: 2}]
ppl: {seqlen: 64, max_windows: 4}
calib: {corpus: c4, n: 8, seqlen: 64}
"""


def test_matrix_end_to_end_on_the_real_stack(tmp_path):
    path = tmp_path / "builtin.yaml"
    path.write_text(SPEC)
    cells = load_spec(path).cells()
    assert sorted((c.method_label, c.scheme_name) for c in cells) == [
        ("fp", "w16a16"), ("gptq(block_size=32)", "mxfp4"), ("gptq(block_size=32)", "w4a16"),
        ("rtn", "mxfp4"), ("rtn", "w4a16")]
    store = Store(tmp_path / "res")
    summary = run_matrix(cells, store)
    assert summary.done == 10 and summary.failed == 0, summary.failures
    recs = {(r["method"], r["scheme"], r["task"]): r for r in store.records()}
    assert recs[("fp", "w16a16", "kl")]["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)
    for scheme in ("w4a16", "mxfp4"):
        assert recs[("gptq", scheme, "kl")]["metrics"]["kl"] < recs[("rtn", scheme, "kl")]["metrics"]["kl"]
        gptq = recs[("gptq", scheme, "wikitext2")]
        assert gptq["metrics"]["calib_seconds"] > 0 and gptq["scheme_config"]["weight"] is not None
        assert gptq["model_source"]["kind"] == "tiny" and gptq["protocol"]["seqlen"] == 64
    again = run_matrix(load_spec(path).cells(), store)
    assert again.skipped == 10 and again.done == 0
