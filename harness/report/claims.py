"""Machine-checked paper claims.

A claim is a comparison written in a tiny expression language over the results table:

    ppl(torq, mxfp4_wa) < ppl(brq, mxfp4_wa) < ppl(rtn, mxfp4_wa)
    kl(rtn, mxint8) <= kl(rtn, mxfp8)
    approx(ppl(smoothquant, w8a8), ppl(fp, w16a16), rel=0.02)

Functions: ppl / acc / kl / metric("name", ...) take a method label and a scheme name (bare words are
strings), plus optional keywords task=, model=. `ppl` reads the perplexity of the first perplexity task
(or task=...), `acc` the zero-shot accuracy under the recorded metric policy, `kl` the KL to FP.
Values are means over seeds; seed spread (std) widens the band inside which a comparison is called
"inconclusive" instead of reproduced / not reproduced. A claim whose runs are missing or failed is
"not run". Expressions are parsed with `ast` and evaluated by a small whitelist, never `eval`.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any

from harness.errors import PtqbenchError
from harness.store import DIVERGED_MARK

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN = "reproduced", "not reproduced", "inconclusive", "not run"

# metric names in the records, per claim function
METRIC_OF = {"ppl": "ppl", "acc": "acc", "kl": "kl"}
COMPARATORS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class ClaimError(PtqbenchError):
    """A claim that cannot be parsed."""


class MissingResult(Exception):
    """A term whose run is absent or failed."""


@dataclass
class Estimate:
    """A mean over seeds with its spread (0 for a single seed)."""

    mean: float
    std: float = 0.0
    n: int = 1
    diverged: int = 0  # how many of the n runs were recorded as diverged (their value still counts)

    def _combine(self, other: Estimate, op) -> Estimate:
        """`self op other` with its spread propagated to first order: absolute spreads add in quadrature for
        + and -, relative ones for * and / (a ratio's spread is relative: 1.53 ± 83 for a ratio was wrong)."""
        mean = op(self.mean, other.mean)
        if op in (operator.mul, operator.truediv):
            rel = math.hypot(self.std / self.mean if self.mean else 0.0, other.std / other.mean if other.mean else 0.0)
            std = abs(mean) * rel
        else:
            std = math.hypot(self.std, other.std)
        return Estimate(mean, std, min(self.n, other.n), max(self.diverged, other.diverged))


@dataclass
class ClaimResult:
    id: str
    check: str
    verdict: str
    says: str = ""
    values: dict[str, Estimate] = field(default_factory=dict)
    detail: str = ""
    paper: Any = None
    model: str | None = None  # the model the claim was checked on (one result per model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "says": self.says,
            "check": self.check,
            "verdict": self.verdict,
            "detail": self.detail,
            "values": {k: {"mean": v.mean, "std": v.std, "seeds": v.n} for k, v in self.values.items()},
            "paper": self.paper,
        }


class ResultLookup:
    """Finds metric values in the tidy results DataFrame (harness.store.load_results)."""

    def __init__(self, df, default_ppl_task: str | None = None, default_model: str | None = None):
        self.df = df
        self.default_ppl_task = default_ppl_task
        self.default_model = default_model

    def _method_column(self) -> str:
        return "method_label" if "method_label" in self.df.columns else "method"

    def get(self, metric: str, method: str, scheme: str, task: str | None = None, model: str | None = None) -> Estimate:
        df = self.df
        if df is None or df.empty:
            raise MissingResult("no results")
        rows = df[(df[self._method_column()] == method) & (df["scheme"] == scheme)]
        model = model or self.default_model
        if model is not None:
            rows = rows[rows["model"] == model]
        if task is None and metric == "ppl":
            task = self.default_ppl_task
        if task is not None:
            rows = rows[rows["task"] == task]
        # A diverged run (a finite perplexity above the runner's limit) is a failed record that still holds its
        # value: "X beats RTN" must hold when RTN diverged, so claims use it, flagged in the report.
        diverged = rows["error"].fillna("").astype(str).str.contains(DIVERGED_MARK, regex=False) if "error" in rows else False
        usable = (rows["status"] == "done") | diverged
        failed = rows[~usable]
        rows = rows[usable & (rows["metric"] == metric)]
        label = f"{metric}({method}, {scheme}{', ' + task if task else ''})"
        if rows.empty:
            reason = f"failed: {failed['error'].iloc[0]}" if not failed.empty else "no run"
            raise MissingResult(f"{label}: {reason}")
        values = rows["value"].astype(float)
        if values.isna().any():
            raise MissingResult(f"{label}: NaN")
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return Estimate(float(values.mean()), std, len(values), int((rows["status"] != "done").sum()))


class _Evaluator:
    def __init__(self, lookup: ResultLookup):
        self.lookup = lookup
        self.values: dict[str, Estimate] = {}

    def term(self, node: ast.AST) -> Estimate:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Estimate(float(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in ARITH:
            return self.term(node.left)._combine(self.term(node.right), ARITH[type(node.op)])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return self.call(node)
        raise ClaimError(f"unsupported expression {ast.unparse(node)!r}; use ppl/acc/kl/metric(...) terms and + - * /")

    @staticmethod
    def _word(node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Attribute):  # dotted metric names such as method.block_cv_after
            return ast.unparse(node)
        raise ClaimError(f"expected a name, got {ast.unparse(node)!r}")

    def call(self, node: ast.Call) -> Estimate:
        name = node.func.id
        args = [self._word(a) for a in node.args]
        kwargs = {k.arg: self._word(k.value) for k in node.keywords}
        if name == "metric":
            if len(args) < 3:
                raise ClaimError(f"metric() needs (name, method, scheme), got {ast.unparse(node)!r}")
            metric, args = args[0], args[1:]
        elif name in METRIC_OF:
            metric = METRIC_OF[name]
        else:
            raise ClaimError(f"unknown claim function {name!r}; choose one of: {', '.join([*METRIC_OF, 'metric', 'approx'])}")
        if len(args) != 2:
            raise ClaimError(f"{name}() takes (method, scheme), got {ast.unparse(node)!r}")
        estimate = self.lookup.get(metric, args[0], args[1], kwargs.get("task"), kwargs.get("model"))
        self.values[ast.unparse(node)] = estimate
        return estimate


def _verdict(holds: bool, gap: float, noise: float) -> str:
    if noise > 0 and abs(gap) <= noise:
        return INCONCLUSIVE
    return REPRODUCED if holds else NOT_REPRODUCED


def evaluate_claim(check: str, lookup: ResultLookup, claim_id: str = "", says: str = "", paper: Any = None,
                   tolerance: float = 0.0, model: str | None = None) -> ClaimResult:
    """Evaluate one claim. `tolerance` (relative) widens the inconclusive band beyond seed noise."""
    try:
        tree = ast.parse(check, mode="eval").body
    except SyntaxError as exc:
        raise ClaimError(f"claim {claim_id or check!r}: cannot parse {check!r}: {exc.msg}") from None
    evaluator = _Evaluator(lookup)
    result = ClaimResult(claim_id, check, NOT_RUN, says=says, paper=paper, model=model or lookup.default_model)
    try:
        if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "approx":
            a, b = (evaluator.term(arg) for arg in tree.args[:2])
            rel = float(next((k.value.value for k in tree.keywords if k.arg == "rel"), 0.01))
            gap = abs(a.mean - b.mean)
            limit = rel * abs(b.mean) + math.hypot(a.std, b.std)
            result.verdict = REPRODUCED if gap <= limit else NOT_REPRODUCED
            result.detail = f"|{a.mean:.4g} - {b.mean:.4g}| = {gap:.3g} vs allowed {limit:.3g}"
        elif isinstance(tree, ast.Compare):
            terms = [evaluator.term(tree.left)] + [evaluator.term(c) for c in tree.comparators]
            verdicts, details = [], []
            for (left, right), op in zip(zip(terms, terms[1:]), tree.ops):
                if type(op) not in COMPARATORS:
                    raise ClaimError(f"claim {claim_id!r}: comparison {type(op).__name__} not supported; use < <= > >=")
                noise = math.hypot(left.std, right.std) + tolerance * max(abs(left.mean), abs(right.mean))
                verdicts.append(_verdict(COMPARATORS[type(op)](left.mean, right.mean), right.mean - left.mean, noise))
                details.append(f"{left.mean:.4g}{'±%.2g' % left.std if left.std else ''} vs "
                               f"{right.mean:.4g}{'±%.2g' % right.std if right.std else ''}")
            if NOT_REPRODUCED in verdicts:
                result.verdict = NOT_REPRODUCED
            elif INCONCLUSIVE in verdicts:
                result.verdict = INCONCLUSIVE
            else:
                result.verdict = REPRODUCED
            result.detail = "; ".join(details)
        else:
            raise ClaimError(f"claim {claim_id!r}: {check!r} is not a comparison or approx(...)")
    except MissingResult as missing:
        result.verdict, result.detail = NOT_RUN, str(missing)
    result.values = evaluator.values
    return result
