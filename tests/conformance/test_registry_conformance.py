"""Conformance of every registered method (built-ins and `ptqbench.methods` entry-point plugins).

Per method, on a tiny dense model (llama, gemma3), a tiny MoE (qwen3_moe) and a tiny llama carved into a
Qwen2-MoE by CMoE (`tiny-llama-cmoe`: real carved experts, a shared expert and CMoE's router):

  a. params: the defaults validate, an unknown param and an ill-typed numeric/bool/Literal value are
     one-line `InvalidParamsError`s;
  b. state: `calibrate` returns a `harness.state.State` that survives save/load (`states_equal`);
  c. quantizers off: calibrate + apply with `w16a16` leaves the logits unchanged (max |Δ| / max |ref| <= 1e-4);
  d. determinism: two calibrations with the same seed give equal states (`meta`, which holds run
     diagnostics such as timings and peak memory, is not compared);
  e. MoE: with a weight-quantizing scheme every expert slice of every fused `gate_up_proj` / `down_proj`
     changes (skipped for methods with `uses_scheme = False`).

A method may refuse a model or a scheme only with a one-line `PtqbenchError` (the check is then skipped
with the reason); any other exception fails. To stay fast each method runs with its `conformance_params`
class attribute (the smallest params that still run the real algorithm); calibrations are cached and
shared between the checks.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal

import pytest
import torch

from harness.errors import PtqbenchError
from harness.method import CalibConfig, CalibContext, InvalidParamsError
from harness.models import get_adapter, load_model, make_tiny_model
from harness.quant import get_scheme
from harness.registry import broken_methods, get_method, list_methods
from harness.state import State, state_difference

METHODS = list_methods()
FAMILIES = ["llama", "qwen3_moe", "gemma3", "llama_cmoe"]
MOE_FAMILIES = ["qwen3_moe", "llama_cmoe"]
#: families that are model aliases rather than tiny random families
ALIAS_FAMILIES = {"llama_cmoe": "tiny-llama-cmoe"}
#: Scheme of the state, determinism and MoE checks: weights, activations and the KV cache quantized.
QUANT_SCHEME = "w4a4kv4"
OFF_SCHEME = "w16a16"
CALIB = CalibConfig(corpus="c4", n=4, seqlen=64)
EVAL_WINDOWS = (2, 64)  # held-out windows for the quantizers-off check
OFF_TOLERANCE = 1e-4
SEED = 0

#: Methods that compress by design even without quantizers run the checks at the setting where they are
#: lossless (CSKV keeps every channel), so "quantizers off" still means "the model unchanged".
LOSSLESS_PARAMS = {"cskv": {"key_density": 1.0, "value_density": 1.0},
                   "cmoe": {"num_experts": 4, "shared_experts": 1, "active_experts": 3}}


def tiny_model(family: str, seed: int = 0):
    """(model, tokenizer, adapter) of a tiny family, or of the alias standing for one (built once, cached)."""
    if family in ALIAS_FAMILIES:
        return load_model(ALIAS_FAMILIES[family])
    return make_tiny_model(family, seed=seed)


def conformance_params(name: str) -> dict[str, Any]:
    cls = get_method(name)
    # quarot's {} keeps its GPTQ solver: solved weights in a rotation state
    return {**cls.conformance_params, **LOSSLESS_PARAMS.get(name, {})}


# ---- shared calibrations -----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One calibration: its state, the model it ran on, or the error it raised."""

    state: Any = None
    model: Any = None
    adapter: Any = None
    error: BaseException | None = None


_WINDOWS: dict[tuple[str, str, int, int, int], torch.Tensor] = {}
_CALIBRATIONS: dict[tuple[str, str, str, int], Outcome] = {}


def windows(family: str, corpus: str, n: int, seqlen: int, seed: int) -> torch.Tensor:
    key = (family, corpus, n, seqlen, seed)
    if key not in _WINDOWS:
        from harness.data import calibration_windows

        _, tok, _ = tiny_model(family)
        _WINDOWS[key] = calibration_windows(tok, corpus, n, seqlen, seed)
    return _WINDOWS[key]


def calib_context(family: str, scheme: str) -> CalibContext:
    model, tok, adapter = tiny_model(family, seed=0)
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme), calib=CALIB, seed=SEED)
    ctx._inputs = windows(family, CALIB.corpus, CALIB.n, CALIB.seqlen, SEED).clone()
    return ctx


def calibration(name: str, family: str, scheme: str, run: int = 0) -> Outcome:
    """Calibrate `name` once per (family, scheme, run), on a fresh tiny model; errors are kept, not raised."""
    key = (name, family, scheme, run)
    if key not in _CALIBRATIONS:
        ctx = calib_context(family, scheme)
        try:
            method = get_method(name)(conformance_params(name))
            out = Outcome(state=method.calibrate(ctx))
            if scheme == OFF_SCHEME:  # the quantizers-off check applies on the model calibrate ran on
                out.model, out.adapter = ctx.model, ctx.adapter
        except Exception as exc:  # judged by the check that asks for it
            out = Outcome(error=exc)
        _CALIBRATIONS[key] = out
    return _CALIBRATIONS[key]


def refusal(exc: BaseException, what: str):
    """Skip on a one-line PtqbenchError (a method may refuse a model or scheme); re-raise anything else."""
    msg = str(exc)
    if isinstance(exc, PtqbenchError) and msg and "\n" not in msg:
        pytest.skip(f"{what}: refused with {type(exc).__name__}: {msg}")
    raise exc


def calibrated(name: str, family: str, scheme: str, run: int = 0) -> Outcome:
    out = calibration(name, family, scheme, run)
    if out.error is not None:
        refusal(out.error, f"{name} calibrate on {family}/{scheme}")
    return out


def applied(name: str, model, adapter, state, family: str, scheme: str):
    """`apply` (a one-line PtqbenchError skips); the model it returns and that model's adapter."""
    method = get_method(name)(conformance_params(name))
    try:
        out = method.apply(model, adapter, state, get_scheme(scheme))
    except Exception as exc:
        refusal(exc, f"{name} apply on {family}/{scheme}")
    out = model if out is None else out
    return out, get_adapter(out)


# ---- a. params -----------------------------------------------------------------------------------------


def test_every_method_imports():
    assert broken_methods() == {}, "methods that fail to import: " + "; ".join(
        f"{k}: {v}" for k, v in broken_methods().items())


def _scalar_kinds(annotation: Any) -> set[str]:
    """The checkable kinds in a param annotation: 'number', 'bool', 'literal' (Optional/Union unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    if origin is Literal:
        return {"literal"}
    if annotation is bool:
        return {"bool"}
    if annotation in (int, float):
        return {"number"}
    return set()


def _one_line_invalid(cls, params: dict, field_name: str | None = None) -> str:
    with pytest.raises(InvalidParamsError) as info:
        cls.validate_params(params)
    msg = str(info.value)
    assert "\n" not in msg, msg
    if field_name is not None:
        assert field_name in msg, msg
    return msg


@pytest.mark.parametrize("name", METHODS)
def test_params(name):
    cls = get_method(name)
    defaults = cls.validate_params(None)
    assert isinstance(defaults, cls.Params)
    assert cls.validate_params({}) == defaults
    fast = conformance_params(name)
    cls.validate_params(fast)  # the conformance params are valid params
    assert set(fast) <= set(cls.Params.model_fields), f"unknown conformance params for {name}"
    _one_line_invalid(cls, {"no_such_param_for_conformance": 1}, "no_such_param_for_conformance")
    checked = []
    for field_name, info in cls.Params.model_fields.items():
        kinds = _scalar_kinds(info.annotation)
        if not kinds:
            continue
        for bad in ("not-a-number", [1]):
            _one_line_invalid(cls, {field_name: bad}, field_name)
        if kinds == {"number"} and info.annotation is int:
            _one_line_invalid(cls, {field_name: 1.5}, field_name)
        checked.append(field_name)
    # every numeric, bool or Literal field got its ill-typed value rejected
    print(f"{name}: ill-typed values rejected for {checked}")


def _bounds(info) -> list:
    """The ge/gt/le/lt constraints of a field, its own and those inside Optional[Annotated[...]]."""
    import annotated_types

    found = [m for m in info.metadata if isinstance(m, annotated_types.BaseMetadata)]
    stack = [info.annotation]
    while stack:
        annotation = stack.pop()
        if typing.get_origin(annotation) is typing.Annotated:
            found += [m for m in typing.get_args(annotation)[1:] if isinstance(m, annotated_types.BaseMetadata)]
        stack += list(typing.get_args(annotation))
    return [m for m in found if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le,
                                                annotated_types.Lt))]


@pytest.mark.parametrize("name", METHODS)
def test_every_numeric_param_has_a_range(name):
    """(#11.6) Unbounded params ran: spinquant `steps: -5` was recorded as done, untrained; `batch_size: 0`
    and a negative `block` gave raw torch errors. Every numeric param carries its range, and a value just
    outside it (or NaN) is a one-line error naming the param."""
    cls = get_method(name)
    for field_name, info in cls.Params.model_fields.items():
        if "number" not in _scalar_kinds(info.annotation):
            continue
        bounds = _bounds(info)
        assert bounds, f"{name}.{field_name} has no range: give it ge/gt (and le/lt) in its Params"
        for bound in bounds:
            lower = hasattr(bound, "ge") or hasattr(bound, "gt")
            limit = next(getattr(bound, k) for k in ("ge", "gt", "le", "lt") if hasattr(bound, k))
            outside = limit - 1 if lower else limit + 1
            _one_line_invalid(cls, {field_name: outside}, field_name)
        _one_line_invalid(cls, {field_name: float("nan")}, field_name)


# ---- b. state round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip(name, family, tmp_path):
    state = calibrated(name, family, QUANT_SCHEME).state
    typed = isinstance(state, State)
    assert typed, (f"{name}.calibrate returned a {type(state).__module__}.{type(state).__qualname__}, "
                   f"not a harness.state.State (typed dataclass state)")
    # the calibration cache loads a state through the method's declared state_type: it must be this class
    declared = get_method(name).state_type
    assert isinstance(state, declared) and type(state).__name__ == declared.__name__, (
        f"{name}.calibrate returned a {type(state).__qualname__} but declares state_type {declared.__qualname__}: "
        "a cached calibration would not load")
    state.save(tmp_path / "state")
    back = declared.load(tmp_path / "state")
    assert type(back) is type(state)
    diff = state_difference(state, back)
    assert diff is None, f"{name} on {family}: the state does not survive save/load bit for bit: {diff}"


# ---- c. quantizers off ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
@torch.no_grad()
def test_quantizers_off_leave_the_logits_unchanged(name, family):
    out = calibrated(name, family, OFF_SCHEME)
    ids = windows(family, "wikitext2", *EVAL_WINDOWS, seed=1)
    reference, _, _ = tiny_model(family, seed=0)
    ref = reference(ids).logits
    # apply on the model calibrate ran on, as the runner does without a cached state
    model, _ = applied(name, out.model, out.adapter, out.state, family, OFF_SCHEME)
    out.model = out.adapter = None  # used once
    logits = model(ids).logits
    assert logits.shape == ref.shape
    err = float((logits.double() - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= OFF_TOLERANCE, f"{name} on {family} with {OFF_SCHEME}: max relative logit error {err:.3g}"


# ---- d. determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_state(name, family):
    a = calibrated(name, family, QUANT_SCHEME, run=0).state
    b = calibrated(name, family, QUANT_SCHEME, run=1).state
    diff = state_difference(a, b, meta=False)
    assert diff is None, f"{name} on {family}: two calibrations with seed {SEED} differ at {diff}"


# ---- e. MoE experts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("name", METHODS)
@torch.no_grad()
def test_weight_quantization_changes_every_expert(name, family):
    cls = get_method(name)
    if not cls.uses_scheme:
        pytest.skip(f"{name} ignores the quantization scheme (uses_scheme = False)")
    state = calibrated(name, family, QUANT_SCHEME).state
    fresh, _, fresh_adapter = tiny_model(family, seed=0)
    before = {v.index: (v.experts.gate_up.detach().clone(), v.experts.down.detach().clone())
              for v in fresh_adapter.layers() if v.experts is not None}
    assert before, f"{family} has no MoE layer"
    # apply the state to a fresh model, as on a calibration-cache hit
    _, adapter = applied(name, fresh, fresh_adapter, copy.deepcopy(state), family, QUANT_SCHEME)
    unchanged = []
    for view in adapter.layers():
        if view.index not in before:
            continue
        assert view.experts is not None, f"layer {view.index} lost its experts"
        for part, old, new in zip(("gate_up_proj", "down_proj"), before[view.index],
                                  (view.experts.gate_up, view.experts.down)):
            assert new.shape[0] == old.shape[0], f"layer {view.index} {part}: {new.shape[0]} experts"
            unchanged += [f"layers.{view.index}.{part}[{e}]" for e in range(old.shape[0])
                          if new.shape == old.shape and torch.equal(new[e].to(old.dtype), old[e])]
    assert not unchanged, f"{name} with {QUANT_SCHEME} left expert weights unchanged: {', '.join(unchanged)}"
