"""Quantized execution: schemes (W/A/KV formats), QuantLinear, fused-expert and KV-cache quantization."""
from harness.quant.apply import apply_scheme, quantize_weight_, wrap_experts, wrap_linear
from harness.quant.layers import (
    QuantExperts,
    QuantLinear,
    install_kv_quant,
    kv_attention_name,
    kv_quant_installed,
    quantize_experts_weights,
)
from harness.quant.scheme import QuantScheme, get_scheme, list_schemes

__all__ = [
    "QuantExperts",
    "QuantLinear",
    "QuantScheme",
    "apply_scheme",
    "get_scheme",
    "install_kv_quant",
    "kv_attention_name",
    "kv_quant_installed",
    "list_schemes",
    "quantize_experts_weights",
    "quantize_weight_",
    "wrap_experts",
    "wrap_linear",
]
