"""MR-GPTQ: micro-rotated GPTQ for microscaling FP4 ("Bridging the Gap Between Promise and Performance for
Microscaling FP4 Quantization", Egiazarian, Castro, Kuznedelev, ..., Ashkboos, Hoefler, Alistarh — ISTA /
Red Hat AI / Yandex / ETH, arXiv 2509.23202). Official code: IST-DASLab/FP-Quant (`src/quantization/gptq.py`,
`quantizer.py`, `src/transforms/transforms.py`).

GPTQ made format-aware for MXFP4 / NVFP4, as a ladder of params (each rung a spec cell):

    1. micro-rotation (`transform: hadamard`): per linear-input site (q/k/v, o, gate/up, down), a block-
       diagonal Hadamard H_B of the format's block size (`block`: 32 MX, 16 NV), applied online to the
       activations and fused into the weights as W H_Bᵀ (the same transform for weights and activations)
    2. the MSE observer (`observer: mse`): every group's scale is the best of 100 shrinks 1 - i·0.8/100 of
       its absmax range under the error Σ|q - w|^2.4 (FP-Quant's observer)
    3. static groups: the group scales are fixed from the transformed weight before the GPTQ loop
    4. static activation reordering (`act_order`): columns solved by decreasing Hessian diagonal, each
       rounded with its original group's scale
    5. GPTQ (`weight_solver: gptq`, 1 % damping, lazy blocks of 128) on the transformed inputs' Hessian
       H_t = H_B H H_Bᵀ, all Hessians of a layer from one pass (as FP-Quant)
E8M0 scale rules are the scheme's format: FP-Quant's own MXFP4 rule is `scale_rounding: floor43` (the OCP
floor exponent times 4/3: nothing saturates); OCP `floor`, `ceil`, `rceil` are the alternatives.

The machinery is WUSH's per-linear transform install (`methods/wush.py`, the same group's follow-up, whose
`hadamard` transform is this paper's micro-rotation); this module fixes the defaults to the MR-GPTQ recipe.

Deviations and their likely effect:
- NVFP4's per-tensor scale is the harness's (amax of the tensor, per linear); FP-Quant fuses the global
  scales of q/k/v and of gate/up (`--fuse_global_scale`) to the smallest: a small effect on NVFP4 only.
- FP-Quant's MSE observer searches fp32 scales, then casts to E8M0 / E4M3; here the range is shrunk before
  the scale rule (the same candidates up to the cast's rounding).
- Fused MoE experts get no transform (RTN); `weight_solver: gptq` refuses MoE models (as WUSH here).
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt

from harness.method import MethodParams
from harness.registry import register_method
from methods.wush import WUSH


@register_method("mr_gptq")
class MRGPTQ(WUSH):
    """Block Hadamard of the format's block, MSE-fitted scales, static groups, act-order GPTQ."""

    version = 1
    conformance_params = {"weight_solver": "rtn", "observer": "minmax"}

    class Params(MethodParams):
        transform: Literal["hadamard", "identity"] = "hadamard"  # identity: the plain-GPTQ rung
        weight_solver: Literal["rtn", "gptq"] = "gptq"
        observer: Literal["minmax", "mse"] = "mse"
        act_order: bool = True
        static_groups: bool = True
        block: PositiveInt | None = None  # default: the scheme's format block (32 MX, 16 NV)
        damp: NonNegativeFloat = 0.01
        gptq_block_size: PositiveInt = 128
        error_rows: PositiveInt = 256
        batch_size: PositiveInt = 4
