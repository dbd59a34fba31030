"""The layer-wise calibration driver: capture a layer's inputs, run one layer, walk the layers.

Methods that calibrate layer by layer (GPTQ, AWQ, DartQuant, FlatQuant, ...) all need the same three
things: the hidden states and kwargs (masks, RoPE tables) decoder layer 0 receives, a way to run one
layer on them, and a loop that feeds each layer's outputs to the next. Only the decoder layers are run
inside the loop, so a large model's other layers can stay off the device (`LayerPlacement`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


class _Stop(Exception):
    pass


def capture_layer_inputs(model: nn.Module, layer: nn.Module, calib: torch.Tensor, batch_size: int) -> list[tuple]:
    """(hidden states, kwargs) that `layer` receives, per calibration batch (the model stops there)."""
    captured = []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def layer_kwargs(model: nn.Module, layers: list, calib: torch.Tensor, batch_size: int, inputs: list[tuple]):
    """Per layer, its per-batch kwargs. Layers of another attention type than layer 0 (sliding-window
    vs full) get another mask, captured by stopping the model at the first layer of that type."""
    types = [getattr(view.module, "attention_type", None) for view in layers]
    by_type = {types[0]: [kw for _, kw in inputs]}
    for view, kind in zip(layers, types):
        if kind not in by_type:
            by_type[kind] = [kw for _, kw in capture_layer_inputs(model, view.module, calib, batch_size)]
    return [by_type[kind] for kind in types]


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer's output hidden states, per batch."""
    outs = []
    for x, kw in zip(hidden, kwargs):
        out = layer(x, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def cast_floats(value, dtype: torch.dtype):
    """`value` (a tensor, or a tuple / dict holding tensors) with its floating tensors cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


class LayerPlacement:
    """Where a layer lives while it is calibrated: `enter` before its step, `exit` after (default: stay).

    The hook point for onloading: a subclass moves the layer to the accelerator in `enter` and back to
    the host in `exit`, so only one decoder layer at a time needs device memory."""

    def enter(self, view) -> None:
        pass

    def exit(self, view) -> None:
        pass


@dataclass
class LayerStep:
    """One decoder layer of the walk: its inputs per batch, its kwargs per batch, and what goes on."""

    view: object  # harness.models LayerView
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    def forward(self) -> list[torch.Tensor]:
        """The layer's outputs on this step's inputs, as the layer is now (nothing stored)."""
        return run_layer(self.view.module, self.hidden, self.kwargs)

    def run(self) -> list[torch.Tensor]:
        """Run the layer and keep its outputs as the next layer's inputs (e.g. FP outputs, before the body
        changes the layer: no error propagation)."""
        self.outputs = self.forward()
        return self.outputs


def walk_layers(model: nn.Module, adapter, calib: torch.Tensor, batch_size: int, *,
                dtype: torch.dtype | None = None, progress: Callable | None = None, desc: str = "layers",
                placement: LayerPlacement | None = None) -> Iterator[LayerStep]:
    """Yield a `LayerStep` per decoder layer, in order; after the body, the next layer's inputs are
    `step.outputs` if the body set them (`run()` does), else the layer's outputs as the body left it
    (the GPTQ convention: later layers see the earlier layers quantized). `dtype` casts the captured
    hidden states and kwargs (a learned method training in fp32 on a bf16 model)."""
    layers = adapter.layers()
    with torch.no_grad():
        first = capture_layer_inputs(model, layers[0].module, calib, batch_size)
        kwargs_per_layer = layer_kwargs(model, layers, calib, batch_size, first)
    hidden = [x for x, _ in first]
    del first
    if dtype is not None:
        hidden = [x.to(dtype) for x in hidden]
        kwargs_per_layer = [[cast_floats(kw, dtype) for kw in kws] for kws in kwargs_per_layer]
    placement = placement or LayerPlacement()
    pairs = list(zip(layers, kwargs_per_layer))
    for view, kwargs in (progress(pairs, desc=desc) if progress else pairs):
        placement.enter(view)
        step = LayerStep(view, hidden, kwargs)
        yield step
        if step.outputs is None:
            with torch.no_grad():
                step.outputs = step.forward()
        hidden = step.outputs
        placement.exit(view)
