"""The method plugin interface: typed params, a pure `calibrate`, an `apply`, optional `metrics`.

A method is one class:

    @register_method("mymethod")
    class MyMethod(Method):
        version = 1                        # bump when a code change moves the numbers
        class Params(MethodParams):        # defaults from the paper; unknown fields are rejected
            damp: float = 0.01
        def calibrate(self, ctx: CalibContext) -> State: ...
        def apply(self, model, adapter, state, scheme): ...

`calibrate` must not leave changes in `ctx.model` that `apply` would not redo: the runner caches the
returned `State` (a typed dataclass, harness.state: safetensors + JSON) and, on a cache hit, calls
`apply` on a fresh model without calling `calibrate` again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from harness.errors import PtqbenchError
from harness.state import State

if TYPE_CHECKING:
    from harness.models.adapters.base import DecoderAdapter
    from harness.quant.scheme import QuantScheme


class MethodParams(BaseModel):
    """Base for a method's hyper-parameters: typed, validated, immutable, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


@dataclass
class CalibConfig:
    """Which calibration data a method sees (part of the run id and of the calibration cache key)."""

    corpus: str = "c4"
    n: int = 128
    seqlen: int = 2048

    def to_dict(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "n": self.n, "seqlen": self.seqlen}


@dataclass
class CalibContext:
    """Everything `Method.calibrate` may use. Calibration windows are built lazily on first use."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: DecoderAdapter
    scheme: QuantScheme | None
    calib: CalibConfig
    seed: int = 0
    device: str = "cpu"
    progress: Callable[..., Any] | None = None
    _inputs: torch.Tensor | None = field(default=None, repr=False)

    def calib_inputs(self) -> torch.Tensor:
        """Token ids of the calibration windows, shape [n, seqlen], sampled deterministically from `seed`."""
        if self._inputs is None:
            from harness.data import calibration_windows

            inputs = calibration_windows(self.tokenizer, self.calib.corpus, self.calib.n, self.calib.seqlen, self.seed,
                                         bos_token_id=self.window_bos)
            if not isinstance(inputs, torch.Tensor):
                inputs = torch.stack([torch.as_tensor(x) for x in inputs])
            self._inputs = inputs
        return self._inputs

    def training_windows(self, samples: int | None = None, seqlen: int | None = None) -> torch.Tensor:
        """Windows for a learned method's training loop: the calibration windows, or (when a method param
        overrides their number or length) windows drawn the same way from the same corpus and seed."""
        if samples is None and seqlen is None:
            return self.calib_inputs()
        from harness.data import calibration_windows

        return calibration_windows(self.tokenizer, self.calib.corpus, samples or self.calib.n,
                                   seqlen or self.calib.seqlen, seed=self.seed, bos_token_id=self.window_bos)

    @property
    def window_bos(self) -> int | None:
        """The BOS id every window starts with, for models whose adapter asks for it (else None)."""
        return self.tokenizer.bos_token_id if getattr(self.adapter, "window_bos", False) else None


@torch.no_grad()
def load_solved_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    """Copy solved weights {parameter name: tensor} into `model` in place; False when there are none."""
    params = dict(model.named_parameters())
    for name, w in weights.items():
        params[name].copy_(w.to(device=params[name].device, dtype=params[name].dtype))
    return bool(weights)


class Method:
    """Base class of every quantization method plugin."""

    name: ClassVar[str] = ""
    #: Bump when a code change moves the numbers; part of every run id and calibration cache key.
    version: ClassVar[int] = 1
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: The (typed) State subclass `calibrate` returns; the calibration cache loads it back as this type.
    state_type: ClassVar[type[State]] = State
    #: The smallest params that still run the real algorithm (few steps): the conformance suite uses them.
    conformance_params: ClassVar[dict[str, Any]] = {}
    #: False for methods whose `calibrate` returns nothing (no data, nothing to cache).
    needs_calibration: ClassVar[bool] = True
    #: False for methods that ignore the quantization scheme (the FP baseline): one cell, not one per scheme.
    uses_scheme: ClassVar[bool] = True
    #: False for deterministic methods that never draw random numbers: one cell, not one per seed.
    uses_seed: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any] | MethodParams | None = None):
        self.params = self.validate_params(params)

    @classmethod
    def validate_params(cls, params: dict[str, Any] | MethodParams | None) -> MethodParams:
        """Params from a dict; a one-line `InvalidParamsError` naming the bad field on failure."""
        if isinstance(params, cls.Params):
            return params
        from pydantic import ValidationError

        if params is not None and not isinstance(params, dict):
            raise InvalidParamsError(f"method {cls.name!r}: params must be a mapping, got {params!r}; "
                                     f"valid params: {describe_params(cls.Params)}")
        try:
            return cls.Params(**(params or {}))
        except ValidationError as exc:
            raise InvalidParamsError(f"method {cls.name!r}: {params_error_summary(exc)}; "
                                     f"valid params: {describe_params(cls.Params)}") from None

    def calib_scheme_key(self, scheme: Any) -> Any:
        """The part of the scheme that changes `calibrate`'s output (part of the cache key).

        Default: the whole scheme. A method whose state depends only on the weight format narrows it.
        """
        return scheme_to_dict(scheme)

    def calibrate(self, ctx: CalibContext) -> State:
        return State()

    def apply(self, model: torch.nn.Module, adapter: Any, state: State, scheme: Any) -> torch.nn.Module:
        raise NotImplementedError

    def metrics(self, model: torch.nn.Module, ctx: CalibContext) -> dict[str, float]:
        return {}


def scheme_to_dict(scheme: Any) -> Any:
    if scheme is None:
        return None
    if hasattr(scheme, "to_dict"):
        return scheme.to_dict()
    if isinstance(scheme, dict):
        return scheme
    raise PtqbenchError(f"scheme {scheme!r} has no to_dict()")


class InvalidParamsError(PtqbenchError, ValueError):
    """Method params that do not validate."""


def params_error_summary(exc: Exception) -> str:
    """The problems of a pydantic ValidationError, on one line."""
    parts = []
    for err in exc.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "params"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown param {loc!r}")
        else:
            parts.append(f"param {loc}={err.get('input')!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def describe_params(params_cls: type[MethodParams]) -> str:
    out = []
    for name, f in params_cls.model_fields.items():
        default = "required" if f.is_required() else f"default {f.default!r}"
        out.append(f"{name} ({_type_name(f.annotation)}, {default})")
    return ", ".join(out) or "none"


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if name and not str(annotation).startswith("typing.") else str(annotation).replace("typing.", "")
