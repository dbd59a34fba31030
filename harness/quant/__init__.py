"""Quantized execution: schemes (W/A/KV formats), QuantLinear, fused-expert and KV-cache quantization."""
from harness.quant.apply import apply_scheme, quantize_weight_, wrap_experts, wrap_layer, wrap_linear, wrap_site
from harness.quant.layers import (
    QuantExperts,
    QuantLinear,
    install_kv_quant,
    kv_attention_name,
    kv_format,
    kv_quant_installed,
    quantize_experts_weights,
    set_kv_format,
)
from harness.quant.quantizer import Quantizer, set_straight_through, ste_quantize, straight_through
from harness.quant.scheme import QuantScheme, get_scheme, list_schemes

__all__ = [
    "QuantExperts",
    "QuantLinear",
    "QuantScheme",
    "Quantizer",
    "apply_scheme",
    "get_scheme",
    "install_kv_quant",
    "kv_attention_name",
    "kv_format",
    "kv_quant_installed",
    "list_schemes",
    "quantize_experts_weights",
    "quantize_weight_",
    "set_kv_format",
    "set_straight_through",
    "ste_quantize",
    "straight_through",
    "wrap_experts",
    "wrap_layer",
    "wrap_linear",
    "wrap_site",
]
