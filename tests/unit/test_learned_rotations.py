"""Learned rotations: the orthogonal optimisers (Cayley SGD, QR-Orth), per-layer R2 fusion, SpinQuant and
DartQuant on tiny models (equivalence with quantizers off, determinism, objectives that decrease)."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.data import calibration_windows
from harness.formats import quantize
from harness.method import CalibConfig, CalibContext
from harness.models import get_adapter, make_tiny_model
from harness.quant import apply_scheme, get_scheme
from harness.registry import get_method
from harness.rotation.install import Rotations, equivalence_error, install_rotations
from harness.quant import ste_quantize, straight_through
from harness.state import states_equal
from harness.rotation.learn import CayleySGD, orthogonality_error, qr_orth
from harness.transforms import hadamard, random_orthogonal

FAMILIES = ["llama", "qwen2", "qwen3_moe"]
SPIN = {"weight_solver": "rtn", "steps": 4, "samples": 4, "seqlen": 64, "batch_size": 2}
DART = {"weight_solver": "rtn", "r1_epochs": 3, "r1_batch_tokens": 256, "r1_token_fraction": 0.5, "r2_epochs": 3,
        "r2_batch_tokens": 128, "r1_lr": 0.05, "r2_lr": 0.05}


def context(family="llama", scheme="w4a4kv4", seed=0, dtype=torch.float32):
    model, tok, adapter = make_tiny_model(family, dtype=dtype)
    return CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme),
                        calib=CalibConfig(corpus="c4", n=8, seqlen=64), seed=seed)


def held_out(tok, n=4):
    return calibration_windows(tok, "c4", n, 64, seed=123)


def skew_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The part of a Euclidean gradient that moves an orthogonal X (the generator Cayley SGD uses)."""
    return g @ x.T - x @ g.T


# ---- optimisers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cayley_sgd_stays_orthogonal_and_solves_a_procrustes_problem(momentum):
    n = 24
    target = random_orthogonal(n, seed=1)
    a = torch.randn(64, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) / 8
    b = a @ target  # min over orthogonal X of |A X - B|² is 0, at X = target
    x0 = random_orthogonal(n, seed=3)
    if torch.linalg.det(x0) * torch.linalg.det(target) < 0:  # Cayley steps stay in one component of O(n)
        x0[:, 0] = -x0[:, 0]
    x = torch.nn.Parameter(x0)
    opt = CayleySGD([x], lr=0.1, momentum=momentum)
    losses = []
    for _ in range(300):
        loss = (a @ x - b).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert orthogonality_error(x) < 1e-5
    assert losses[-1] < 1e-3 * losses[0]
    assert torch.allclose(x.detach(), target, atol=1e-3)


def test_cayley_sgd_step_is_capped_and_batched():
    x = torch.nn.Parameter(torch.stack([random_orthogonal(8, seed=s) for s in range(3)]))
    x0 = x.detach().clone()
    x.grad = torch.randn(3, 8, 8, dtype=torch.float64) * 1e6  # a huge gradient with a huge lr
    CayleySGD([x], lr=100.0).step()
    assert orthogonality_error(x) < 1e-10
    # alpha * |W|_1 <= 1 bounds the Cayley step: |X' - X| stays O(1) however large the gradient
    assert float((x.detach() - x0).abs().max()) < 2.5


def test_qr_orth_is_the_sign_fixed_q_factor():
    q0 = random_orthogonal(16, seed=4)
    r0 = torch.triu(torch.rand(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))) + torch.eye(16)
    assert torch.allclose(qr_orth(q0 @ r0), q0, atol=1e-10)  # unique QR with diag(R) > 0
    h = hadamard(16) * torch.where(torch.arange(16) % 3 == 0, -1.0, 1.0).double()
    assert torch.allclose(qr_orth(h), h, atol=1e-12)  # an orthogonal latent is its own rotation
    batch = torch.randn(3, 16, 16, dtype=torch.float64)
    out = qr_orth(batch)
    assert orthogonality_error(out) < 1e-12
    assert torch.allclose(out[1], qr_orth(batch[1]))


def test_qr_orth_latent_sgd_decreases_a_toy_objective():
    n = 16
    target = random_orthogonal(n, seed=6)
    if torch.linalg.det(target) * torch.linalg.det(hadamard(n)) < 0:  # same component of O(n) as the init
        target[:, 0] = -target[:, 0]
    z = torch.nn.Parameter(hadamard(n).clone())
    opt = torch.optim.SGD([z], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(150):
        loss = (qr_orth(z) - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert orthogonality_error(qr_orth(z.detach())) < 1e-5
    assert losses[-1] < 0.05 * losses[0]


# ---- quantizers in the loop -------------------------------------------------------------------------


def test_straight_through_quantizers_reach_linears_experts_and_kv():
    model, _, adapter = make_tiny_model("qwen3_moe")
    apply_scheme(model, adapter, get_scheme("w4a4kv4"), quantize_weights=False)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        plain = model(ids).logits
    with straight_through(model) as switched:
        # per layer: the quantizers of q, k, v, o (4), the experts (1) and K/V (1), each switched
        assert len(switched) == 2 * (4 + 1 + 1) and all(q.straight_through for q in switched)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain)  # same forward values
    assert not any(q.straight_through for q in switched)  # restored on exit
    # identity gradient through an activation-quantized linear: d/dx sum(Q(x) Wᵀ) = column sums of W
    q_proj = adapter.layer(0).site("q")
    x = torch.randn(5, q_proj.in_features, requires_grad=True)
    with straight_through(model):
        q_proj(x).sum().backward()
    assert torch.allclose(x.grad, q_proj.weight.sum(0).expand_as(x), atol=1e-5)
    assert torch.equal(ste_quantize(x.detach(), "int4"), quantize(x.detach(), "int4"))
    # and K/V: gradients reach the keys through the KV quantizer only in straight-through mode
    attn = adapter.layer(0).attn
    assert attn.kv_quantizer in switched


# ---- per-layer R2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_per_layer_head_rotations_keep_logits(family, per_kv_head):
    model, tok, adapter = make_tiny_model(family)
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    kv, hd = adapter.attention.num_kv_heads, adapter.head_dim
    heads = [torch.stack([random_orthogonal(hd, 10 * i + j) for j in range(kv)]) if per_kv_head
             else random_orthogonal(hd, i) for i in range(adapter.num_layers)]
    rot = Rotations(residual=random_orthogonal(adapter.hidden_size, 7), qk=hadamard(hd), down_kind="hadamard",
                    heads=heads)
    back = rot.as_float64()
    assert len(back.heads) == adapter.num_layers and torch.equal(back.heads[1], heads[1].double())
    install_rotations(model, adapter, back)
    assert equivalence_error(ref, model, ids) <= 1e-4
    if per_kv_head:  # KV head j's value rows are r[j]ᵀ W_j (independent of the o-side mapping)
        plain, _, plain_adapter = make_tiny_model(family)
        only_r2, _, only_adapter = make_tiny_model(family)
        install_rotations(plain, plain_adapter, Rotations())  # folds the norms only
        install_rotations(only_r2, only_adapter, Rotations(heads=heads))
        w0 = plain_adapter.layers()[1].v.weight.double()
        w1 = only_adapter.layers()[1].v.weight.double()
        for j in range(kv):
            rows = slice(j * hd, (j + 1) * hd)
            assert torch.allclose(w1[rows], heads[1][j].double().T @ w0[rows], atol=1e-5)


# ---- the methods ----------------------------------------------------------------------------------------


def calibrate_and_apply(method_name, params, family="llama", calib_scheme="w4a4kv4", eval_scheme="w16a16", seed=0):
    ctx = context(family, calib_scheme, seed)
    ids = held_out(ctx.tokenizer)
    with torch.no_grad():
        ref = ctx.model(ids).logits
    method = get_method(method_name)(params)
    state = method.calibrate(ctx)
    with torch.no_grad():
        assert torch.equal(ctx.model(ids).logits, ref), "calibrate must leave the cell's model untouched"
    rotated = copy.deepcopy(ctx.model)
    method.apply(rotated, get_adapter(rotated), state, get_scheme(eval_scheme))
    return ref, rotated, ids, state, method


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,params", [("spinquant", SPIN), ("dartquant", DART)])
def test_learned_rotations_with_quantizers_off_keep_logits(method, params, family):
    ref, rotated, ids, state, _ = calibrate_and_apply(method, params, family)
    info = state.meta["info"]
    assert info["orthogonality_error"] < 1e-10
    assert len(state.rotations.heads) == 2
    # the learned matrices moved away from their init (so the check is about learned rotations)
    init = get_method(method)(params).initial_rotations(context(family))
    assert not torch.allclose(state.rotations.residual, init[0], atol=1e-4)
    assert equivalence_error(ref, rotated, ids) <= 1e-4
    assert state.meta["steps"] > 0 and state.meta["calib_peak_bytes"] >= 0


@pytest.mark.parametrize("method,params", [("spinquant", SPIN), ("dartquant", DART)])
def test_learned_rotations_are_deterministic_per_seed(method, params):
    a = get_method(method)(params).calibrate(context(seed=0))
    b = get_method(method)(params).calibrate(context(seed=0))
    c = get_method(method)(params).calibrate(context(seed=1))
    assert states_equal(a, b, meta=False)
    assert not torch.equal(a.rotations.residual, c.rotations.residual)


def test_spinquant_two_training_forms_agree():
    # float64 models: in float32 the two forms' rounding differs at 1e-7, enough to flip a few 4-bit
    # roundings and move the loss by ~1e-3 (checked: both float32 forms scatter around the float64 value)
    for family in ["llama", "qwen2", "qwen3_moe"]:
        ctx = context(family, dtype=torch.float64)
        method = get_method("spinquant")(SPIN)
        r1, r2 = method.initial_rotations(ctx)
        ids = held_out(ctx.tokenizer, 2)
        grads, losses = [], []
        for form in ["weights", "activations"]:
            trainer = method.training_model(ctx, form)
            x1, x2 = r1.clone().requires_grad_(True), [r.clone().requires_grad_(True) for r in r2]
            with torch.enable_grad():
                loss = trainer.loss(x1, x2, ids)
                loss.backward()
            losses.append(float(loss.detach()))
            grads.append(torch.cat([skew_grad(x1.grad, r1).flatten(), skew_grad(x2[0].grad, r2[0]).flatten()]))
        assert abs(losses[0] - losses[1]) < 1e-5 * losses[0]
        assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)) > 0.999


def test_spinquant_loss_is_rotation_invariant_without_quantizers():
    ctx = context(scheme="w16a16")
    method = get_method("spinquant")(SPIN)
    r1, r2 = method.initial_rotations(ctx)
    trainer = method.training_model(ctx, "weights")
    ids = held_out(ctx.tokenizer, 2)
    x1 = r1.clone().requires_grad_(True)
    with torch.enable_grad():
        trainer.loss(x1, r2, ids).backward()
    assert float(skew_grad(x1.grad, r1).abs().max()) < 1e-4 * float(x1.grad.abs().max())
    other = method.objective(ctx, Rotations(residual=random_orthogonal(128, 5), heads=r2), ids)
    assert abs(other - method.objective(ctx, Rotations(residual=r1, heads=r2), ids)) < 1e-4


@pytest.mark.parametrize("scheme", ["w4a4kv4", "mxfp4"])
def test_spinquant_beats_its_hadamard_init_on_its_quantized_loss(scheme):
    params = {**SPIN, "steps": 12, "samples": 4, "batch_size": 4}  # one fixed batch: a plain descent
    ctx = context(scheme=scheme)
    method = get_method("spinquant")(params)
    state = method.calibrate(ctx)
    ids = ctx.training_windows(method.params.samples, method.params.seqlen)
    r1, r2 = method.initial_rotations(ctx)
    learned = state.rotations
    before = method.objective(ctx, Rotations(residual=r1, heads=r2), ids)
    after = method.objective(ctx, learned, ids)
    assert after < before - 0.02, (before, after)
    losses = state.meta["info"]["losses"]
    assert sum(losses[-3:]) < sum(losses[:3])  # decreasing over the steps


def residual_rows(model, adapter, ids):
    """Independent collection: x / rms(x) at every attention and MLP norm input of the FP model."""
    rows = []

    def grab(norm, args, _out):
        x = args[0].float()
        rows.append((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).reshape(-1, x.shape[-1]))

    handles = [n.register_forward_hook(grab) for v in adapter.layers() for n in (v.attn_norm, v.mlp_norm)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return torch.cat(rows)


def test_dartquant_whip_loss_decreases_and_flattens_activations():
    ctx = context()
    state = get_method("dartquant")(DART).calibrate(ctx)
    info = state.meta["info"]
    m = info["metrics"]
    assert m["r1_whip_final"] < m["r1_whip_init"]
    assert info["r1_losses"][-1] < info["r1_losses"][0]
    assert all(last < first for first, last in info["r2_losses"])
    # on activations of held-out windows, collected independently: fewer outliers than the Hadamard init
    x = residual_rows(ctx.model, ctx.adapter, held_out(ctx.tokenizer))
    r1_init = get_method("dartquant")(DART).initial_rotations(ctx)[0].float()
    r1 = state.rotations.residual.float()
    ratio = lambda y: float((y.abs().amax(-1) / y.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    whip = lambda y: float(torch.exp(-y.abs()).sum(-1).mean())  # noqa: E731
    assert whip(x @ r1) < whip(x @ r1_init)
    assert ratio(x @ r1) < ratio(x @ r1_init)


def test_dartquant_quant_mse_loss_lowers_the_schemes_activation_error():
    params = {**DART, "loss": "quant_mse", "r1_lr": 0.2, "r1_epochs": 6}
    ctx = context(scheme="mxfp4")
    state = get_method("dartquant")(params).calibrate(ctx)
    x = residual_rows(ctx.model, ctx.adapter, held_out(ctx.tokenizer))
    r1_init = get_method("dartquant")(params).initial_rotations(ctx)[0].float()
    r1 = state.rotations.residual.float()
    err = lambda y: float((quantize(y, "mxfp4") - y).pow(2).sum(-1).mean())  # noqa: E731
    assert err(x @ r1) < err(x @ r1_init)
    # the activation format is part of the calibration key only with that loss
    cls = get_method("dartquant")
    assert cls(params).calib_scheme_key(get_scheme("mxfp4")) != cls(params).calib_scheme_key(get_scheme("nvfp4"))
    assert cls({**params, "loss": "whip", "weight_solver": "rtn"}).calib_scheme_key(get_scheme("mxfp4")) is None


def test_learned_rotations_with_gptq_and_quantizers_on_run():
    ref, rotated, ids, state, _ = calibrate_and_apply("dartquant", {**DART, "weight_solver": "gptq"},
                                                      eval_scheme="w4a4kv4")
    assert state.weights
    with torch.no_grad():
        out = rotated(ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    spin = get_method("spinquant")(SPIN)
    assert spin.calib_scheme_key(get_scheme("w4a4kv4")) != spin.calib_scheme_key(get_scheme("w4a4"))


def test_cayley_sgd_takes_spinquants_sgdg_step():
    """One step equals SpinQuant's SGDG (train_utils/optimizer.py), re-derived here: SGDG updates Xᵀ, builds
    its skew generator in that frame and caps α by 1 / ‖generator‖₁; its Cayley fixed point, solved exactly,
    gives our matrix, also when the cap binds (a large lr). (SGDG adds 1e-8 to the norm: 1e-9 apart.)"""
    g = torch.Generator().manual_seed(0)
    x0 = random_orthogonal(6, seed=3)
    grad = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = torch.nn.Parameter(x0.clone())
    x.grad = grad.clone()
    CayleySGD([x], lr=10.0).step()
    # SGDG in its own frame (the point is pᵀ, the descent direction -gradᵀ)
    big_x, v = x0.T, -grad.T
    mx = v @ x0  # V @ unity (unity = p)
    w_hat = mx - 0.5 * x0.T @ (x0 @ mx)
    w = w_hat - w_hat.T
    alpha = min(1.0 / float(w.abs().sum(dim=0).max()), 10.0)
    eye = torch.eye(6, dtype=torch.float64)
    y = torch.linalg.solve(eye - 0.5 * alpha * w, (eye + 0.5 * alpha * w) @ big_x)  # the loop's fixed point
    torch.testing.assert_close(x.detach(), y.T, rtol=1e-7, atol=1e-8)
