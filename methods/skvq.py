"""SKVQ: Sliding-window Key and Value Cache Quantization (Duanmu et al., COLM 2024; cat538/SKVQ).

Algorithm (per decoder layer, offline calibration on the FP model, then a quantized cache):
1. Channel reordering. Over the calibration tokens, each channel of the cached K (before RoPE) and V
   (all KV heads' channels together) gets its (min, max); K-means (scikit-learn, 10 inits) clusters the
   channels into kv_hidden / g groups by that pair, and the channels are sorted by cluster, so channels
   of similar range share a quantization group (clusters have varying sizes, as the reference's
   `cluster_st_inds`).
2. Clipped dynamic group quantization. Each token's K and V are quantized per cluster, asymmetric INT
   with the group's min / max scaled by `clip_ratio` (the reference's uniform clip, 0.96 in eval_ppl.py).
3. Sliding window. The `window` most recent tokens and the first `sinks` tokens (attention sinks) stay
   full precision; a token is quantized once it leaves the window, keys before RoPE (harness.kv.KVPolicy
   states exactly this cache; the window evaluation equals token-by-token decoding with it).

The K/V formats come from the scheme (bits and group g: e.g. `k2v2_g32`), the window, sinks, clip and
reordering from the params. Deviations from the reference:
- its PPL script keeps the window at 0 (sinks 5) and evaluates a prefill; here the window is read per
  query as a decoding cache would (`window` > 0 is what the paper's LongBench / needle runs use);
- scale and zero point are fp32 in the fake quantization (the reference optionally stores them in FP8,
  `-fp8`; KV accounting counts 16 bits each); 1.5-bit values (3 levels) are not offered (INT formats
  start at 2 bits);
- no clip search (the README gives a uniform clip; a search over 0.91-0.97 would lower PPL slightly);
- optional smoothing scales of the reference (off in its published configs) are not implemented;
- statistics from the harness calibration set (the reference: 256 x 4096 WikiText-2 tokens).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from harness.calib import walk_layers
from harness.errors import InvalidValueError
from harness.kv import KVPolicy
from harness.kv.policy import ChannelGroups
from harness.kv.stats import KVRanges
from harness.method import CalibContext, Method, MethodParams
from harness.registry import register_method
from harness.state import State

ROLES = ("key", "value")


@dataclass(kw_only=True)
class SKVQState(State):
    """Per decoder layer: {role_order: channel permutation, role_bounds: cluster boundaries} for K and V."""

    clusters: list[dict[str, torch.Tensor]] = field(default_factory=list)


def kv_formats(scheme: Any):
    """The scheme's K and V formats (a plain KV format is both)."""
    kv = getattr(scheme, "kv", None)
    if kv is None:
        raise InvalidValueError("scheme for skvq", getattr(scheme, "name", scheme),
                                "a scheme with a KV format (e.g. kv2, k2v2_g32, or kv: {key: ..., value: ...})")
    if not isinstance(kv, KVPolicy):
        return kv, kv
    plain = KVPolicy(key=kv.key, value=kv.value)
    if kv.with_(pre_rope_keys=False) != plain:
        raise InvalidValueError("scheme kv for skvq", kv.to_dict(),
                                "formats only: skvq sets the window, sinks, granularity and pre-RoPE keys itself")
    return kv.key, kv.value


def cluster_channels(lo: torch.Tensor, hi: torch.Tensor, n_clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means of the channels' (min, max) into n_clusters; (channel order sorted by cluster, boundaries)."""
    from sklearn.cluster import KMeans

    points = torch.stack([lo, hi], dim=1).double().numpy()
    labels = torch.from_numpy(KMeans(n_clusters, n_init=10, random_state=seed).fit(points).labels_).long()
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n_clusters)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return order, bounds


@register_method("skvq")
class SKVQ(Method):
    """Reordered, clipped group quantization of K and V with a full-precision sliding window and sinks."""

    version = 1
    state_type = SKVQState

    class Params(MethodParams):
        window: NonNegativeInt = 128  # most recent tokens in full precision (paper: 128)
        sinks: NonNegativeInt = 5  # first tokens in full precision (paper: 5)
        clip_ratio: float = Field(0.96, gt=0, le=1)  # group min / max scaled by this (eval_ppl.py: 0.96)
        reorder: bool = True  # cluster channels of similar range into groups
        pre_rope_keys: bool = True  # quantize keys before RoPE (the reference's `pre_rope`)
        batch_size: PositiveInt = 8  # calibration windows per forward

    def calib_scheme_key(self, scheme: Any) -> Any:
        key, value = kv_formats(scheme)  # the cluster count follows the K / V group sizes
        return {"key_group": key and key.group_size, "value_group": value and value.group_size}

    def policy(self, scheme: Any) -> KVPolicy:
        p = self.params
        key, value = kv_formats(scheme)
        clip = {"clip_ratio": p.clip_ratio}
        return KVPolicy(key=key and key.with_(**clip), value=value and value.with_(**clip), window=p.window,
                        sinks=p.sinks, pre_rope_keys=p.pre_rope_keys)

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> SKVQState:
        from harness.quant import install_kv_quant

        policy = self.policy(ctx.scheme)
        if not self.params.reorder:
            return SKVQState(meta={"reorder": False})
        views = ctx.adapter.layers()
        install_kv_quant(ctx.model, [v.attn for v in views], None)  # the wrapper that shows K/V to observers
        geometry = ctx.adapter.attention
        kv_hidden = geometry.num_kv_heads * geometry.head_dim
        clusters, sizes = [], []
        for step in walk_layers(ctx.model, ctx.adapter, ctx.calib_inputs(), self.params.batch_size,
                                progress=ctx.progress, desc="SKVQ layers"):
            with KVRanges(step.view.attn, self.params.pre_rope_keys) as ranges:
                step.run()
            layer = {}
            for role in ROLES:
                fmt = getattr(policy, role)
                if fmt is None:
                    continue
                n = kv_hidden // (fmt.group_size or geometry.head_dim)
                order, bounds = cluster_channels(ranges.min[role], ranges.max[role], n, ctx.seed)
                layer[f"{role}_order"], layer[f"{role}_bounds"] = order, bounds
                sizes += torch.diff(bounds).tolist()
            clusters.append(layer)
        meta = {"reorder": True, "clusters_per_layer": len(sizes) // max(1, len(clusters)),
                "cluster_size_min": min(sizes, default=0), "cluster_size_max": max(sizes, default=0)}
        return SKVQState(clusters=clusters, meta=meta)

    @torch.no_grad()
    def apply(self, model, adapter, state: SKVQState, scheme):
        from harness.quant import apply_scheme

        apply_scheme(model, adapter, dataclasses.replace(scheme, kv=self.policy(scheme)), quantize_weights=True)
        for view, layer in zip(adapter.layers(), state.clusters):
            view.attn.kv_codecs = {
                role: ChannelGroups(layer[f"{role}_order"], tuple(int(b) for b in layer[f"{role}_bounds"]))
                for role in ROLES if f"{role}_order" in layer}
        self._metrics = {k: v for k, v in state.meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return getattr(self, "_metrics", {})
