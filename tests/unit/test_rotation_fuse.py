"""Weight-fusion primitives keep a small residual block's function (fp64 reference)."""
from __future__ import annotations

import torch

from harness.rotation import (
    OnlineTransform,
    fold_norm,
    rotate_heads_input,
    rotate_heads_value,
    rotate_input,
    rotate_output,
)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rms(x, gamma):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * gamma


def test_norm_fold_and_residual_rotation_preserve_a_block():
    torch.manual_seed(0)
    d, f = 16, 24
    x = torch.randn(5, d, dtype=torch.float64)
    gamma = torch.rand(d, dtype=torch.float64) + 0.5
    w_up = torch.randn(f, d, dtype=torch.float64)
    w_down = torch.randn(d, f, dtype=torch.float64)
    b_down = torch.randn(d, dtype=torch.float64)

    def block(x, gamma, w_up, w_down, b_down):
        return x + torch.relu(rms(x, gamma) @ w_up.T) @ w_down.T + b_down

    ref = block(x, gamma, w_up, w_down, b_down)
    g2, up2, down2, b2 = gamma.clone(), w_up.clone(), w_down.clone(), b_down.clone()
    fold_norm(g2, [up2])
    assert torch.all(g2 == 1)
    q = orthogonal(d, 1)
    rotate_input(up2, q)
    rotate_output(down2, q, b2)
    out = block(x @ q, g2, up2, down2, b2)  # the residual stream now lives in the rotated basis
    torch.testing.assert_close(out, ref @ q, rtol=1e-10, atol=1e-10)


def test_per_head_value_output_rotation_cancels():
    torch.manual_seed(1)
    d, heads, hd = 12, 3, 4
    w_v, w_o = torch.randn(heads * hd, d, dtype=torch.float64), torch.randn(d, heads * hd, dtype=torch.float64)
    b_v = torch.randn(heads * hd, dtype=torch.float64)
    x = torch.randn(7, d, dtype=torch.float64)
    attn = torch.softmax(torch.randn(7, 7, dtype=torch.float64), -1)

    def out(w_v, b_v, w_o):
        return (attn @ (x @ w_v.T + b_v)) @ w_o.T

    ref = out(w_v, b_v, w_o)
    r = orthogonal(hd, 2)
    rotate_heads_value(w_v, r, hd, b_v)
    rotate_heads_input(w_o, r, hd)
    torch.testing.assert_close(out(w_v, b_v, w_o), ref, rtol=1e-10, atol=1e-10)


def test_fused_expert_weights_rotate_along_the_right_axes():
    torch.manual_seed(2)
    experts, d, f = 3, 8, 6
    gate_up = torch.randn(experts, 2 * f, d, dtype=torch.float64)
    down = torch.randn(experts, d, f, dtype=torch.float64)
    x = torch.randn(4, d, dtype=torch.float64)
    ref = torch.stack([torch.relu(x @ gate_up[e].T)[:, :f] @ down[e].T for e in range(experts)])
    q = orthogonal(d, 3)
    rotate_input(gate_up, q)
    rotate_output(down, q)
    got = torch.stack([torch.relu((x @ q) @ gate_up[e].T)[:, :f] @ down[e].T for e in range(experts)])
    torch.testing.assert_close(got, ref @ q, rtol=1e-10, atol=1e-10)


def test_online_transform_matches_matrix_and_keeps_dtype():
    q = orthogonal(8, 4).float()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    t = OnlineTransform(q)
    assert t(x).dtype == torch.bfloat16
    torch.testing.assert_close(OnlineTransform(apply_fn=lambda v: v @ q)(x.float()), x.float() @ q)


def test_permuted_block_down_rotation_matches_its_dense_matrix_and_keeps_logits():
    """R4 as a per-layer permutation + block ("permuted_block", O(d_ff) state): the fused weight and the online
    transform are exactly those of the dense P (I ⊗ R), and the model computes the same function."""
    from harness.models import make_tiny_model
    from harness.rotation.blockstats import TwoLevel
    from harness.rotation.install import Rotations, equivalence_error, install_rotations

    model, _, adapter = make_tiny_model("llama")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    d_ff = adapter.layer(0).mlp_out[0].in_features
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(d_ff, generator=g) for _ in adapter.layers()]
    blocks = [orthogonal(32, 10 + i) for i in range(adapter.num_layers)]
    w_before = adapter.layer(1).mlp_out[0].weight.detach().double().clone()
    install_rotations(model, adapter, Rotations(down_kind="permuted_block", down=blocks, down_perm=perms))
    with torch.no_grad():
        assert equivalence_error(ref, model, ids) < 1e-5
    dense = TwoLevel(perms[1], blocks[1]).dense()
    down = adapter.layer(1).site("down")
    torch.testing.assert_close(down.linear.weight.double(), (w_before @ dense).float().double())
    x = torch.randn(3, d_ff)
    torch.testing.assert_close(down.input_transform(x), (x.double() @ dense).float(), rtol=1e-5, atol=1e-5)
