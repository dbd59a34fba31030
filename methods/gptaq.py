"""GPTAQ (formerly GPTQv2): efficient finetuning-free quantization for asymmetric calibration (Li, Yin, Lee,
Xiao, Panda — Yale, ICML 2025, arXiv 2504.02692). Official code: Intelligent-Computing-Lab-Yale/GPTAQ
(`fake_quant/gptaq_utils.py`; also GPTQModel's `v2=True`).

GPTQ fits each layer to its own output on the inputs the quantized prefix produces (Q x̃ ≈ W x̃: symmetric
calibration). GPTAQ fits the full-precision model's output (Q x̃ ≈ W x: asymmetric calibration), so a layer
also corrects the error its quantized prefix hands it. Per decoder layer, stage by stage (q/k/v -> o ->
gate/up -> down, each after the previous one is quantized):

    1. each batch through a full-precision copy of the layer (FP stream: x) and through the layer as the
       quantization has left it, activation quantizers on (quantized stream: x̃)
    2. H = 2/n Σ x̃ x̃ᵀ,   D = 2/n Σ (x - x̃) x̃ᵀ        (shared by the linears that read one input)
    3. U = upper Cholesky of (H + 1% mean diag · I)⁻¹,   P = α · triu₁(D Uᵀ) U     (α = 0.25)
    4. GPTQ's column loop with one more term: W[:, i:] -= e_i U[i, i:] - w_i P[i, i:]
       (lazy blocks: W[:, right] -= E U[block, right] - W_block P[block, right])

α = 0 is GPTQ bit for bit (tested). `act_quant_calibration` installs the scheme's activation and KV
quantizers on the quantized stream (the official `--enable_aq_calibration`, which its scripts use), so x̃
carries the activation error too; off, x̃ differs from x only by the prefix's weight error. The same solver
is `weight_solver: gptaq` of every rotation method (QuaRot + GPTAQ is the paper's W4A4 setting).

Deviations and their likely effect:
- Statistics in fp64 (the harness's Hessian convention; the reference accumulates in fp32): negligible.
- Paired inputs are streamed batch by batch (the FP copy of one layer, one batch of its inputs at a time)
  instead of caching every FP input of a layer for all samples: same statistics, bounded memory.
- Fused MoE experts are solved with plain GPTQ: routing differs between the two streams, so an expert's
  tokens do not pair. The official code has no MoE path.
"""
from __future__ import annotations

import copy
import dataclasses

from pydantic import Field

from harness.method import CalibContext, load_solved_weights
from harness.registry import register_method
from methods.gptq import GPTQ, GPTQState, _fmt_dict


@register_method("gptaq")
class GPTAQ(GPTQ):
    """GPTQ with asymmetric calibration: each layer fits the full-precision model's output."""

    version = 1
    conformance_params = {"block_size": 32}

    class Params(GPTQ.Params):
        alpha: float = Field(0.25, ge=0)  # the official scale of the asymmetric term (hard-coded there)
        act_quant_calibration: bool = True  # the quantized stream runs the scheme's activation / KV quantizers
        true_sequential: bool = True  # the official code solves k/v/q -> o -> up/gate -> down in turn

    def calib_scheme_key(self, scheme):
        key = super().calib_scheme_key(scheme)
        if self.params.act_quant_calibration and scheme is not None:
            key.update(activation=_fmt_dict(scheme.activation), kv=_fmt_dict(scheme.kv))
        return key

    def calibrate(self, ctx: CalibContext) -> GPTQState:
        fmt = ctx.scheme.weight
        if fmt is None:
            return GPTQState(meta={"note": "scheme keeps weights in full precision; nothing to solve"})
        from harness.gptq import gptq_quantize_model
        from harness.models import get_adapter
        from harness.quant import apply_scheme

        p = self.params.model_dump()
        alpha, act_quant = p.pop("alpha"), p.pop("act_quant_calibration")
        work = copy.deepcopy(ctx.model)  # wrapped for the quantized stream; the cell's model stays as it is
        adapter = get_adapter(work)
        scheme = ctx.scheme if act_quant else dataclasses.replace(ctx.scheme, activation=None, kv=None)
        apply_scheme(work, adapter, scheme, quantize_weights=False)
        weights = gptq_quantize_model(work, adapter, ctx.calib_inputs(), fmt, progress=ctx.progress, alpha=alpha, **p)
        solved = {name: w.detach().to("cpu") for name, w in dict(weights).items()}
        return GPTQState(weights=solved, meta={"weight_format": _fmt_dict(fmt), "n_weights": len(solved),
                                               "report": weights.report})

    def apply(self, model, adapter, state: GPTQState, scheme):
        from harness.quant import apply_scheme

        # the weights were solved on a wrapped model (their names are the wrappers'): wrap, then load
        apply_scheme(model, adapter, scheme, quantize_weights=False)
        load_solved_weights(model, state.weights)
        return model
