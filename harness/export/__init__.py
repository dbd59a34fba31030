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

import gc
import hashlib
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from harness.errors import PtqbenchError
from harness.export.compressed import UnsupportedExport, check_exportable, load_dequantized, write_checkpoint
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


def _online_blockers(inv: Inventory) -> list[str]:
    """What a compressed checkpoint cannot hold but --fake can fold or drop."""
    out = []
    if inv.online:
        more = ", ..." if len(inv.online) > 2 else ""
        out.append(f"online input transforms on {len(inv.online)} linears ({', '.join(inv.online[:2])}{more})")
    if inv.qk_rotations:
        out.append(f"an online Q/K rotation (R3) in {len(inv.qk_rotations)} attention modules")
    if inv.kv:
        out.append(f"K/V quantization in {len(inv.kv)} attention modules")
    return out


def _structural_blockers(inv: Inventory) -> list[str]:
    """What no checkpoint written here can hold, --fake included."""
    out = []
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


def _digest(tensor: torch.Tensor) -> str:
    """The tensor's fp32 bits, with -0 counted as +0 (integer codes have no signed zero; torch.equal agrees)."""
    return hashlib.sha256((tensor.detach().float().cpu() + 0.0).contiguous().numpy().tobytes()).hexdigest()


def _verify(out_dir: Path, reference: dict[str, str], kept: dict[str, torch.Tensor], quantized: bool) -> dict[str, Any]:
    """Reload through transformers (+ compressed-tensors) and compare every tensor with what was exported:
    by digest, and by value where the exported weight was kept (an inexact format)."""
    loaded = load_dequantized(out_dir) if quantized else _load_plain(out_dir)
    state = loaded.state_dict()
    mismatched, missing, max_diff = [], [], 0.0
    for name, digest in reference.items():
        got = state.get(name)
        if got is None:
            missing.append(name)
        elif _digest(got) != digest:
            mismatched.append(name)
            if name in kept:
                max_diff = max(max_diff, (got.detach().float() - kept[name]).abs().max().item())
    return {"tensors_compared": len(reference), "bit_identical": len(reference) - len(mismatched) - len(missing),
            "mismatched": mismatched[:20], "missing": missing[:20],
            "max_abs_diff": max_diff if not mismatched or kept else None,
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
    structural, online = _structural_blockers(inv), _online_blockers(inv)
    dropped: list[str] = []
    folded: list[str] = []
    if fake:
        if structural:
            raise UnsupportedExport(f"cannot export run {record['run_id']}, even with --fake: " + "; ".join(structural))
        folded = _fold_online(model, inv)
        dropped = _drop_online_state(model, inv)
    elif online + structural:
        hint = "" if structural else " (--fake writes the dequantized weights instead)"
        raise UnsupportedExport(f"cannot export run {record['run_id']} as {fmt}: " + "; ".join(online + structural)
                                + hint)
    acts = {q.act_format for q in inv.linears if q.act_format is not None}
    targets = [q for q in inv.linears if q.weight_format is not None]
    fmt_w = None if fake or not targets else check_exportable({q.weight_format for q in targets}, acts, allow_inexact)

    for q in inv.linears:
        _unwrap(model, q.name)
    _restore_attention(model)
    # what the checkpoint must give back: digests (not copies: an 8B model is not held twice); the quantized
    # weights themselves only where a difference is expected and measured (--allow-inexact)
    keep = {f"{q.name}.weight" for q in targets} if allow_inexact and fmt_w is not None else set()
    reference = {k: _digest(v) for k, v in model.state_dict().items()}
    kept = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if k in keep}
    quantized = [q.name for q in targets] if fmt_w is not None else []
    partial = out_dir.with_name(out_dir.name + ".partial")  # renamed when complete: no half checkpoint on a failure
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    inexact, qconfig = 0, None
    try:
        if quantized:
            qconfig, inexact = write_checkpoint(model, quantized, fmt_w, next(iter(acts), None),
                                                _other_linears(model, set(quantized)), partial)
        else:
            model.save_pretrained(partial)
        built.tokenizer.save_pretrained(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    calibration, cell = built.calibration, built.cell
    del model, built  # the reload below is the only model in memory
    gc.collect()

    metadata = {
        "run_id": record["run_id"], "export_format": "dense (fake-quantized weights)" if fake else fmt,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "record": {k: record.get(k) for k in ("spec", "scale", "model", "revision", "model_source", "method",
                                               "method_label", "method_params", "method_version", "scheme",
                                               "scheme_config", "calib", "calib_key", "seed", "dtype", "task",
                                               "main_metric", "metrics", "protocol", "versions", "code")},
        "calibration": calibration, "code_matches_record": record.get("code") == _current_code(cell),
        "weights": {"format": sorted({q.weight_format.name for q in targets}), "linears": len(targets),
                    "inexact_blocks": inexact},
        "native_modules_restored": len(native), "norm_gain_max_rel_change": norm_change,
        "activations": sorted(a.name for a in acts), "folded_online_transforms": folded, "dropped": dropped,
        "quantization_config": qconfig, "versions": _versions(),
    }
    if verify:
        metadata["verification"] = _verify(partial, reference, kept, bool(quantized))
    (partial / METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    if out_dir.exists():
        out_dir.rmdir()  # checked empty above
    partial.rename(out_dir)
    return metadata


def _current_code(cell) -> str:
    from harness.spec.code import method_code_hash

    return method_code_hash(cell.method_module)


def read_metadata(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / METADATA).read_text())
