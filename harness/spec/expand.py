"""From a validated spec to cells: resolve every name, expand the matrix, apply include/exclude rules.

Resolution checks each entry on its own (model, method and params, scheme, task, calib set, rule) and
points an error at its line. Method params are validated here, once; the cells carry the typed
`Params` to the runner.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import harness.spec.catalogs as catalogs
from harness.errors import PtqbenchError
from harness.spec.cells import Cell, TaskSpec
from harness.spec.hashing import calib_key, run_id
from harness.spec.locate import Located, SpecError, load_yaml, one_line, pydantic_error, short
from harness.spec.schema import DEFAULT_THREADS, valid_seed
from harness.spec.schema import (KIND_SETTINGS, MERGED_MAPPINGS, RULE_KEYS, CalibSettings, Matrix, MethodEntry,
                                 SpecFile)


@dataclass
class Spec:
    """A validated spec file (all scales checked); `cells(scale)` expands one scale."""

    data: dict[str, Any]
    file: SpecFile
    where: Located
    _resolved: dict = field(default_factory=dict, repr=False, compare=False)  # scale -> _Resolved

    @property
    def name(self) -> str:
        return self.file.name or Path(self.where.path).stem

    @property
    def scales(self) -> list[str]:
        return sorted(self.file.scales)

    def merged(self, scale: str | None) -> tuple[dict[str, Any], dict[str, tuple]]:
        """Top-level keys with the scale applied, and where each key came from (for error lines)."""
        base = {k: v for k, v in self.data.items() if k in Matrix.model_fields}
        origin = {k: () for k in base}
        if scale is not None:
            if scale not in self.file.scales:
                raise SpecError(f"{self.where.path}: unknown scale {short(scale)}; choose one of: "
                                f"{', '.join(self.scales) or '(spec defines no scales)'}")
            over = self.data["scales"][scale] or {}
            for k, v in over.items():
                if k in MERGED_MAPPINGS or (k == "calib" and isinstance(v, dict) and isinstance(base.get(k), dict)):
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
        raise pydantic_error(where, exc, (), SpecFile) from None
    for key in ("paper", "name"):
        value = data.get(key)
        if value is not None and not _safe_name(value):
            raise where.error((key,), f"invalid {key} {short(value)}; valid: a name of letters, digits, '.', '_', "
                              f"'-' starting with a letter or digit, without '..' (it names files)")
    spec = Spec(data=data, file=file, where=where)
    for scale in [None, *spec.scales] if spec.scales else [None]:
        _resolve(spec, scale, check_only=True)
    return spec


# ----------------------------------------------------------------------------------------------
# expansion


@dataclass
class _Resolved:
    models: list[tuple[str, str | None, tuple]]
    methods: list[tuple[type, Any, str, tuple]]  # (method class, its validated Params, label, location)
    schemes: list[tuple[str, Any, dict[str, Any]]]
    tasks: list[TaskSpec]
    calibs: list[dict[str, Any]]
    seeds: list[int]
    dtype: str
    include: list[dict[str, Any]]
    exclude: list[dict[str, Any]]
    resources: dict[str, float]
    threads: int


def _need(where: Located, merged: dict, origin: dict, key: str, scale: str | None, spec: Spec) -> list:
    value = merged.get(key)
    if value is None:
        hint = f"; pass --scale (one of: {', '.join(spec.scales)})" if spec.scales and scale is None else ""
        raise SpecError(f"{where.path}: no {key} given{hint}")
    if not value:
        raise where.error(origin.get(key, ()) + (key,), f"{key} is empty: the matrix would have no cells")
    return value


def _resolve(spec: Spec, scale: str | None, check_only: bool = False) -> _Resolved | None:
    """Every name of one scale resolved and checked (once per spec: load_spec checks, cells reuses)."""
    if scale not in spec._resolved:
        resolved = _resolve_names(spec, scale, check_only)
        if resolved is None:
            return None
        spec._resolved[scale] = resolved
    return spec._resolved[scale]


def _resolve_names(spec: Spec, scale: str | None, check_only: bool) -> _Resolved | None:
    from harness.registry import get_method

    where = spec.where
    merged, origin = spec.merged(scale)
    if scale is None and spec.scales and check_only and merged.get("models") is None:
        return None  # top level is only a base for the scales; each scale is checked on its own
    loc = lambda key, *rest: origin.get(key, ()) + (key, *rest)  # noqa: E731

    # models
    catalog = catalogs.model_catalog()
    models = []
    for i, entry in enumerate(_need(where, merged, origin, "models", scale, spec)):
        name, _, revision = str(entry).partition("@")
        looks_external = "/" in name or os.path.isdir(name) or name.endswith(".gguf")
        if catalog and name not in catalog and not looks_external:
            raise where.error(loc("models", i), f"unknown model {short(name)}; choose one of: "
                              f"{', '.join(sorted(catalog))} (or a hub id / local path)")
        models.append((name, revision or None, loc("models", i)))

    # methods (+ param variants)
    methods = []
    for i, entry in enumerate(_need(where, merged, origin, "methods", scale, spec)):
        try:
            entry = MethodEntry(name=entry) if isinstance(entry, str) else MethodEntry.model_validate(entry)
        except ValidationError as exc:
            raise pydantic_error(where, exc, loc("methods", i), MethodEntry) from None
        try:
            cls = get_method(entry.name)
        except PtqbenchError as exc:
            raise where.error(loc("methods", i), str(exc)) from None
        if entry.label is not None and not _safe_name(entry.label):
            raise where.error(loc("methods", i, "label"), f"invalid label {short(entry.label)}; valid: letters, "
                              f"digits, '.', '_', '-' starting with a letter or digit, without '..'")
        variants = entry.params if isinstance(entry.params, list) else [entry.params]
        if not variants:
            raise where.error(loc("methods", i, "params"), "params list is empty")
        for j, params in enumerate(variants):
            ploc = loc("methods", i, "params") + ((j,) if isinstance(entry.params, list) else ())
            try:
                validated = cls.validate_params(params)
            except PtqbenchError as exc:
                raise where.error(ploc, str(exc)) from None
            label = entry.label or _method_label(cls, validated.model_dump(mode="json"))
            if isinstance(entry.params, list) and entry.label:
                label = f"{entry.label}[{j}]"
            methods.append((cls, validated, label, ploc))
    seen_labels: dict[str, tuple] = {}
    for _, _, label, mloc in methods:
        if label in seen_labels:
            raise where.error(mloc, f"method label {short(label)} is used twice (also at line "
                              f"{where.line(seen_labels[label])}): results would be pooled; give each a distinct label")
        seen_labels[label] = mloc

    # schemes
    schemes = []
    for i, entry in enumerate(_need(where, merged, origin, "schemes", scale, spec)):
        try:
            schemes.append(catalogs.resolve_scheme(entry))
        except ImportError as exc:
            raise where.error(loc("schemes", i), f"schemes unavailable: {exc}") from None
        except PtqbenchError as exc:
            raise where.error(loc("schemes", i), str(exc)) from None
        except (TypeError, ValueError, ValidationError) as exc:
            raise where.error(loc("schemes", i), f"invalid scheme {short(entry)}: {one_line(exc, 200)}") from None
        earlier = [k for k, (name, _, _) in enumerate(schemes[:-1]) if name == schemes[-1][0]]
        if earlier:
            raise where.error(loc("schemes", i), f"scheme {short(schemes[-1][0])} is listed twice (also at line "
                              f"{where.line(loc('schemes', earlier[0]))}): results would be pooled")

    # task defaults, then tasks
    defaults = {}
    for kind, model in KIND_SETTINGS.items():
        try:
            defaults[kind] = model.model_validate(merged.get(kind) or {}).model_dump()
        except ValidationError as exc:
            raise pydantic_error(where, exc, loc(kind), model) from None
    tasks = _resolve_tasks(where, _need(where, merged, origin, "tasks", scale, spec), defaults, loc)

    calib_raw = merged.get("calib")
    if calib_raw is None:
        calib_raw = {}
    if isinstance(calib_raw, list) and not calib_raw:
        raise where.error(loc("calib"), "calib list is empty; give a mapping {corpus, n, seqlen} or a list of them")
    calib_list = calib_raw if isinstance(calib_raw, list) else [calib_raw]
    calibs = []
    for j, c in enumerate(calib_list):
        cloc = loc("calib") + ((j,) if isinstance(calib_raw, list) else ())
        if not isinstance(c, dict):
            raise where.error(cloc, f"a calib entry is a mapping {{corpus, n, seqlen}}, got {short(c)}")
        try:
            calibs.append(CalibSettings.model_validate(c).model_dump())
        except ValidationError as exc:
            raise pydantic_error(where, exc, cloc, CalibSettings) from None
        corpora = catalogs.calib_corpora()
        if calibs[-1]["corpus"] not in corpora:
            raise where.error(cloc + ("corpus",), f"unknown calibration corpus {short(calibs[-1]['corpus'])}; "
                              f"choose one of: {', '.join(corpora)}")
    if not calibs:
        raise where.error(loc("calib"), "calib list is empty")

    seeds = merged.get("seeds") if merged.get("seeds") is not None else [0]
    if not seeds:
        raise where.error(loc("seeds"), "seeds is empty: the matrix would have no cells")
    for j, seed in enumerate(seeds):
        if not valid_seed(seed):
            raise where.error(loc("seeds", j), f"invalid seed {short(seed)}; valid: an integer 0 <= seed < 2**63")
    include = merged.get("include") or []
    exclude = merged.get("exclude") or []
    matrix = _rule_choices(models, methods, schemes, tasks, calibs, list(seeds))
    for key, rules in (("include", include), ("exclude", exclude)):
        for i, rule in enumerate(rules):
            _check_rule(where, loc(key, i), rule, labels=[label for _, _, label, _ in methods], matrix=matrix)
    return _Resolved(models, methods, schemes, tasks, calibs, list(seeds), merged.get("dtype") or "auto",
                     include, exclude, dict(merged.get("resources") or {}),
                     merged.get("threads") or DEFAULT_THREADS)


def _safe_name(value: Any) -> bool:
    from harness.store import NAME_RE

    return isinstance(value, str) and bool(NAME_RE.fullmatch(value)) and ".." not in value


def _method_label(cls, params: dict[str, Any]) -> str:
    defaults = cls.Params().model_dump(mode="json") if _has_defaults(cls) else {}
    changed = {k: v for k, v in params.items() if defaults.get(k, object()) != v}
    if not changed:
        return cls.name
    return f"{cls.name}(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")"


def _has_defaults(cls) -> bool:
    return all(not f.is_required() for f in cls.Params.model_fields.values())


def _resolve_tasks(where: Located, entries: list, defaults: dict, loc) -> list[TaskSpec]:
    catalog = catalogs.task_catalog()
    tasks, seen = [], set()
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            name, overrides = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, overrides = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        else:
            raise where.error(loc("tasks", i), f"a task is a name or a mapping with a 'name' key, got {short(entry)}")
        if name not in catalog:
            raise where.error(loc("tasks", i), f"unknown task {short(name)}; choose one of: {', '.join(sorted(catalog))}")
        kind = catalog[name]
        settings_cls = KIND_SETTINGS[kind]
        try:
            settings = settings_cls.model_validate({**defaults[kind], **overrides}).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            key = err["loc"][0] if err.get("loc") else None
            if err.get("type") == "extra_forbidden":
                msg = f"unknown setting {short(key)} for {kind} task {short(name)}; valid: {', '.join(settings_cls.model_fields)}"
            else:
                msg = f"{key}: {err.get('msg')} (got {short(err.get('input'))})"
            raise where.error(loc("tasks", i), msg) from None
        if kind in ("kl", "greedy", "routing") and settings["dataset"] not in catalogs.PPL_DATASETS:
            raise where.error(loc("tasks", i), f"unknown {kind} dataset {short(settings['dataset'])}; choose one of: "
                              f"{', '.join(catalogs.PPL_DATASETS)}")
        if name in seen:
            raise where.error(loc("tasks", i), f"task {short(name)} is listed twice")
        seen.add(name)
        tasks.append(TaskSpec(name, kind, settings))
    return tasks


def _rule_choices(models, methods, schemes, tasks, calibs, seeds) -> dict[str, list]:
    """What each rule key can match in this matrix: a rule value outside it would silently match nothing."""
    labels = []
    for cls, _, label, _ in methods:
        labels += [cls.name, label]
        if cls.needs_calibration and len(calibs) > 1:
            labels += [f"{label}[{c['corpus']} {c['n']}x{c['seqlen']}]" for c in calibs]
    scheme_names = [name for name, _, _ in schemes]
    if any(not cls.uses_scheme for cls, _, _, _ in methods):
        scheme_names.append(catalogs.BASELINE_SCHEME)
    seed_values = list(seeds) + ([None] if any(not cls.uses_seed for cls, _, _, _ in methods) else [])
    return {"model": list(dict.fromkeys(name for name, _, _ in models)), "method": list(dict.fromkeys(labels)),
            "scheme": list(dict.fromkeys(scheme_names)), "task": [t.name for t in tasks], "seed": seed_values,
            "params": [p.model_dump(mode="json") for _, p, _, _ in methods]}


def _choices(values: list) -> str:
    return one_line(", ".join(str(v) for v in values), 400)


def _check_rule(where: Located, rloc: tuple, rule: Any, labels: list[str] = (), matrix: dict | None = None) -> None:
    from harness.registry import list_methods

    if not isinstance(rule, dict) or not rule:
        raise where.error(rloc, f"an include/exclude rule is a non-empty mapping, got {short(rule)}")
    for key, value in rule.items():
        if key not in RULE_KEYS:
            raise where.error(rloc + (key,), f"unknown rule key {short(key)}; choose one of: {', '.join(RULE_KEYS)}")
        if key == "params":
            if not isinstance(value, dict):
                raise where.error(rloc + (key,), f"params in a rule must be a mapping, got {short(value)}")
            if matrix is not None:
                variants = matrix["params"]
                for k, v in value.items():
                    if not any(k in p for p in variants):
                        known = sorted({name for p in variants for name in p})
                        raise where.error(rloc + (key, k), f"no method in the matrix has a param {short(k)}; "
                                          f"choose one of: {_choices(known)}")
                    if not any(p.get(k) == v for p in variants if k in p):
                        seen = list(dict.fromkeys(repr(p[k]) for p in variants if k in p))
                        raise where.error(rloc + (key, k), f"no method in the matrix has {k}={short(v)}; "
                                          f"its values: {_choices(seen)}")
                if not any(all(p.get(k) == v for k, v in value.items()) for p in variants):
                    raise where.error(rloc + (key,), f"no method in the matrix has all of the params {short(value)}")
            continue
        values = value if isinstance(value, list) else [value]
        if key == "method":  # a registered method name or a label of this spec's methods
            methods = list_methods()
            known = [*methods, *(label for label in labels if label not in methods)]
            for v in values:
                if v not in labels and str(v).split("(")[0] not in methods:
                    raise where.error(rloc + (key,), f"unknown method {short(v)}; choose one of: {_choices(known)}")
        elif key == "task":
            catalog = catalogs.task_catalog()
            for v in values:
                if v not in catalog:
                    raise where.error(rloc + (key,), f"unknown task {short(v)}; choose one of: {', '.join(sorted(catalog))}")
        elif key == "seed":
            for v in values:
                if not valid_seed(v):
                    raise where.error(rloc + (key,), f"invalid seed {short(v)}; valid: an integer 0 <= seed < 2**63")
        if matrix is not None:
            for v in values:
                if v not in matrix[key] or (key != "seed" and not isinstance(v, (str, int))):
                    raise where.error(rloc + (key,), f"{key} {short(v)} names nothing in the matrix; "
                                      f"choose one of: {_choices(matrix[key])}")


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
    device = device or catalogs.default_device()
    dtype = catalogs.resolve_dtype(resolved.dtype, device)
    cells: dict[tuple, Cell] = {}
    total = 0
    for model, revision, _ in resolved.models:
        source = catalogs.model_source(model, revision) if resolve_sources else {"name": model, "revision": revision}
        for cls, params, label, _ in resolved.methods:
            schemes = resolved.schemes if cls.uses_scheme else [catalogs.baseline_scheme()]
            for scheme_name, scheme, scheme_config in schemes:
                for calib in resolved.calibs:
                    for seed in (resolved.seeds if cls.uses_seed else [None]):
                        # several calibration sets: name them in the label, or tables would pool them
                        cell_label = label
                        if cls.needs_calibration and len(resolved.calibs) > 1:
                            cell_label = f"{label}[{calib['corpus']} {calib['n']}x{calib['seqlen']}]"
                        cell = Cell(
                            spec_name=spec.name, model=model, revision=revision, model_source=source,
                            method=cls.name, method_label=cell_label, params=params,
                            method_version=int(cls.version), method_module=cls.__module__, scheme_name=scheme_name, scheme=scheme,
                            scheme_config=scheme_config,
                            calib=calib if cls.needs_calibration else {}, seed=seed, dtype=dtype,
                            device=device, tasks=list(resolved.tasks), scale=scale,
                            resources=resolved.resources, threads=resolved.threads,
                        )
                        total += len(cell.tasks)
                        keep = [t for t in cell.tasks
                                if (not resolved.include or any(rule_matches(r, cell, t.name) for r in resolved.include))
                                and not any(rule_matches(r, cell, t.name) for r in resolved.exclude)]
                        if not keep or cell.key in cells:
                            continue
                        cell.tasks = keep
                        cell.run_ids = {t.name: run_id(cell, t) for t in keep}
                        method = cls(params)  # already a cls.Params: not validated again
                        cell.calib_key = calib_key(cell, method.calib_scheme_key(scheme)) if cls.needs_calibration else ""
                        cells[cell.key] = cell
    if not cells:
        raise SpecError(f"{spec.where.path}: the matrix is empty after include/exclude "
                        f"({total} (cell, task) pairs before filtering)")
    return list(cells.values())
