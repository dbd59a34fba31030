"""Experiment specs: a YAML matrix, validated, expanded into cells, each run named by a content hash.

    name: smoke                           # default: the file name
    models: [smollm2-135m]                # registry names, hub ids or local dirs; "name@revision" pins one
    methods:
      - fp
      - rtn
      - {name: gptq, params: {damp: 0.01}}
      - {name: gptq, params: [{act_order: false}, {act_order: true}]}   # one cell per variant
    schemes: [w4a16_g128, {name: my_w4, weight: int4_g64}]             # presets or inline dicts
    tasks: [wikitext2, {name: c4, seqlen: 512}, {name: piqa, limit: 200}, kl]
    ppl: {seqlen: 2048, max_windows: null}          # defaults for perplexity tasks
    lm_eval: {limit: null, num_fewshot: 0}           # defaults for lm-eval tasks
    kl: {dataset: wikitext2, seqlen: 512, max_windows: 8}
    calib: {corpus: c4, n: 128, seqlen: 2048}        # or a list of such dicts (one cell each)
    seeds: [0]
    dtype: auto                                      # float32 on CPU, bfloat16 on CUDA
    exclude: [{method: gptq, scheme: mxfp4}]         # drop matching (cell, task) pairs
    include: [...]                                   # if given, keep only matching (cell, task) pairs
    scales:
      smoke: {models: [smollm2-135m], ppl: {seqlen: 512, max_windows: 8}, calib: {n: 16}}

A scale overrides top-level keys: mappings (calib, ppl, lm_eval, kl) are merged key by key, every
other key is replaced. include/exclude rules match cell fields: model, method (name or label),
params (a subset of the method params), scheme, seed, task; a value may be a list (any of).

A cell is (model, method + params, scheme, calib, seed) with its task list. Every (cell, task) is one
run whose id is a short sha256 of everything that changes its number (see `run_key`); the
calibration cache key (see `calib_key`) leaves the task out, so adding a task never recalibrates.
Methods that ignore the scheme (the FP baseline) get a single cell with scheme `w16a16`; methods
that draw no random numbers get a single cell with seed None.

The package, by job: `schema` (the YAML's pydantic models), `locate` (loading, errors at their line),
`catalogs` (the names a spec may use; tests substitute them there), `cells` (Cell, TaskSpec),
`hashing` (run ids, calibration keys, library versions), `expand` (resolution, matrix, rules).
"""
from harness.spec.catalogs import (BASELINE_SCHEME, PPL_DATASETS, baseline_scheme, calib_corpora, default_device,
                                   model_catalog, model_source, resolve_dtype, resolve_scheme, task_catalog)
from harness.spec.cells import Cell, TaskSpec
from harness.spec.expand import Spec, expand, load_spec, rule_matches
from harness.spec.hashing import calib_key, content_hash, library_versions, run_id, run_key, versions_for
from harness.spec.locate import SpecError, load_yaml
from harness.spec.schema import (RULE_KEYS, CalibSettings, KlSettings, LmEvalSettings, MethodEntry, PplSettings,
                                 SpecFile)

__all__ = [
    "BASELINE_SCHEME", "PPL_DATASETS", "RULE_KEYS", "CalibSettings", "Cell", "KlSettings", "LmEvalSettings",
    "MethodEntry", "PplSettings", "Spec", "SpecError", "SpecFile", "TaskSpec", "baseline_scheme", "calib_corpora",
    "calib_key", "content_hash", "default_device", "expand", "library_versions", "load_spec", "load_yaml",
    "model_catalog", "model_source", "resolve_dtype", "resolve_scheme", "rule_matches", "run_id", "run_key",
    "task_catalog", "versions_for",
]
