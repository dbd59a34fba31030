"""Router semantics shared by the MoE families, for methods that change which experts a router may pick.

Every transformers-5 top-k router (Qwen2/3-MoE, OLMoE, Mixtral) computes softmax(logits) in fp32, takes the
top-k and renormalises the k weights when `norm_topk_prob` is set (Mixtral always does). CMoE's analytical
router (methods/cmoe.py) selects on softmax(score) + `extra_bias` with combine weights 1 + p·extra_scale.
"""
from __future__ import annotations

import torch
from torch import nn


def prune_experts(router: nn.Module, pruned: list[int]) -> None:
    """From now on `router` never selects the `pruned` experts: the top-k is taken over the others and the
    router distribution is renormalised over them (their logits are -inf)."""
    if not pruned:
        return
    if hasattr(router, "extra_bias"):  # CMoE's router: its selection bias does it exactly
        router.extra_bias[pruned] = float("-inf")
        return
    mask = torch.zeros(router.weight.shape[0], dtype=torch.float32)
    mask[pruned] = float("-inf")
    router.register_buffer("expert_mask", mask, persistent=False)
    if getattr(router, "_pruning_hook", None) is None:
        router._pruning_hook = router.register_forward_hook(_reselect)


def _reselect(router: nn.Module, _args, out):
    logits = out[0]
    probs = torch.softmax(logits.float() + router.expert_mask.to(logits.device), dim=-1)
    top, index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(out[1].dtype), index
