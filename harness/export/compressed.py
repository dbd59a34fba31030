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

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import PtqbenchError
from harness.export.factor import Factored, factor_nv, factor_weight
from harness.export.inspect import Inventory
from harness.formats import Format


class UnsupportedExport(PtqbenchError):
    pass


@dataclass
class LinearExport:
    name: str
    fmt: Format
    factored: Factored
    w_hat: torch.Tensor
    inexact_blocks: int = 0


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


def factor_linears(inventory: Inventory, allow_inexact: bool) -> list[LinearExport]:
    out = []
    for q in inventory.linears:
        if q.weight_format is None:
            continue
        weight_args(q.weight_format)  # refuse unsupported formats before any work
        w_hat = q.module.linear.weight.detach().float().cpu().clone()
        if q.weight_format.scale_type == "e4m3":
            factored, inexact = factor_nv(w_hat, q.weight_format, q.name)
            if not allow_inexact:
                raise UnsupportedExport(
                    f"{q.weight_format.name}: compressed-tensors dequantizes NVFP4 to bf16 with code / global_scale, "
                    f"the harness with code x s_t in fp32, so the served weights would differ from the evaluated "
                    f"ones in their last bits; pass --allow-inexact to export anyway (or --fake)")
            out.append(LinearExport(q.name, q.weight_format, factored, w_hat, inexact))
        else:
            out.append(LinearExport(q.name, q.weight_format, factor_weight(w_hat, q.weight_format, q.name), w_hat))
    return out


def _set_params(module: torch.nn.Module, item: LinearExport) -> None:
    """The factored scales (and zero points) on a module `apply_quantization_config` prepared."""
    f, fmt = item.factored, item.fmt
    with torch.no_grad():
        module.weight.copy_(item.w_hat.to(module.weight.dtype))
        scale = module.weight_scale
        if fmt.scale_type == "e4m3":
            scale.copy_(f.block_code.reshape(scale.shape).to(scale.dtype))
            module.weight_global_scale.copy_(f.global_scale.reshape(module.weight_global_scale.shape))
            return
        scale.copy_(f.scale.reshape(scale.shape).to(scale.dtype))
        if f.zero is not None:
            # compressed-tensors' codes are signed: (q - zp) with q, zp in [-2^(b-1), 2^(b-1) - 1]
            offset = 2 ** (fmt.bits - 1)
            zp = module.weight_zero_point
            zp.copy_((f.zero - offset).reshape(zp.shape).to(zp.dtype))


def write_checkpoint(model: torch.nn.Module, items: list[LinearExport], act_format: Format | None,
                     ignore: list[str], out_dir: Path) -> dict:
    """Compress `model` (its quantized linears already unwrapped to nn.Linear) into out_dir; returns the
    quantization_config written. `ignore`: the model's other linears (lm_head, routers), kept dense."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    formats = {item.fmt for item in items}
    if len(formats) != 1:
        # transformers' dequantizing loader reads one scheme for every dense layer
        raise UnsupportedExport(f"the linears use {len(formats)} weight formats ({', '.join(sorted(f.name for f in formats))}); "
                                f"a checkpoint here holds one")
    fmt = formats.pop()
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(fmt),
                                input_activations=activation_args(act_format))
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore)
    apply_quantization_config(model, config)
    modules = dict(model.named_modules())
    for item in items:
        _set_params(modules[item.name], item)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    import json

    return json.loads((out_dir / "config.json").read_text())["quantization_config"]


def load_dequantized(out_dir: Path, dtype: torch.dtype = torch.float32):
    """The exported checkpoint through transformers + compressed-tensors, decompressed to dense weights."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the checkpoint's quantization_config is used": that is the point
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
