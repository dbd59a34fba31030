"""The calibration kit every method builds on: a layer-wise driver, statistics accumulators, a memory meter.

    from harness.calib import walk_layers, Hessian, ChannelStats, MemoryMeter

* `walk_layers` captures the inputs of decoder layer 0 once, then yields one `LayerStep` per layer: the
  layer's inputs (per batch) and kwargs; the body runs the layer (`step.run()`), hooks it, changes it, or
  sets `step.outputs`; the next layer's inputs are what the body left (or the layer's outputs as the body
  left the layer). A `LayerPlacement` moves a layer on/off the device around its step (onloading).
* accumulators share one API: `add(x)` with rows along the last dim, `n` the rows seen.
* `MemoryMeter` nests: an inner meter never spoils an outer one's peak.
"""
from harness.calib.driver import (
    LayerPlacement,
    LayerStep,
    capture_layer_inputs,
    layer_kwargs,
    run_layer,
    walk_layers,
)
from harness.calib.memory import MemoryMeter, page_in
from harness.calib.stats import AbsMax, ChannelStats, Hessian, InputDrift, RowSample, SecondMoment, StatsTap

__all__ = ["AbsMax", "ChannelStats", "Hessian", "InputDrift", "LayerPlacement", "LayerStep", "MemoryMeter", "RowSample",
           "SecondMoment", "StatsTap", "capture_layer_inputs", "layer_kwargs", "page_in", "run_layer",
           "walk_layers"]
