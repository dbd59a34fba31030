"""Gemma-3 support: sandwich norms, (1 + w) norms, BOS windows, exact R1, one-line refusals."""
from __future__ import annotations

import pytest
import torch

from harness.errors import UnsupportedModelError
from harness.models import get_adapter, make_tiny_model
from harness.models.tiny import tiny_config, tiny_tokenizer
from harness.rotation.install import Rotations, equivalence_error, install_rotations


def _ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 500, (n, t), generator=torch.Generator().manual_seed(3))


def test_unit_offset_norms_keep_every_logit_bit():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    before = model(_ids()).logits
    assert any(type(m).__name__ == "Gemma3RMSNorm" for m in model.modules())
    get_adapter(model)
    assert not any(type(m).__name__ == "Gemma3RMSNorm" for m in model.modules())
    assert torch.equal(model(_ids()).logits, before)
    get_adapter(model)  # idempotent
    assert torch.equal(model(_ids()).logits, before)


def test_layer_view_reads_the_pre_feedforward_norm_and_lists_the_branch_norms():
    model, _, adapter = make_tiny_model("gemma3")
    view = adapter.layer(0)
    layer = model.model.layers[0]
    assert view.attn_norm is layer.input_layernorm
    assert view.mlp_norm is layer.pre_feedforward_layernorm
    assert view.branch_out_norms == [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
    assert view.residual_writers == [] and adapter.has_branch_out_norms
    assert not make_tiny_model("llama")[2].has_branch_out_norms


def test_r1_is_exact_after_the_branch_norms_and_leaves_the_writers():
    model, _, adapter = make_tiny_model("gemma3")
    ids = _ids()
    ref = model(ids).logits
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0]
    o_before = adapter.layer(1).o.weight.clone()
    install_rotations(model, adapter, Rotations(residual=q))
    assert equivalence_error(ref, model, ids) < 1e-5
    assert torch.equal(adapter.layer(1).o.weight, o_before)  # o_proj writes into the post-attention norm
    # without the online rotation after the branch norms the same fusion is far from exact
    plain, _, plain_adapter = make_tiny_model("gemma3")
    for view in plain_adapter.layers():
        view.branch_out_norms = []
    from harness.rotation.install import fold_norms, rotate_input, rotate_output

    fold_norms(plain_adapter)
    for view in plain_adapter.layers():
        for lin in (view.q, view.k, view.v, *view.mlp_in):
            rotate_input(lin.weight, q)
        for lin in (view.o, *view.mlp_out):
            rotate_output(lin.weight, q)
    rotate_input(plain_adapter.embed.weight, q)
    rotate_input(plain_adapter.lm_head.weight, q)
    assert equivalence_error(ref, plain, ids) > 1e-2


@pytest.mark.parametrize("method", ["spinquant", "ostquant"])
def test_methods_that_train_r1_into_the_writers_refuse_gemma_in_one_line(method):
    from harness.method import CalibConfig
    from harness.method import CalibContext
    from harness.quant import get_scheme
    from harness.registry import get_method

    model, tok, adapter = make_tiny_model("gemma3")
    cls = get_method(method)
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme("w4a4kv4"),
                       calib=CalibConfig(corpus="wikitext2", n=2, seqlen=16), seed=0)
    with pytest.raises(UnsupportedModelError) as info:
        cls(cls.conformance_params).calibrate(ctx)
    msg = str(info.value)
    assert "\n" not in msg and method in msg and "gemma3_text" in msg and "normalises each branch" in msg


def test_windows_start_with_bos_for_gemma_only():
    from harness.eval import perplexity

    gemma, tok, _ = make_tiny_model("gemma3")
    llama, _, _ = make_tiny_model("llama")
    g = perplexity(gemma, tok, "wikitext2", seqlen=16, max_windows=3)
    plain = perplexity(llama, tok, "wikitext2", seqlen=16, max_windows=3)
    assert g.protocol["bos_per_window"] and not plain.protocol["bos_per_window"]
    assert g.protocol["tokens_predicted"] == plain.protocol["tokens_predicted"] == 3 * 15
    assert len(g.extra["window_nll"]) == 3
    from harness.eval.ppl import windows_for

    windows, _ = windows_for(tok, "wikitext2", 16, 3, bos_token_id=tok.bos_token_id)
    text, _ = windows_for(tok, "wikitext2", 15, 3)
    assert (windows[:, 0] == tok.bos_token_id).all() and torch.equal(windows[:, 1:], text)


def test_calibration_windows_start_with_bos_for_gemma():
    from harness.method import CalibConfig
    from harness.method import CalibContext

    for family, bos in (("gemma3", True), ("llama", False)):
        model, tok, adapter = make_tiny_model(family)
        ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=None,
                           calib=CalibConfig(corpus="wikitext2", n=4, seqlen=16), seed=0)
        inputs = ctx.calib_inputs()
        assert inputs.shape == (4, 16)
        assert bool((inputs[:, 0] == tiny_tokenizer().bos_token_id).all()) == bos
