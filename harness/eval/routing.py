"""Routing fidelity of an MoE model against its FP self: does the quantized model send tokens to the same experts?

`collect_routing_reference` runs the FP model (before calibration) over `windows` evaluation windows and
records, per MoE layer, each token's top-k expert set and router distribution (softmax of the router
logits, fp32), the expert loads, and the FP routing of the calibration windows (tokens per expert a
layer-wise calibration on FP inputs sees). `routing_fidelity` runs the quantized model over the same windows:
- `routing_agreement`: the fraction of (token, layer) pairs whose top-k expert *set* equals the FP one's
  (each model on its own hidden states: what decoding sees), per layer too (`routing_agreement.layer<i>`);
- `routing_overlap`: the mean fraction of the FP top-k experts the model also selects (a softer measure:
  with 6 of 10 experts active, one swapped expert breaks the set equality), per layer too;
- `router_kl`: KL(FP || quantized) of the router distributions, mean over tokens, per layer too;
- `info.expert_load` / `info.fp_expert_load`: tokens per expert per layer on the evaluation windows,
  `info.calib_tokens_per_expert`: on the calibration windows (FP routing).
Per-window scores are kept for paired intervals between runs on the same windows. Routers are found through
the architecture adapter (`view.experts.router`); every router returns (logits, top-k weights, top-k indices).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from harness.eval.forward import window_bos_id
from harness.eval.ppl import windows_for
from harness.eval.result import EvalResult, library_versions, model_device, model_dtype


class RouterTap:
    """Records every MoE router's outputs while active: per layer, a list of (log-probs [T, E], top-k [T, k])."""

    def __init__(self, model: Any):
        from harness.models import get_adapter

        self.layers = {v.index: v.experts.router for v in get_adapter(model).layers() if v.experts is not None}
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in self.layers}
        self.handles: list = []

    def __enter__(self) -> RouterTap:
        for i, router in self.layers.items():
            self.handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, layer: int):
        def hook(_module, _args, out):
            logits, _, index = out
            mask = getattr(_module, "expert_mask", None)  # pruned experts (adapters.routing): renormalised
            logits = logits.float() if mask is None else logits.float() + mask.to(logits.device)
            self.seen[layer].append((F.log_softmax(logits, dim=-1).cpu(), index.cpu()))
        return hook

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (log-probs [N, E], top-k [N, k])} of everything recorded, then clears."""
        out = {i: (torch.cat([lp for lp, _ in s]), torch.cat([ix for _, ix in s])) for i, s in self.seen.items() if s}
        self.seen = {i: [] for i in self.layers}
        return out


def _loads(routes: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[int]]:
    return {str(i): torch.bincount(ix.reshape(-1), minlength=lp.shape[1]).tolist() for i, (lp, ix) in routes.items()}


@torch.no_grad()
def _route(model: Any, windows: torch.Tensor) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per window, {layer: (log-probs, top-k)} of a forward pass."""
    device = next(model.parameters()).device
    out = []
    with RouterTap(model) as tap:
        if not tap.layers:
            from harness.errors import InvalidValueError

            raise InvalidValueError("model for the routing task", type(model).__name__, "an MoE model")
        for w in windows:
            model(w[None].to(device), use_cache=False)
            out.append(tap.take())
    return out


@dataclass
class RoutingReference:
    windows: torch.Tensor  # [W, T]
    routes: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]  # per window, per layer (log-probs, top-k)
    calib_load: dict[str, list[int]] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)


def collect_routing_reference(model: Any, tokenizer: Any, dataset: str = "wikitext2", seqlen: int = 512,
                              windows: int = 4, calib: dict[str, Any] | None = None, seed: int = 0,
                              split: str = "test") -> RoutingReference:
    bos = window_bos_id(model, tokenizer)
    ids, protocol = windows_for(tokenizer, dataset, seqlen, windows, split, bos)
    calib_load: dict[str, list[int]] = {}
    if calib:
        from harness.data import calibration_windows

        cal = calibration_windows(tokenizer, calib["corpus"], calib["n"], calib["seqlen"], seed, bos_token_id=bos)
        per_window = _route(model, torch.as_tensor(cal))
        layers = per_window[0].keys()
        calib_load = _loads({i: (per_window[0][i][0], torch.cat([r[i][1] for r in per_window])) for i in layers})
    protocol.update({"kind": "routing_reference", "fp_dtype": model_dtype(model), "calib": calib})
    return RoutingReference(ids, _route(model, ids), calib_load, protocol)


def routing_fidelity(model: Any, reference: RoutingReference) -> EvalResult:
    start = time.perf_counter()
    routes = _route(model, reference.windows)
    layers = sorted(reference.routes[0])
    agree = {i: [] for i in layers}  # per layer, per window: fraction of tokens with the FP expert set
    kl = {i: [] for i in layers}
    overlap = {i: [] for i in layers}
    for fp, q in zip(reference.routes, routes):
        for i in layers:
            (fp_lp, fp_ix), (q_lp, q_ix) = fp[i], q[i]
            same = (fp_ix.sort(-1).values == q_ix.sort(-1).values).all(-1)
            agree[i].append(float(same.float().mean()))
            shared = (fp_ix[:, :, None] == q_ix[:, None, :]).any(-1).float().mean(-1)
            overlap[i].append(float(shared.mean()))
            kl[i].append(float((fp_lp.exp() * (fp_lp - q_lp)).sum(-1).mean()))
    per_window_agree = [sum(agree[i][w] for i in layers) / len(layers) for w in range(len(routes))]
    per_window_kl = [sum(kl[i][w] for i in layers) / len(layers) for w in range(len(routes))]
    extra: dict[str, Any] = {"router_kl": sum(per_window_kl) / len(per_window_kl),
                             "routing_overlap": sum(sum(v) for v in overlap.values()) / (len(layers) * len(routes))}
    for i in layers:
        extra[f"routing_overlap.layer{i}"] = sum(overlap[i]) / len(overlap[i])
        extra[f"routing_agreement.layer{i}"] = sum(agree[i]) / len(agree[i])
        extra[f"router_kl.layer{i}"] = sum(kl[i]) / len(kl[i])
    merged = {i: (routes[0][i][0], torch.cat([r[i][1] for r in routes])) for i in layers}
    fp_merged = {i: (reference.routes[0][i][0], torch.cat([r[i][1] for r in reference.routes])) for i in layers}
    extra.update({"seconds": round(time.perf_counter() - start, 3), "expert_load": _loads(merged),
                  "fp_expert_load": _loads(fp_merged), "calib_tokens_per_expert": reference.calib_load,
                  "example_scores": {"routing_agreement": per_window_agree, "router_kl": per_window_kl}})
    protocol = dict(reference.protocol)
    protocol.update({"kind": "routing", "metric": "routing_agreement",
                     "routing_agreement": "fraction of (token, MoE layer) pairs whose top-k expert set equals the FP "
                     "model's on the same windows (each model on its own hidden states)",
                     "routing_overlap": "mean fraction of the FP model's top-k experts the model also selects",
                     "router_kl": "KL(FP || model) of softmax(router logits), fp32, mean over tokens and layers",
                     "dtype": model_dtype(model), "device": str(model_device(model)), "seed": None,
                     "versions": library_versions()})
    return EvalResult(value=sum(per_window_agree) / len(per_window_agree), metric="routing_agreement",
                      protocol=protocol, extra=extra)
