"""Write a quantized model as a compressed-tensors checkpoint (the format llm-compressor writes, vLLM loads).

Which harness formats have a compressed-tensors form that dequantizes to exactly the evaluated weights
(measured with compressed-tensors 0.20.1 and transformers 5.23, fp32, CPU):
- INT, symmetric or asymmetric, per row or per group ("pack-quantized"): exact;
- FP8 E4M3 per row or per tensor ("naive-quantized"): exact;
- MXFP4 with power-of-two scales (OCP floor, ceil, rceil) ("mxfp4-pack-quantized"): exact;
- NVFP4 ("nvfp4-pack-quantized"): not exact. compressed-tensors dequantizes to bf16 and divides the E4M3
  code by a global scale, where the harness (like torchao and NVIDIA's kernels) multiplies it by s_t; the
  codes and block codes are exact, the decompressed weight differs in its last bits. Export it only with
  `allow_inexact`, and the metadata records the measured difference.
Not expressible: MXFP4 with FP-Quant's floor x 4/3 rule (scales are 4/3 x 2^k, not E8M0), MX INT / FP6 /
FP8 element formats, NVINT4, FP8 E5M2 (no compressed-tensors scheme), and activation formats other than
8-bit per-token dynamic (INT8 / FP8), which is what vLLM's W8A8 kernels do.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.errors import PtqbenchError
from harness.export.factor import factor_nv, factor_weight
from harness.formats import Format


class UnsupportedExport(PtqbenchError):
    pass


def weight_args(fmt: Format):
    """compressed-tensors QuantizationArgs of a weight format, or UnsupportedExport saying why not."""
    from compressed_tensors.quantization import QuantizationArgs

    strategy = {"row": "channel", "tensor": "tensor", "group": "group"}[fmt.granularity]
    group = fmt.group_size if fmt.granularity == "group" else None
    if fmt.element == "int" and fmt.scale_type == "fp32":
        return QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy=strategy,
                                group_size=group)
    if fmt.element == "e4m3" and fmt.scale_type == "fp32" and fmt.granularity in ("row", "tensor"):
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    if fmt.element == "e2m1" and fmt.scale_type == "e8m0" and fmt.group_size == 32:
        if fmt.scale_rounding == "floor43":
            raise UnsupportedExport(f"{fmt.name} with scale_rounding floor43: its scales are 4/3 x 2^k, which E8M0 "
                                    f"cannot hold")
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32,
                                scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    if fmt.element == "e2m1" and fmt.scale_type == "e4m3" and fmt.group_size == 16:
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                                scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)
    raise UnsupportedExport(f"weight format {fmt.name} ({fmt.element} elements, {fmt.scale_type} scales, "
                            f"{fmt.granularity}) has no compressed-tensors scheme; exportable: INT rows/groups, "
                            f"FP8 E4M3 rows/tensor, MXFP4, NVFP4")


def activation_args(fmt: Format | None):
    """Dynamic per-token 8-bit activations (vLLM's W8A8), or UnsupportedExport."""
    if fmt is None:
        return None
    from compressed_tensors.quantization import QuantizationArgs

    if fmt.granularity == "row" and fmt.scale_type == "fp32" and fmt.bits == 8 and fmt.symmetric and (
            fmt.element in ("int", "e4m3")) and fmt.clip_ratio == 1.0:
        return QuantizationArgs(num_bits=8, type="int" if fmt.element == "int" else "float", symmetric=True,
                                strategy="token", dynamic=True)
    raise UnsupportedExport(f"activation format {fmt.name}: only 8-bit per-token dynamic activations (INT8, FP8) "
                            f"have a compressed-tensors form here")


def check_exportable(weight_formats: set[Format], act_formats: set[Format], allow_inexact: bool) -> Format:
    """The one weight format a checkpoint will hold, or UnsupportedExport saying why there is none."""
    if len(weight_formats) != 1 or len(act_formats) > 1:
        # transformers' dequantizing loader reads one scheme for every dense layer
        names = ", ".join(sorted(f.name for f in weight_formats | act_formats))
        raise UnsupportedExport(f"the linears use {len(weight_formats)} weight and {len(act_formats)} activation "
                                f"formats ({names}); a checkpoint here holds one of each")
    fmt = next(iter(weight_formats))
    weight_args(fmt)
    activation_args(next(iter(act_formats), None))
    if fmt.scale_type == "e4m3" and not allow_inexact:
        raise UnsupportedExport(
            f"{fmt.name}: compressed-tensors dequantizes NVFP4 to bf16 with code / global_scale, the harness with "
            f"code x s_t in fp32, so the served weights would differ from the evaluated ones in their last bits; "
            f"pass --allow-inexact to export anyway (or --fake)")
    return fmt


def _set_params(module: torch.nn.Module, fmt: Format, name: str) -> int:
    """Factor the module's fake-quantized weight and put its scales (and zero points) where
    `apply_quantization_config` prepared them; returns the number of inexact NV blocks."""
    weight = module.weight.detach()
    inexact = 0
    with torch.no_grad():
        scale = module.weight_scale
        if fmt.scale_type == "e4m3":
            f, inexact = factor_nv(weight, fmt, name)
            scale.copy_(f.block_code.reshape(scale.shape).to(scale.dtype))
            module.weight_global_scale.copy_(f.global_scale.reshape(module.weight_global_scale.shape))
            return inexact
        f = factor_weight(weight, fmt, name)
        scale.copy_(f.scale.reshape(scale.shape).to(scale.dtype))
        if f.zero is not None:
            # compressed-tensors' codes are signed: (q - zp) with q, zp in [-2^(b-1), 2^(b-1) - 1]
            offset = 2 ** (fmt.bits - 1)
            zp = module.weight_zero_point
            zp.copy_((f.zero - offset).reshape(zp.shape).to(zp.dtype))
    return inexact


def write_checkpoint(model: torch.nn.Module, names: list[str], fmt: Format, act_format: Format | None,
                     ignore: list[str], out_dir: Path) -> tuple[dict, int]:
    """Compress `model` (its quantized linears `names` already unwrapped to nn.Linear, holding their
    fake-quantized weights) into out_dir, one linear's factoring in memory at a time. `ignore`: the model's
    other linears (lm_head, routers), kept dense. Returns the quantization_config written and the number of
    inexact NV blocks."""
    import json

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(fmt),
                                input_activations=activation_args(act_format))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    modules = dict(model.named_modules())
    inexact = sum(_set_params(modules[name], fmt, name) for name in names)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    return json.loads((out_dir / "config.json").read_text())["quantization_config"], inexact


def load_dequantized(out_dir: Path, dtype: torch.dtype = torch.float32):
    """The exported checkpoint through transformers + compressed-tensors, decompressed to dense weights."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the checkpoint's quantization_config is used": that is the point
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
