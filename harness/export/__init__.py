"""Export a recorded run's model as a servable Hugging Face checkpoint, checked against what was evaluated.

    ptqbench export-model RUN_ID OUT_DIR [--fake] [--allow-inexact]

1. rebuild the run's model (harness.export.rebuild: the recorded model, method, params, scheme; the cached
   calibration state when there is one);
2. take stock of what is on top of the transformers model (harness.export.inspect) and refuse, in one line,
   what the target cannot express: online transforms (R3 / R4 Hadamards, Kronecker pairs), K/V
   quantization, activation formats without a compressed-tensors form, harness modules;
3. factor every fake-quantized weight back into codes and scales, exactly (harness.export.factor);
4. write the compressed-tensors checkpoint, the tokenizer, and `ptqbench_export.json` (the run id, its
   metrics and protocol, the method and params, library versions, what was checked);
5. load it back with transformers + compressed-tensors and compare every weight bit for bit.

`fake=True` writes the dequantized weights as a plain checkpoint instead: online transforms are folded
back into the weights they feed (exact in real arithmetic, not bit for bit), and activation and K/V
quantization are dropped (listed in the metadata), so any run exports as its weight-quantized model.
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from harness.errors import PtqbenchError
from harness.export.compressed import UnsupportedExport, factor_linears, load_dequantized, write_checkpoint
from harness.export.inspect import Inventory, inventory
from harness.export.native import restore_native_modules
from harness.export.rebuild import rebuild

METADATA = "ptqbench_export.json"
FORMATS = ("compressed-tensors",)


def _unwrap(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    """Replace the QuantLinear at `name` by the nn.Linear it wraps; returns that linear."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, attr).linear
    setattr(parent, attr, linear)
    return linear


def _fold_online(model: torch.nn.Module, inv: Inventory) -> list[str]:
    """Fold each online input transform T into its linear: y = T(x) Wᵀ = x (W Mᵀ)ᵀ with M = T(I)."""
    folded = []
    for q in inv.linears:
        if q.online is None:
            continue
        weight = q.module.linear.weight
        eye = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
        matrix = q.online(eye).to(torch.float64)  # row i = T(e_i): x T = x @ matrix for a linear T
        weight.data = (weight.to(torch.float64) @ matrix.T).to(weight.dtype)
        q.module.input_transform = None
        folded.append(q.name)
    return folded


def _blockers(inv: Inventory) -> list[str]:
    out = []
    if inv.online:
        more = ", ..." if len(inv.online) > 2 else ""
        out.append(f"online input transforms on {len(inv.online)} linears ({', '.join(inv.online[:2])}{more})")
    if inv.qk_rotations:
        out.append(f"an online Q/K rotation (R3) in {len(inv.qk_rotations)} attention modules")
    if inv.kv:
        out.append(f"K/V quantization in {len(inv.kv)} attention modules")
    if inv.experts:
        out.append(f"fused MoE experts ({len(inv.experts)} blocks; not exported yet)")
    if inv.foreign:
        out.append(f"harness modules in the model ({', '.join(inv.foreign[:3])})")
    return out


def _drop_online_state(model: torch.nn.Module, inv: Inventory) -> list[str]:
    """What --fake leaves out: activation and K/V quantization, R3 (an identity without K/V quantization)."""
    dropped = []
    acts = sorted({q.act_format.name for q in inv.linears if q.act_format is not None})
    if acts:
        dropped.append(f"activation quantization ({', '.join(acts)})")
    if inv.kv:
        dropped.append("K/V quantization")
    if inv.qk_rotations:
        dropped.append("online Q/K rotation R3 (exact without K/V quantization: (qR)(kR)ᵀ = qkᵀ)")
    for name, module in model.named_modules():
        for attr in ("kv_quantizer", "qk_rotation"):
            if hasattr(module, attr):
                delattr(module, attr)
    return dropped


def _restore_attention(model: torch.nn.Module) -> None:
    from harness.quant.layers import KV_PREFIX

    current = str(getattr(model.config, "_attn_implementation", "") or "")
    if current.startswith(KV_PREFIX):
        model.set_attn_implementation(current[len(KV_PREFIX):])


def _other_linears(model: torch.nn.Module, quantized: set[str]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("ptqbench", "torch", "transformers", "compressed-tensors", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def _verify(out_dir: Path, reference: dict[str, torch.Tensor], quantized: set[str]) -> dict[str, Any]:
    """Reload through transformers (+ compressed-tensors) and compare every tensor with the exported model's."""
    loaded = load_dequantized(out_dir) if quantized else _load_plain(out_dir)
    state = {k: v.detach().float() for k, v in loaded.state_dict().items()}
    mismatched, max_diff, missing = [], 0.0, []
    for name, ref in reference.items():
        got = state.get(name)
        if got is None:
            missing.append(name)
            continue
        if not torch.equal(got, ref):
            mismatched.append(name)
            max_diff = max(max_diff, (got - ref).abs().max().item())
    return {"tensors_compared": len(reference), "bit_identical": len(reference) - len(mismatched) - len(missing),
            "mismatched": mismatched[:20], "missing": missing[:20], "max_abs_diff": max_diff,
            "loader": "transformers AutoModelForCausalLM" + (" + CompressedTensorsConfig(dequantize=True)" if quantized
                                                           else "")}


def _load_plain(out_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)


def export_model(run_id: str, out_dir: str | Path, results_dir: str | Path | None = None, *,
                 fmt: str = "compressed-tensors", fake: bool = False, allow_inexact: bool = False,
                 allow_code_change: bool = False, verify: bool = True, device: str | None = None) -> dict[str, Any]:
    """Export one recorded run; returns the metadata written next to the checkpoint."""
    from harness.store import Store, is_diverged

    if fmt not in FORMATS:
        raise PtqbenchError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    store = Store(results_dir)
    record = store.find(run_id)
    if record.get("status") != "done" and not is_diverged(record):  # a diverged run was measured: it exports
        raise PtqbenchError(f"run {record['run_id']} is {record.get('status')!r} ({record.get('error')}): "
                            f"it was never measured, nothing to export")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PtqbenchError(f"export directory {out_dir} exists and is not empty")

    built = rebuild(record, store, device=device, allow_code_change=allow_code_change)
    model = built.model
    scheme = built.cell.scheme
    wfmt = scheme.weight if scheme else None
    inv = inventory(model, wfmt, lm_head_quantized=bool(scheme and scheme.lm_head))
    if scheme is not None and scheme.embeddings and wfmt is not None and not fake:
        raise UnsupportedExport("quantized embeddings have no compressed-tensors form here; use --fake")

    native, norm_change = restore_native_modules(model, allow_inexact)
    inv.foreign = [f for f in inv.foreign if f.split(" ")[0] not in native]
    blockers = _blockers(inv)
    dropped: list[str] = []
    folded: list[str] = []
    if fake:
        if inv.experts or inv.foreign:
            raise UnsupportedExport(f"cannot export run {record['run_id']}, even with --fake: " + "; ".join(
                b for b in blockers if "experts" in b or "harness modules" in b))
        folded = _fold_online(model, inv)
        dropped = _drop_online_state(model, inv)
    elif blockers:
        raise UnsupportedExport(f"cannot export run {record['run_id']} as {fmt}: " + "; ".join(blockers)
                                + " (--fake writes the dequantized weights instead)")
    acts = {q.act_format for q in inv.linears if q.act_format is not None}
    if len(acts) > 1 and not fake:
        raise UnsupportedExport(f"the linears quantize activations to {len(acts)} formats; a checkpoint here holds one")

    items = [] if fake else factor_linears(inv, allow_inexact)
    for q in inv.linears:
        _unwrap(model, q.name)
    _restore_attention(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    quantized = {item.name for item in items}
    if items:
        qconfig = write_checkpoint(model, items, next(iter(acts), None), _other_linears(model, quantized), out_dir)
    else:
        qconfig = None
        model.save_pretrained(out_dir)
    built.tokenizer.save_pretrained(out_dir)

    metadata = {
        "run_id": record["run_id"], "export_format": "dense (fake-quantized weights)" if fake else fmt,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "record": {k: record.get(k) for k in ("spec", "scale", "model", "revision", "model_source", "method",
                                               "method_label", "method_params", "method_version", "scheme",
                                               "scheme_config", "calib", "calib_key", "seed", "dtype", "task",
                                               "main_metric", "metrics", "protocol", "versions", "code")},
        "calibration": built.calibration, "code_matches_record": record.get("code") == _current_code(built),
        "weights": {"format": sorted({i.fmt.name for i in items}) or ([wfmt.name] if wfmt else []),
                    "linears": len(items) if items else len([q for q in inv.linears if q.weight_format]),
                    "inexact_blocks": sum(i.inexact_blocks for i in items)},
        "native_modules_restored": len(native), "norm_gain_max_rel_change": norm_change,
        "activations": sorted(a.name for a in acts), "folded_online_transforms": folded, "dropped": dropped,
        "quantization_config": qconfig, "versions": _versions(),
    }
    if verify:
        metadata["verification"] = _verify(out_dir, reference, quantized)
    (out_dir / METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    return metadata


def _current_code(built) -> str:
    from harness.spec.code import method_code_hash

    return method_code_hash(built.cell.method_module)


def read_metadata(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / METADATA).read_text())
