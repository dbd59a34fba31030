"""The calibration kit: the layer-wise driver, the accumulators, the nestable memory meter."""
from __future__ import annotations

import time

import torch

from harness.calib import (
    AbsMax,
    ChannelStats,
    Hessian,
    LayerPlacement,
    MemoryMeter,
    RowSample,
    SecondMoment,
    StatsTap,
    run_layer,
    walk_layers,
)
from harness.calib import memory as memory_module
from harness.models import make_tiny_model


def _windows(n=4, seqlen=16, vocab=500):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_walk_layers_feeds_each_layer_the_previous_outputs_and_calls_the_placement():
    model, _, adapter = make_tiny_model("llama")
    ids = _windows()
    with torch.no_grad():
        final = model(ids, output_hidden_states=True).hidden_states  # embeddings, after layer 0, ...
    events = []

    class Recorder(LayerPlacement):
        def enter(self, view):
            events.append(("enter", view.index))

        def exit(self, view):
            events.append(("exit", view.index))

    seen = []
    with torch.no_grad():
        for step in walk_layers(model, adapter, ids, batch_size=2, placement=Recorder()):
            assert len(step.hidden) == 2 and len(step.kwargs) == 2  # two batches of two windows
            seen.append(torch.cat(step.hidden))
            if step.view.index == 0:
                step.run()  # the body may run the layer itself
    assert events == [("enter", 0), ("exit", 0), ("enter", 1), ("exit", 1)]
    torch.testing.assert_close(seen[0], final[0])
    torch.testing.assert_close(seen[1], final[1])


def test_walk_layers_propagates_what_the_body_left():
    """GPTQ's convention: a layer changed in the body feeds its changed outputs to the next layer;
    `step.outputs` set by the body (FP outputs computed before the change) wins over that."""
    model, _, adapter = make_tiny_model("llama")
    ids = _windows()
    for keep_fp in (False, True):
        model, _, adapter = make_tiny_model("llama")
        inputs_of_1 = None
        with torch.no_grad():
            for step in walk_layers(model, adapter, ids, batch_size=4):
                if step.view.index == 0:
                    fp = step.run() if keep_fp else None
                    step.view.o.weight.zero_()  # the body changes the layer
                    changed = step.forward()
                else:
                    inputs_of_1 = step.hidden[0]
        expected = fp[0] if keep_fp else changed[0]
        assert torch.equal(inputs_of_1, expected)


def test_walk_layers_casts_hidden_states_and_kwargs():
    model, _, adapter = make_tiny_model("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        step = next(iter(walk_layers(model, adapter, _windows(), 4, dtype=torch.float32)))
    assert step.hidden[0].dtype == torch.float32
    cos, sin = step.kwargs[0]["position_embeddings"]
    assert cos.dtype == sin.dtype == torch.float32
    assert step.kwargs[0]["position_ids"].dtype == torch.long  # integer tensors are left alone


def test_run_layer_returns_one_output_per_batch():
    model, _, adapter = make_tiny_model("llama")
    with torch.no_grad():
        step = next(iter(walk_layers(model, adapter, _windows(), 2)))
        outs = run_layer(step.view.module, step.hidden, step.kwargs)
    assert [o.shape for o in outs] == [h.shape for h in step.hidden]


def test_accumulators_share_one_api_and_match_their_definitions():
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(1))
    rows = x.reshape(-1, 8).double()
    accs = {"hessian": Hessian(8), "second": SecondMoment(8), "channels": ChannelStats(), "absmax": AbsMax(),
            "rows": RowSample(keep=64, seed=3)}
    for acc in accs.values():
        for chunk in x:  # three batches
            acc.add(chunk)
        assert acc.n == 30
    torch.testing.assert_close(accs["hessian"].h, 2 * rows.T @ rows / 30)
    torch.testing.assert_close(accs["second"].cov, rows.T @ rows / 30)
    torch.testing.assert_close(accs["channels"].absmax, rows.abs().amax(0).float())
    torch.testing.assert_close(accs["channels"].absmean, rows.abs().mean(0).float())
    torch.testing.assert_close(accs["absmax"].amax, rows.abs().amax(0).float())
    sample = accs["rows"].sample()
    assert sample.shape == (3, 8)  # keep // 64 = 1 row per batch
    again = RowSample(keep=64, seed=3)
    for chunk in x:
        again.add(chunk)
    assert torch.equal(again.sample(), sample)  # seeded
    # a tap is an identity that feeds its accumulator
    tap = StatsTap(AbsMax())
    assert tap(x) is x and torch.equal(tap.stats.amax, accs["absmax"].amax)


def test_memory_meters_nest_without_spoiling_the_outer_peak(monkeypatch):
    """CUDA keeps one process-wide peak: an inner meter's reset must not lose the outer one's peak."""
    allocated = {"now": 100, "peak": 100}

    def reset():
        allocated["peak"] = allocated["now"]

    def alloc(n):
        allocated["now"] += n
        allocated["peak"] = max(allocated["peak"], allocated["now"])

    fake = dict(is_available=lambda: True, synchronize=lambda: None, memory_allocated=lambda: allocated["now"],
                max_memory_allocated=lambda: allocated["peak"], reset_peak_memory_stats=reset)
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    with MemoryMeter("cuda") as outer:
        alloc(1000)
        alloc(-1000)  # the outer block's peak: 1100, then back to 100
        with MemoryMeter("cuda") as inner:
            alloc(50)
            alloc(-50)
        alloc(10)
    assert inner.peak_cuda == 150 and inner.extra_bytes == 50
    assert outer.peak_cuda == 1100 and outer.extra_bytes == 1000
    assert memory_module._OPEN == []
    assert outer.metrics("calib")["calib_peak_gpu_mb"] == round(1100 / 2**20, 1)


def test_memory_meter_samples_host_peaks_between_enter_and_exit(monkeypatch):
    """The sampler thread catches a transient RSS peak that is gone by the time the block exits."""
    rss = {"now": 1000}
    monkeypatch.setattr(memory_module, "_rss", lambda: rss["now"])
    with MemoryMeter(interval=0.005) as outer:
        with MemoryMeter(interval=0.005) as inner:
            rss["now"] = 5000
            deadline = time.monotonic() + 5
            while min(inner.peak_rss, outer.peak_rss) < 5000 and time.monotonic() < deadline:  # samplers run
                time.sleep(0.01)
            rss["now"] = 3000
        rss["now"] = 1500
    assert inner.peak_rss == 5000 and inner.extra_bytes == 4000
    assert outer.peak_rss == 5000 and outer.start_rss == 1000
    assert inner.kind == "cpu_rss" and set(outer.metrics("x")) >= {"x_peak_mb", "x_extra_mb"}
