"""Derived models: an alias for a base model transformed once by a structural method (e.g. CMoE carving
SmolLM2's dense FFNs into experts), built deterministically on first use and cached as safetensors.

A registry entry `{"derived": {"base": alias, "method": name, "params": {...}, "calib": {...}, "seed": 0}}`
names the recipe. The first load runs the method's `calibrate` + `apply` on the base model in float32,
measures base vs derived perplexity (WikiText-2, 16 x 512-token windows) and saves config, weights
(safetensors), tokenizer and `ptqbench_source.json` (the recipe, the code hash, the build's numbers);
later loads rebuild the architecture from the config, let the method restore modules a plain config cannot
describe (`restore_structure`, e.g. CMoE's router), and load the weights strictly.

The fingerprint (what run ids hash) is the recipe, the base model's fingerprint and the hash of the code
that builds it (the method's module and the calibration engine): a code change gives a new cache entry
and new run ids, so a run never reads a model carved by other code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: base vs derived perplexity recorded at build time (a quick check, not a benchmark protocol)
BUILD_PPL = {"dataset": "wikitext2", "seqlen": 512, "max_windows": 16}


def recipe_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The full recipe of a derived alias: base, method (+ version, code hash), params, calib, seed."""
    from harness.registry import get_method
    from harness.spec.code import calib_code_hash

    spec = entry["derived"]
    method = get_method(spec["method"])
    return {"base": spec["base"], "method": spec["method"], "method_version": method.version,
            "params": method.validate_params(spec.get("params") or {}).model_dump(mode="json"),
            "calib": dict(spec["calib"]), "seed": int(spec.get("seed", 0)),
            "code": calib_code_hash(method.__module__)}


def recipe_key(recipe: dict[str, Any]) -> str:
    blob = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_derived(info, dtype: torch.dtype, cache_root: Path | None, load_base):
    """(model, tokenizer, cache dir or None) of a derived alias (`info`: its ModelInfo). `cache_root`: the
    model cache (None: no caching); `load_base(name, dtype=...)`: the loader of the base model
    (harness.models.loading.load_model, passed in so that this module does not import its caller)."""
    from harness.registry import get_method

    recipe = info.recipe
    method_cls = get_method(recipe["method"])
    where = None if cache_root is None else cache_root / f"{info.alias}-{info.content}"
    if where is not None and (where / "ptqbench_source.json").is_file():
        return _load_saved(where, method_cls, dtype), _tokenizer(where), str(where)
    model, tokenizer, build = _build(recipe, method_cls, load_base)
    if where is not None:
        _save(where, model, tokenizer, {**recipe, "build": build})
    return model.to(dtype), tokenizer, None


def build_info(directory: str | os.PathLike) -> dict[str, Any]:
    """What a cached derived model records about its build (recipe, perplexities, timings)."""
    return json.loads((Path(directory) / "ptqbench_source.json").read_text())


def _build(recipe: dict[str, Any], method_cls, load_base):
    from harness.eval.ppl import perplexity
    from harness.method import CalibConfig, CalibContext

    t0 = time.perf_counter()
    model, tokenizer, adapter = load_base(recipe["base"], dtype=torch.float32)
    base_ppl = perplexity(model, tokenizer, **BUILD_PPL).value
    method = method_cls(recipe["params"])
    ctx = CalibContext(model=model, tokenizer=tokenizer, adapter=adapter, scheme=None,
                       calib=CalibConfig(**recipe["calib"]), seed=recipe["seed"])
    with torch.no_grad():
        state = method.calibrate(ctx)
        derived = method.apply(model, adapter, state, None)
    derived.eval().requires_grad_(False)
    derived_ppl = perplexity(derived, tokenizer, **BUILD_PPL).value
    build = {"base_ppl": base_ppl, "derived_ppl": derived_ppl, "ppl_protocol": dict(BUILD_PPL),
             "metrics": method.metrics(derived, ctx), "state_meta": state.meta,
             "build_s": round(time.perf_counter() - t0, 1), "dtype": "float32"}
    return derived, tokenizer, build


def _save(where: Path, model, tokenizer, source: dict[str, Any]) -> None:
    """Atomically (temp dir + rename) save config, safetensors weights, tokenizer and the build record."""
    from safetensors.torch import save_model

    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=f".{where.name}."))
        try:
            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))  # tied tensors stored once
            tokenizer.save_pretrained(tmp)
            (tmp / "ptqbench_source.json").write_text(json.dumps(source, indent=1, default=str))
            os.rename(tmp, where)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the disk is full
    except OSError:
        pass


def _load_saved(where: Path, method_cls, dtype: torch.dtype):
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(where)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    restore = getattr(method_cls, "restore_structure", None)
    if restore is not None:
        restore(model)
    load_model(model, str(where / "model.safetensors"), strict=True)
    return model.to(dtype)


def _tokenizer(where: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(where)
