"""INT-FlashAttention: the torch reference of its arithmetic, the Triton kernel against it (interpreter on
CPU), masks, and the scheme option that routes a model's attention through it."""
from __future__ import annotations

import pytest
import torch

from harness.attention.int8_flash import int8_flash_reference, quantize_per_token
from harness.errors import InvalidValueError
from harness.models.tiny import make_tiny_model
from harness.quant import apply_scheme, get_scheme


def _fp_attention(q, k, v, scale, window=None):
    t = q.shape[-2]
    pos = torch.arange(t)
    vis = pos[None, :] <= pos[:, None]
    if window is not None:
        vis &= (pos[:, None] - pos[None, :]) < window
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ v.double()


def _qkv(t=100, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, t, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("variant", ["full", "half"])
@pytest.mark.parametrize("window", [None, 40])
def test_reference_is_close_to_full_precision_attention(variant, window):
    q, k, v = _qkv()
    ref = _fp_attention(q, k, v, 0.125, window)
    out = int8_flash_reference(q, k, v, 0.125, variant, window).double()
    rel = (out - ref).norm() / ref.norm()
    assert 1e-5 < rel < (0.03 if variant == "full" else 0.01), rel


def test_p_is_quantized_relative_to_the_running_max():
    """The full variant's P has 128 levels per tile: with one dominant key the others round to 0 or 1/127."""
    q, k, v = _qkv(t=32, d=16)
    k[..., 0, :] = q[..., 31:32, :].squeeze(-2) * 4  # query 31 attends almost only to key 0
    full = int8_flash_reference(q, k, v, 0.25, "full")
    half = int8_flash_reference(q, k, v, 0.25, "half")
    assert not torch.allclose(full, half, atol=1e-4)


def test_per_token_quantization_is_symmetric_int8():
    x = torch.randn(1, 2, 5, 16)
    q8, s = quantize_per_token(x)
    assert q8.abs().max() <= 127 and torch.equal(q8, torch.round(q8))
    assert torch.allclose(q8.abs().amax(-1), torch.full((1, 2, 5), 127.0))
    torch.testing.assert_close(q8 * s[..., None], x, atol=float(s.max()) / 2 + 1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["full", "half"])
@pytest.mark.parametrize("t, window", [(96, None), (77, None), (130, 50)])
def test_triton_kernel_matches_the_reference(variant, t, window):
    pytest.importorskip("triton")
    from harness.attention.int8_flash_triton import int8_flash_triton

    q, k, v = _qkv(t=t, d=32, seed=t)
    ref = int8_flash_reference(q, k, v, 0.2, variant, window)
    out = int8_flash_triton(q, k, v, 0.2, variant, window)
    # equal to fp32 rounding (sums in another order), but where exp2 differs by an ulp and flips one INT8
    # rounding of P: then by at most one level of P (|v| / 127), and rarely
    diff = (out - ref).abs()
    assert diff.max() <= v.abs().amax() / 127, diff.max()
    assert (diff > 1e-5).float().mean() < 0.005, (diff > 1e-5).float().mean()


def test_scheme_routes_the_model_attention_through_it():
    model, tok, adapter = make_tiny_model("llama")
    ids = torch.randint(3, tok.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
        apply_scheme(model, adapter, {"name": "int8attn", "attention": "int8_flash"})
        out = model(ids).logits
    rel = (out - fp).norm() / fp.norm()
    assert 1e-6 < rel < 0.05, rel
    assert get_scheme({"name": "a", "attention": "int8_flash"}).to_dict()["attention"] == "int8_flash"
    assert "attention" not in get_scheme("w4a4").to_dict()  # old schemes keep their records (and run ids)


def test_bad_kernel_names_and_padding_masks_are_refused():
    with pytest.raises(Exception, match="int8_flash"):
        get_scheme({"name": "a", "attention": "int8_flsh"})
    model, tok, adapter = make_tiny_model("llama")
    apply_scheme(model, adapter, {"name": "int8attn", "attention": "int8_flash"})
    ids = torch.randint(3, tok.vocab_size, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with pytest.raises(InvalidValueError, match="causal"), torch.no_grad():
        model(ids, attention_mask=mask)
