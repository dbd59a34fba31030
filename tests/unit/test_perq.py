"""PeRQ: the mass-diffusion permutation evens the blocks' l1 mass, and is the only difference from BRQ."""
from __future__ import annotations

import copy

import torch

from harness.data import calibration_windows
from harness.models import get_adapter, make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from harness.rotation.blockstats import balancing_permutation
from harness.transforms import block_diagonal, hadamard
from tests.unit.test_rotation_methods import context


def test_even_block_mass_lowers_the_worst_post_rotation_outlier():
    """The paper's argument on planted data: four outlier channels in one 16-block keep a large maximum
    after the block Hadamard; dealt to four blocks by the permutation, the maximum after it drops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g, dtype=torch.float64)
    x[:, :4] *= 30.0  # outlier channels 0..3, all in block 0
    mass = x.abs().mean(0)
    perm = balancing_permutation(mass, 16)
    assert sorted(perm.tolist()) == list(range(128))
    blocks_of_outliers = {perm.tolist().index(c) // 16 for c in range(4)}
    assert len(blocks_of_outliers) == 4
    rotate = block_diagonal(hadamard(16), 8)
    plain, permuted = (x @ rotate).abs().amax(), (x[:, perm] @ rotate).abs().amax()
    assert permuted < 0.75 * plain


def test_perq_evens_the_block_mass_of_both_sites_and_records_it():
    model, tok, adapter = make_tiny_model("llama")
    method = get_method("perq")({"weight_solver": "rtn", "block": 16})
    state = method.calibrate(context(model, tok, adapter, "w4a4", 0))
    m = state.meta["info"]["metrics"]
    assert m["residual_block_l1_cv_after"] < m["residual_block_l1_cv_before"]
    assert m["down_block_l1_cv_after"] < m["down_block_l1_cv_before"]
    rot = state.rotations
    assert rot.down_kind == "permuted_block" and len(rot.down_perm) == adapter.num_layers
    assert not torch.equal(rot.down_perm[0], torch.arange(rot.down_perm[0].numel()))


def test_perq_without_permutations_is_brq_with_the_same_seed():
    model, tok, adapter = make_tiny_model("llama")
    ids = calibration_windows(tok, "c4", 2, 32, seed=7)
    scheme = get_scheme("w4a4")
    logits = {}
    for label, name, params in (("brq", "brq", {}), ("perq", "perq", {}),
                                ("perq_no_permutation", "perq", {"permute_residual": False, "permute_down": False})):
        method = get_method(name)({"weight_solver": "rtn", "block": 16, **params})
        state = method.calibrate(context(model, tok, adapter, "w4a4", 3))
        work = copy.deepcopy(model)
        method.apply(work, get_adapter(work), state, scheme)
        with torch.no_grad():
            logits[label] = work(ids).logits
    torch.testing.assert_close(logits["perq_no_permutation"], logits["brq"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["perq"], logits["brq"], rtol=1e-3, atol=1e-3)
