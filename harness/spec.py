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
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from harness.errors import PtqbenchError

# ----------------------------------------------------------------------------------------------
# errors


class SpecError(PtqbenchError, ValueError):
    """A bad experiment spec: one line, `file:line: what is wrong; the choices`."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# settings models (pydantic): typed, unknown keys rejected


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibSettings(_Strict):
    corpus: str = "c4"
    n: PositiveInt = 128
    seqlen: PositiveInt = 2048


class PplSettings(_Strict):
    seqlen: PositiveInt = 2048
    max_windows: PositiveInt | None = None
    batch_size: PositiveInt = 1  # speed only: not part of the run id


class LmEvalSettings(_Strict):
    limit: PositiveInt | None = None
    num_fewshot: NonNegativeInt = 0
    batch_size: PositiveInt = 8  # speed only: not part of the run id


class KlSettings(_Strict):
    dataset: str = "wikitext2"
    seqlen: PositiveInt = 512
    max_windows: PositiveInt = 8
    topk: PositiveInt = 64  # FP top-k logits kept per token (+ one tail bucket); harness.eval.DEFAULT_TOPK


_KIND_SETTINGS: dict[str, type[_Strict]] = {"ppl": PplSettings, "lm_eval": LmEvalSettings, "kl": KlSettings}
_NOT_HASHED = {"lm_eval": {"batch_size"}, "ppl": {"batch_size"}}


class MethodEntry(_Strict):
    name: str
    params: Union[dict[str, Any], list[dict[str, Any]]] = Field(default_factory=dict)
    label: str | None = None


class _Matrix(_Strict):
    """The keys a scale may override."""

    # entries are checked one by one in `_resolve` (better errors than pydantic unions give)
    models: list[str] | None = None
    methods: list[Any] | None = None
    schemes: list[Any] | None = None
    tasks: list[Any] | None = None
    seeds: list[int] | None = None
    calib: Union[dict[str, Any], list[Any]] | None = None
    ppl: dict[str, Any] | None = None
    lm_eval: dict[str, Any] | None = None
    kl: dict[str, Any] | None = None
    include: list[Any] | None = None
    exclude: list[Any] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    # what one cell asks the scheduler for (Ray), e.g. {num_gpus: 2}; not part of any run id
    resources: dict[Literal["num_gpus", "num_cpus"], float] | None = None


class SpecFile(_Matrix):
    """The whole YAML file."""

    name: str | None = None
    title: str | None = None
    description: str | None = None
    paper: str | None = None
    notes: str | None = None
    claims: list[Any] | None = None  # read by the report, not by the runner
    reported: list[Any] | None = None
    scales: dict[str, _Matrix] = Field(default_factory=dict)


_MERGED_MAPPINGS = ("ppl", "lm_eval", "kl")
_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}
RULE_KEYS = ("model", "method", "params", "scheme", "seed", "task")


# ----------------------------------------------------------------------------------------------
# resolved objects


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "ppl" | "lm_eval" | "kl"
    settings: dict[str, Any]

    @property
    def protocol(self) -> dict[str, Any]:
        """The settings that change the number (hashed into the run id)."""
        skip = _NOT_HASHED.get(self.kind, set())
        return {k: v for k, v in self.settings.items() if k not in skip}


@dataclass
class Cell:
    """One (model, method + params, scheme, calib, seed) with its tasks and their run ids."""

    spec_name: str
    model: str
    revision: str | None
    model_source: dict[str, Any]
    method: str
    method_label: str
    method_params: dict[str, Any]
    method_version: int
    scheme_name: str | None
    scheme: Any
    scheme_config: dict[str, Any] | None
    calib: dict[str, Any]
    seed: int | None  # None: the method draws no random numbers (the runner still seeds with 0)
    dtype: str
    device: str
    tasks: list[TaskSpec]
    run_ids: dict[str, str] = field(default_factory=dict)  # task name -> run id
    calib_key: str = ""
    scale: str | None = None
    resources: dict[str, float] = field(default_factory=dict)  # scheduler request; never hashed

    @property
    def key(self) -> tuple:
        return (self.model, self.revision, self.method, _canon(self.method_params), self.scheme_name,
                _canon(self.scheme_config), _canon(self.calib), self.seed)

    def with_tasks(self, names: set[str]) -> "Cell":
        return replace(self, tasks=[t for t in self.tasks if t.name in names],
                       run_ids={k: v for k, v in self.run_ids.items() if k in names})

    def describe(self) -> str:
        scheme = self.scheme_name or "-"
        return f"{self.model} | {self.method_label} | {scheme} | seed {self.seed}"


# ----------------------------------------------------------------------------------------------
# hashing


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    from importlib import metadata

    import harness

    out = {"ptqbench": harness.__version__}
    for dist in ("torch", "transformers", "lm-eval"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def versions_for(task_kind: str | None) -> dict[str, str]:
    """Library versions that can move a number of this kind (lm-eval only for lm-eval tasks)."""
    v = library_versions()
    keep = ["ptqbench", "torch", "transformers"] + (["lm-eval"] if task_kind == "lm_eval" else [])
    return {k: v[k] for k in keep}


def _model_identity(cell: Cell) -> dict[str, Any]:
    return {"model": cell.model, "revision": cell.revision, "source": cell.model_source,
            "dtype": cell.dtype, "device": cell.device}


def calib_key(cell: Cell, calib_scheme: Any) -> str:
    """Cache key of a cell's calibration state: no task, and only the scheme part the method uses."""
    return content_hash({
        "kind": "calib", **_model_identity(cell), "method": cell.method, "params": cell.method_params,
        "method_version": cell.method_version, "calib": cell.calib, "seed": cell.seed,
        "scheme": calib_scheme, "versions": versions_for(None),
    }, 20)


def run_key(cell: Cell, task: TaskSpec) -> dict[str, Any]:
    """Everything that changes the number of one (cell, task) run."""
    return {
        "kind": "run", **_model_identity(cell), "method": cell.method, "params": cell.method_params,
        "method_version": cell.method_version, "scheme": cell.scheme_config, "calib": cell.calib,
        "seed": cell.seed, "task": task.name, "task_kind": task.kind, "protocol": task.protocol,
        "versions": versions_for(task.kind),
    }


def run_id(cell: Cell, task: TaskSpec) -> str:
    return content_hash(run_key(cell, task))


# ----------------------------------------------------------------------------------------------
# catalogs (the names a spec may use); small functions so tests can substitute them


PPL_DATASETS = ("wikitext2", "c4", "ptb")


def task_catalog() -> dict[str, str]:
    """Known task names -> kind ("ppl", "lm_eval", "kl")."""
    out = {name: "ppl" for name in PPL_DATASETS}
    try:
        from harness import eval as heval

        kinds = getattr(heval, "task_kinds", None)
        if callable(kinds):
            out.update(kinds())
        else:
            for name in heval.list_tasks():
                out.setdefault(name, "lm_eval")
    except (ImportError, AttributeError):
        pass
    out["kl"] = "kl"
    return out


def calib_corpora() -> list[str]:
    try:
        from harness.data import CALIB_CORPORA

        return sorted(CALIB_CORPORA)
    except ImportError:
        return ["c4", "wikitext2"]


def model_catalog() -> list[str]:
    try:
        from harness.models import list_models

        return list(list_models())
    except ImportError:
        return []


def model_source(name: str, revision: str | None) -> dict[str, Any]:
    """What the model name resolves to (hub id + revision, or a file fingerprint); part of the run id."""
    try:
        from harness import models as hmodels

        fingerprint = getattr(hmodels, "model_fingerprint", None)
        if callable(fingerprint):
            return dict(fingerprint(name, revision))
    except ImportError:
        pass
    return {"name": name, "revision": revision}


def resolve_scheme(entry: str | dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """(label, scheme object, scheme.to_dict()) for a preset name or an inline dict."""
    from harness import quant

    if isinstance(entry, str):
        scheme = quant.get_scheme(entry)
        label = entry
    else:
        data = dict(entry)
        builder = getattr(quant.QuantScheme, "from_dict", None)
        scheme = builder(data) if callable(builder) else quant.QuantScheme(**data)
        label = data.get("name") or f"custom-{content_hash(data, 8)}"
    config = scheme.to_dict()
    return str(label), scheme, config


BASELINE_SCHEME = "w16a16"


def baseline_scheme() -> tuple[str, Any, dict[str, Any] | None]:
    """The scheme cell of methods that ignore schemes (FP): named w16a16, as the reports expect."""
    try:
        return resolve_scheme(BASELINE_SCHEME)
    except (ImportError, PtqbenchError):
        return BASELINE_SCHEME, None, None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


# ----------------------------------------------------------------------------------------------
# loading with line numbers


class _Located:
    """Maps a key path (e.g. ("methods", 2, "params")) to its line in the YAML file."""

    def __init__(self, path: str, node: yaml.Node | None):
        self.path, self.node = path, node

    def line(self, loc: tuple) -> int | None:
        node, best = self.node, None
        for part in loc:
            if node is None:
                break
            best = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                nxt = None
                for k, v in node.value:
                    if k.value == str(part):
                        nxt, best = v, k.start_mark.line + 1
                        break
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
            else:
                node = None
        if node is not None:
            best = node.start_mark.line + 1
        return best

    def error(self, loc: tuple, message: str) -> SpecError:
        line = self.line(loc) if loc else None
        where = f"{self.path}:{line}" if line else self.path
        keys = ".".join(str(p) for p in loc)
        return SpecError(_one_line(f"{where}: {keys + ': ' if keys else ''}{message}"))


def _pydantic_error(where: _Located, exc: ValidationError, prefix: tuple = (),
                    model: type[BaseModel] | None = None) -> SpecError:
    """One line from the most specific pydantic error, located in the file."""
    errors = exc.errors()
    err = next((e for e in errors if e.get("type") == "extra_forbidden"), None) or max(errors, key=lambda e: len(e["loc"]))
    loc = tuple(err.get("loc", ()))
    # drop union-branch labels such as 'str' or 'list[int]' that pydantic puts into the location
    loc = prefix + tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_LABELS)))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        owner = _owner(loc[len(prefix):-1], model)
        allowed = f"; valid keys: {', '.join(owner.model_fields)}" if owner else ""
        return where.error(loc, f"unknown key {loc[-1]!r}{allowed}")
    value = err.get("input")
    if not isinstance(value, dict):
        msg = f"{msg} (got {value!r})"
    return where.error(loc, msg)


def _owner(rel: tuple, model: type[BaseModel] | None) -> type[BaseModel] | None:
    if not rel:
        return model
    if model is SpecFile and len(rel) == 2 and rel[0] == "scales":
        return _Matrix
    return None


def load_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], _Located]:
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec {path!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(_one_line(f"{where}: malformed YAML: {problem}")) from None
    if data is None:
        raise SpecError(f"{path}: spec is empty; expected a mapping with models, methods, schemes, tasks")
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: spec must be a mapping of keys, got {type(data).__name__}")
    return data, _Located(path, node)


# ----------------------------------------------------------------------------------------------
# the spec


@dataclass
class Spec:
    """A validated spec file (all scales checked); `cells(scale)` expands one scale."""

    data: dict[str, Any]
    file: SpecFile
    where: _Located

    @property
    def name(self) -> str:
        return self.file.name or Path(self.where.path).stem

    @property
    def scales(self) -> list[str]:
        return sorted(self.file.scales)

    def merged(self, scale: str | None) -> tuple[dict[str, Any], dict[str, tuple]]:
        """Top-level keys with the scale applied, and where each key came from (for error lines)."""
        base = {k: v for k, v in self.data.items() if k in _Matrix.model_fields}
        origin = {k: () for k in base}
        if scale is not None:
            if scale not in self.file.scales:
                raise SpecError(f"{self.where.path}: unknown scale {scale!r}; choose one of: "
                                f"{', '.join(self.scales) or '(spec defines no scales)'}")
            over = self.data["scales"][scale] or {}
            for k, v in over.items():
                if k in _MERGED_MAPPINGS or (k == "calib" and isinstance(v, dict) and isinstance(base.get(k), dict)):
                    base[k] = {**(base.get(k) or {}), **(v or {})}
                else:
                    base[k] = copy.deepcopy(v)
                origin[k] = ("scales", scale)
        return base, origin

    def cells(self, scale: str | None = None, device: str | None = None, resolve_sources: bool = True) -> list[Cell]:
        return expand(self, scale, device=device, resolve_sources=resolve_sources)


def load_spec(path: str | os.PathLike) -> Spec:
    """Parse and validate a spec file; every scale is checked, so a typo in `full` fails a smoke run."""
    data, where = load_yaml(path)
    try:
        file = SpecFile.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(where, exc, (), SpecFile) from None
    spec = Spec(data=data, file=file, where=where)
    for scale in [None, *spec.scales] if spec.scales else [None]:
        _resolve(spec, scale, check_only=True)
    return spec


# ----------------------------------------------------------------------------------------------
# expansion


@dataclass
class _Resolved:
    models: list[tuple[str, str | None, tuple]]
    methods: list[tuple[type, dict[str, Any], str, tuple]]
    schemes: list[tuple[str, Any, dict[str, Any]]]
    tasks: list[TaskSpec]
    calibs: list[dict[str, Any]]
    seeds: list[int]
    dtype: str
    include: list[dict[str, Any]]
    exclude: list[dict[str, Any]]
    resources: dict[str, float]


def _need(where: _Located, merged: dict, origin: dict, key: str, scale: str | None, spec: Spec) -> list:
    value = merged.get(key)
    if value is None:
        hint = f"; pass --scale (one of: {', '.join(spec.scales)})" if spec.scales and scale is None else ""
        raise SpecError(f"{where.path}: no {key} given{hint}")
    if not value:
        raise where.error(origin.get(key, ()) + (key,), f"{key} is empty: the matrix would have no cells")
    return value


def _resolve(spec: Spec, scale: str | None, check_only: bool = False) -> _Resolved | None:
    from harness.registry import get_method

    where = spec.where
    merged, origin = spec.merged(scale)
    if scale is None and spec.scales and check_only and merged.get("models") is None:
        return None  # top level is only a base for the scales; each scale is checked on its own
    loc = lambda key, *rest: origin.get(key, ()) + (key, *rest)  # noqa: E731

    # models
    catalog = model_catalog()
    models = []
    for i, entry in enumerate(_need(where, merged, origin, "models", scale, spec)):
        name, _, revision = str(entry).partition("@")
        looks_external = "/" in name or os.path.isdir(name) or name.endswith(".gguf")
        if catalog and name not in catalog and not looks_external:
            raise where.error(loc("models", i), f"unknown model {name!r}; choose one of: "
                              f"{', '.join(sorted(catalog))} (or a hub id / local path)")
        models.append((name, revision or None, loc("models", i)))

    # methods (+ param variants)
    methods = []
    for i, entry in enumerate(_need(where, merged, origin, "methods", scale, spec)):
        try:
            entry = MethodEntry(name=entry) if isinstance(entry, str) else MethodEntry.model_validate(entry)
        except ValidationError as exc:
            raise _pydantic_error(where, exc, loc("methods", i), MethodEntry) from None
        try:
            cls = get_method(entry.name)
        except PtqbenchError as exc:
            raise where.error(loc("methods", i), str(exc)) from None
        variants = entry.params if isinstance(entry.params, list) else [entry.params]
        if not variants:
            raise where.error(loc("methods", i, "params"), "params list is empty")
        for j, params in enumerate(variants):
            ploc = loc("methods", i, "params") + ((j,) if isinstance(entry.params, list) else ())
            try:
                validated = cls.validate_params(params)
            except PtqbenchError as exc:
                raise where.error(ploc, str(exc)) from None
            full = validated.model_dump(mode="json")
            label = entry.label or _method_label(cls, full)
            if isinstance(entry.params, list) and entry.label:
                label = f"{entry.label}[{j}]"
            methods.append((cls, full, label, ploc))

    # schemes
    schemes = []
    for i, entry in enumerate(_need(where, merged, origin, "schemes", scale, spec)):
        try:
            schemes.append(resolve_scheme(entry))
        except ImportError as exc:
            raise where.error(loc("schemes", i), f"schemes unavailable: {exc}") from None
        except PtqbenchError as exc:
            raise where.error(loc("schemes", i), str(exc)) from None
        except (TypeError, ValueError, ValidationError) as exc:
            raise where.error(loc("schemes", i), f"invalid scheme {entry!r}: {_one_line(exc)}") from None

    # task defaults, then tasks
    defaults = {}
    for kind, model in _KIND_SETTINGS.items():
        try:
            defaults[kind] = model.model_validate(merged.get(kind) or {}).model_dump()
        except ValidationError as exc:
            raise _pydantic_error(where, exc, loc(kind), model) from None
    tasks = _resolve_tasks(where, _need(where, merged, origin, "tasks", scale, spec), defaults, loc)

    calib_raw = merged.get("calib") or {}
    calib_list = calib_raw if isinstance(calib_raw, list) else [calib_raw]
    calibs = []
    for j, c in enumerate(calib_list):
        cloc = loc("calib") + ((j,) if isinstance(calib_raw, list) else ())
        try:
            calibs.append(CalibSettings.model_validate(c).model_dump())
        except ValidationError as exc:
            raise _pydantic_error(where, exc, cloc, CalibSettings) from None
        corpora = calib_corpora()
        if calibs[-1]["corpus"] not in corpora:
            raise where.error(cloc + ("corpus",), f"unknown calibration corpus {calibs[-1]['corpus']!r}; "
                              f"choose one of: {', '.join(corpora)}")
    if not calibs:
        raise where.error(loc("calib"), "calib list is empty")

    seeds = merged.get("seeds") if merged.get("seeds") is not None else [0]
    if not seeds:
        raise where.error(loc("seeds"), "seeds is empty: the matrix would have no cells")
    include = merged.get("include") or []
    exclude = merged.get("exclude") or []
    for key, rules in (("include", include), ("exclude", exclude)):
        for i, rule in enumerate(rules):
            _check_rule(where, loc(key, i), rule, labels=[label for _, _, label, _ in methods])
    return _Resolved(models, methods, schemes, tasks, calibs, list(seeds), merged.get("dtype") or "auto",
                     include, exclude, dict(merged.get("resources") or {}))


def _method_label(cls, params: dict[str, Any]) -> str:
    defaults = cls.Params().model_dump(mode="json") if _has_defaults(cls) else {}
    changed = {k: v for k, v in params.items() if defaults.get(k, object()) != v}
    if not changed:
        return cls.name
    return f"{cls.name}(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")"


def _has_defaults(cls) -> bool:
    return all(not f.is_required() for f in cls.Params.model_fields.values())


def _resolve_tasks(where: _Located, entries: list, defaults: dict, loc) -> list[TaskSpec]:
    catalog = task_catalog()
    tasks, seen = [], set()
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            name, overrides = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, overrides = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        else:
            raise where.error(loc("tasks", i), f"a task is a name or a mapping with a 'name' key, got {entry!r}")
        if name not in catalog:
            raise where.error(loc("tasks", i), f"unknown task {name!r}; choose one of: {', '.join(sorted(catalog))}")
        kind = catalog[name]
        settings_cls = _KIND_SETTINGS[kind]
        try:
            settings = settings_cls.model_validate({**defaults[kind], **overrides}).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            key = err["loc"][0] if err.get("loc") else None
            if err.get("type") == "extra_forbidden":
                msg = f"unknown setting {key!r} for {kind} task {name!r}; valid: {', '.join(settings_cls.model_fields)}"
            else:
                msg = f"{key}: {err.get('msg')} (got {err.get('input')!r})"
            raise where.error(loc("tasks", i), msg) from None
        if kind == "kl" and settings["dataset"] not in PPL_DATASETS:
            raise where.error(loc("tasks", i), f"unknown kl dataset {settings['dataset']!r}; choose one of: "
                              f"{', '.join(PPL_DATASETS)}")
        if name in seen:
            raise where.error(loc("tasks", i), f"task {name!r} is listed twice")
        seen.add(name)
        tasks.append(TaskSpec(name, kind, settings))
    return tasks


def _check_rule(where: _Located, rloc: tuple, rule: Any, labels: list[str] = ()) -> None:
    from harness.registry import list_methods

    if not isinstance(rule, dict) or not rule:
        raise where.error(rloc, f"an include/exclude rule is a non-empty mapping, got {rule!r}")
    for key, value in rule.items():
        if key not in RULE_KEYS:
            raise where.error(rloc + (key,), f"unknown rule key {key!r}; choose one of: {', '.join(RULE_KEYS)}")
        if key == "params":
            if not isinstance(value, dict):
                raise where.error(rloc + (key,), f"params in a rule must be a mapping, got {value!r}")
            continue
        values = value if isinstance(value, list) else [value]
        if key == "method":  # a registered method name or a label of this spec's methods
            methods = list_methods()
            known = [*methods, *(label for label in labels if label not in methods)]
            for v in values:
                if v not in labels and str(v).split("(")[0] not in methods:
                    raise where.error(rloc + (key,), f"unknown method {v!r}; choose one of: {', '.join(known)}")
        elif key == "task":
            catalog = task_catalog()
            for v in values:
                if v not in catalog:
                    raise where.error(rloc + (key,), f"unknown task {v!r}; choose one of: {', '.join(sorted(catalog))}")
        elif key == "seed":
            for v in values:
                if not isinstance(v, int):
                    raise where.error(rloc + (key,), f"seed must be an integer, got {v!r}")


def _value_matches(rule_value: Any, actual: Any) -> bool:
    values = rule_value if isinstance(rule_value, list) else [rule_value]
    return any(v == actual or (v is None and actual is None) for v in values)


def rule_matches(rule: dict[str, Any], cell: Cell, task: str) -> bool:
    for key, value in rule.items():
        if key == "model":
            ok = _value_matches(value, cell.model)
        elif key == "method":
            ok = _value_matches(value, cell.method) or _value_matches(value, cell.method_label)
        elif key == "params":
            ok = all(cell.method_params.get(k) == v for k, v in value.items())
        elif key == "scheme":
            ok = _value_matches(value, cell.scheme_name)
        elif key == "seed":
            ok = _value_matches(value, cell.seed)
        else:  # task
            ok = _value_matches(value, task)
        if not ok:
            return False
    return True


def expand(spec: Spec, scale: str | None = None, device: str | None = None, resolve_sources: bool = True) -> list[Cell]:
    """All cells of one scale, include/exclude applied, duplicates merged, run ids computed."""
    resolved = _resolve(spec, scale)
    assert resolved is not None
    device = device or default_device()
    dtype = resolve_dtype(resolved.dtype, device)
    cells: dict[tuple, Cell] = {}
    total = 0
    for model, revision, _ in resolved.models:
        source = model_source(model, revision) if resolve_sources else {"name": model, "revision": revision}
        for cls, params, label, _ in resolved.methods:
            schemes = resolved.schemes if cls.uses_scheme else [baseline_scheme()]
            for scheme_name, scheme, scheme_config in schemes:
                for calib in resolved.calibs:
                    for seed in (resolved.seeds if cls.uses_seed else [None]):
                        # several calibration sets: name them in the label, or tables would pool them
                        cell_label = label
                        if cls.needs_calibration and len(resolved.calibs) > 1:
                            cell_label = f"{label}[{calib['corpus']} {calib['n']}x{calib['seqlen']}]"
                        cell = Cell(
                            spec_name=spec.name, model=model, revision=revision, model_source=source,
                            method=cls.name, method_label=cell_label, method_params=params,
                            method_version=int(cls.version), scheme_name=scheme_name, scheme=scheme,
                            scheme_config=scheme_config,
                            calib=calib if cls.needs_calibration else {}, seed=seed, dtype=dtype,
                            device=device, tasks=list(resolved.tasks), scale=scale,
                            resources=resolved.resources,
                        )
                        total += len(cell.tasks)
                        keep = [t for t in cell.tasks
                                if (not resolved.include or any(rule_matches(r, cell, t.name) for r in resolved.include))
                                and not any(rule_matches(r, cell, t.name) for r in resolved.exclude)]
                        if not keep or cell.key in cells:
                            continue
                        cell.tasks = keep
                        cell.run_ids = {t.name: run_id(cell, t) for t in keep}
                        method = cls(params)
                        cell.calib_key = calib_key(cell, method.calib_scheme_key(scheme)) if cls.needs_calibration else ""
                        cells[cell.key] = cell
    if not cells:
        raise SpecError(f"{spec.where.path}: the matrix is empty after include/exclude "
                        f"({total} (cell, task) pairs before filtering)")
    return list(cells.values())
