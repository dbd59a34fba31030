"""Evaluation with an explicit protocol stored next to every number.

    perplexity(model, tok, "wikitext2", seqlen=2048)          # GPTQ/QuaRot protocol -> EvalResult
    lm_eval_tasks(model, tok, ["piqa", "arc_easy"], limit=200) # lm-eval-harness on the in-memory model
    ref = collect_reference(fp_model, tok, "wikitext2", seqlen=512, max_windows=8)
    kl_to_reference(quant_model, ref)                          # KL(FP || Q) on FP top-k + tail bucket

Every function returns `EvalResult(value, metric, protocol, extra)`; non-finite logits raise
`NonFiniteError` (a PtqbenchError), which the runner records as a failed run.
"""
from harness.eval.forward import logit_chunks, make_windows
from harness.eval.kl import DEFAULT_TOPK, KLReference, collect_reference, kl_to_reference
from harness.eval.lm_eval_bridge import METRIC_POLICY, lm_eval_tasks, list_tasks, task_kinds
from harness.eval.ppl import nll_sum, perplexity, windows_for
from harness.eval.result import EvalResult, NonFiniteError, library_versions

__all__ = [
    "DEFAULT_TOPK", "EvalResult", "KLReference", "METRIC_POLICY", "NonFiniteError", "collect_reference",
    "kl_to_reference", "library_versions", "list_tasks", "lm_eval_tasks", "logit_chunks", "make_windows",
    "nll_sum", "perplexity", "task_kinds", "windows_for",
]
