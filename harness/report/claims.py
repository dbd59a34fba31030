"""Machine-checked paper claims.

A claim is a comparison written in a tiny expression language over the results table:

    ppl(torq, mxfp4_wa) < ppl(brq, mxfp4_wa) < ppl(rtn, mxfp4_wa)
    kl(rtn, mxint8) <= kl(rtn, mxfp8)
    approx(ppl(smoothquant, w8a8), ppl(fp, w16a16), rel=0.02)

Functions: ppl / acc / kl / metric("name", ...) take a method label and a scheme name (bare words are
strings), plus optional keywords task=, model=. `ppl` reads the perplexity of the first perplexity task
(or task=...), `acc` the zero-shot accuracy under the recorded metric policy, `kl` the KL to FP.
Values are means over seeds. Every term also carries bootstrap replicates (harness.report.intervals):
perplexities are resampled over their evaluation windows, the same resamples for every term measured on
the same windows (so a comparison is paired), and over seed runs; other metrics use their standard error
or seed spread. An expression's replicates are computed term by term, so `a < b`, `a / b < 0.9` and
`approx(a, b, rel=...)` all get the interval of the quantity they compare. Verdicts at 95%:
"reproduced" (the claim holds over the whole interval), "contradicted" (its opposite does),
"inconclusive" (the interval straddles the boundary), or "not run" (a run is missing or failed).
`tolerance` (relative) widens the boundary. Expressions are parsed with `ast` and evaluated by a small
whitelist, never `eval`.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.errors import PtqbenchError
from harness.report.intervals import Interval, Resampler, normal_draws, runs_example_draws, runs_ppl_draws
from harness.store import DIVERGED_MARK

REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_RUN = "reproduced", "contradicted", "inconclusive", "not run"
NOT_REPRODUCED = CONTRADICTED  # the former name of the verdict

# metric names in the records, per claim function
METRIC_OF = {"ppl": "ppl", "acc": "acc", "kl": "kl", "agreement": "greedy_agreement", "routing": "routing_agreement",
             "routing_overlap": "routing_overlap", "router_kl": "router_kl"}
COMPARATORS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class ClaimError(PtqbenchError):
    """A claim that cannot be parsed."""


class MissingResult(Exception):
    """A term whose run is absent or failed."""


@dataclass
class Estimate:
    """A mean over seeds, its seed spread (0 for a single seed) and its bootstrap replicates."""

    mean: float
    std: float = 0.0
    n: int = 1
    diverged: int = 0  # how many of the n runs were recorded as diverged (their value still counts)
    draws: np.ndarray | None = None  # replicates; None: a constant
    paired_on: tuple | None = None  # the windows the replicates resample (None: not window data)

    def _combine(self, other: Estimate, op) -> Estimate:
        """`self op other`, replicate by replicate (the replicates of terms on the same windows are paired).
        `std` keeps the first-order seed spread: absolute spreads add in quadrature for + and -, relative
        ones for * and /."""
        mean = op(self.mean, other.mean)
        if op in (operator.mul, operator.truediv):
            rel = math.hypot(self.std / self.mean if self.mean else 0.0, other.std / other.mean if other.mean else 0.0)
            std = abs(mean) * rel
        else:
            std = math.hypot(self.std, other.std)
        draws = None
        if self.draws is not None or other.draws is not None:
            draws = op(self.draws if self.draws is not None else self.mean,
                       other.draws if other.draws is not None else other.mean)
        if other.draws is None:  # a constant keeps the pairing of the other term
            paired = self.paired_on
        elif self.draws is None:
            paired = other.paired_on
        else:
            paired = self.paired_on if self.paired_on == other.paired_on else None
        return Estimate(mean, std, min(self.n, other.n), max(self.diverged, other.diverged), draws, paired)

    @property
    def interval(self) -> Interval | None:
        return None if self.draws is None else Interval.of(self.draws)


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
    #: per comparison: the compared quantity (a ratio left / right, or approx's relative gap), its 95%
    #: interval and whether it was paired on the same windows
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "says": self.says,
            "check": self.check,
            "verdict": self.verdict,
            "detail": self.detail,
            "comparisons": self.comparisons,
            "values": {k: _value_dict(v) for k, v in self.values.items()},
            "paper": self.paper,
        }


def _value_dict(v: Estimate) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": v.mean, "std": v.std, "seeds": v.n}
    if v.interval is not None:
        out["ci95"] = [v.interval.low, v.interval.high]
    return out


class ResultLookup:
    """Finds metric values in the tidy results DataFrame (harness.store.load_results)."""

    def __init__(self, df, default_ppl_task: str | None = None, default_model: str | None = None,
                 resampler: Resampler | None = None):
        self.df = df
        self.default_ppl_task = default_ppl_task
        self.default_model = default_model
        self.resampler = resampler or Resampler()

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
        if "seed" in rows and len(rows) > 1:  # seed order: the numbers do not depend on the record order
            rows = rows.sort_values("seed", kind="stable")
        values = rows["value"].astype(float)
        if values.isna().any():
            raise MissingResult(f"{label}: NaN")
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        estimate = Estimate(float(values.mean()), std, len(values), int((rows["status"] != "done").sum()))
        self._add_draws(estimate, rows, metric, label)
        return estimate

    def _add_draws(self, estimate: Estimate, rows, metric: str, label: str) -> None:
        """Bootstrap replicates: over windows (paired by window cut) for perplexity, over documents (paired by
        document set) for an lm-eval score, else normal."""
        resampler = self.resampler
        if metric == "ppl":
            found = runs_ppl_draws(rows, resampler, label)
        else:
            found = runs_example_draws(rows, resampler, label, metric)
        if found is not None:
            estimate.draws, estimate.paired_on = found
            return
        stderr_col = f"{metric}_stderr"
        stderr = 0.0
        if estimate.n > 1:
            stderr = estimate.std / math.sqrt(estimate.n)
        elif "metric" in self.df:  # lm-eval's per-task standard error, recorded as `<metric>_stderr`
            same = self.df[(self.df["run_id"].isin(rows["run_id"])) & (self.df["metric"] == stderr_col)] \
                if "run_id" in self.df else self.df.iloc[0:0]
            if not same.empty:
                stderr = float(same["value"].astype(float).mean())
        estimate.draws = normal_draws(estimate.mean, stderr, resampler.resamples, resampler.rng(label))


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


def _compare(left: Estimate, right: Estimate, op: type, tolerance: float) -> tuple[str, dict[str, Any], str]:
    """(verdict, comparison record, detail text) of `left op right` at 95%: the interval of the margin by
    which the claim holds (right - left for < and <=, left - right for > and >=) against ±band."""
    less = op in (ast.Lt, ast.LtE)
    band = tolerance * max(abs(left.mean), abs(right.mean))
    paired = left.paired_on is not None and left.paired_on == right.paired_on
    record: dict[str, Any] = {"op": OP_TEXT[op], "left": left.mean, "right": right.mean, "paired": paired}
    text = f"{_num(left)} vs {_num(right)}"
    lhs = left.draws if left.draws is not None else np.asarray(left.mean)
    rhs = right.draws if right.draws is not None else np.asarray(right.mean)
    margin = Interval.of(_broadcast((rhs - lhs) if less else (lhs - rhs)))
    record["margin_ci95"] = [margin.low, margin.high]
    if left.mean > 0 and right.mean > 0 and np.all(rhs > 0):
        ratio = Interval.of(_broadcast(lhs / rhs))
        record.update(ratio=left.mean / right.mean, ratio_ci95=[ratio.low, ratio.high])
        text += f": ratio {left.mean / right.mean:.4g} ({ratio.low:.4g}-{ratio.high:.4g}{'' if paired else ', unpaired'})"
    if margin.low == margin.high:
        text += " (point values: no per-window data or spread recorded)"
    if left.diverged and right.diverged:  # two collapsed models: which collapsed further says nothing
        return INCONCLUSIVE, record, text + " (both sides diverged)"
    if margin.low > band:
        return REPRODUCED, record, text
    if margin.high < -band:
        return CONTRADICTED, record, text
    return INCONCLUSIVE, record, text


def _broadcast(values) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=np.float64))


def _num(v: Estimate) -> str:
    ci = v.interval
    if ci is not None and ci.low != ci.high:
        return f"{v.mean:.4g} [{ci.low:.4g}, {ci.high:.4g}]"
    return f"{v.mean:.4g}{'±%.2g' % v.std if v.std else ''}"


OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


def _approx(a: Estimate, b: Estimate, rel: float) -> tuple[str, dict[str, Any], str]:
    """approx(a, b, rel): the relative gap a / b - 1 lies within ±rel over its whole 95% interval
    (reproduced), entirely outside it (contradicted), or straddles a bound (inconclusive)."""
    gap = a.mean / b.mean - 1 if b.mean else math.inf
    ad = a.draws if a.draws is not None else np.asarray(a.mean)
    bd = b.draws if b.draws is not None else np.asarray(b.mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        ci = Interval.of(_broadcast(ad / bd - 1))
    low, high = ci.low, ci.high
    if -rel <= low and high <= rel:
        verdict = REPRODUCED
    elif low > rel or high < -rel:
        verdict = CONTRADICTED
    else:
        verdict = INCONCLUSIVE
    paired = a.paired_on is not None and a.paired_on == b.paired_on
    record = {"op": "approx", "rel": rel, "gap": gap, "gap_ci95": [low, high], "paired": paired}
    text = (f"{_num(a)} vs {_num(b)}: gap {gap:+.2%} ({low:+.2%} to {high:+.2%}){'' if paired else ' (unpaired)'} "
            f"vs allowed ±{rel:.0%}")
    return verdict, record, text


def evaluate_claim(check: str, lookup: ResultLookup, claim_id: str = "", says: str = "", paper: Any = None,
                   tolerance: float = 0.0, model: str | None = None) -> ClaimResult:
    """Evaluate one claim at 95% (see the module docstring). `tolerance` (relative) widens the boundary."""
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
            result.verdict, record, result.detail = _approx(a, b, rel)
            result.comparisons = [record]
        elif isinstance(tree, ast.Compare):
            terms = [evaluator.term(tree.left)] + [evaluator.term(c) for c in tree.comparators]
            verdicts, details = [], []
            for (left, right), op in zip(zip(terms, terms[1:]), tree.ops):
                if type(op) not in COMPARATORS:
                    raise ClaimError(f"claim {claim_id!r}: comparison {type(op).__name__} not supported; use < <= > >=")
                verdict, record, text = _compare(left, right, type(op), tolerance)
                verdicts.append(verdict)
                result.comparisons.append(record)
                details.append(text)
            if CONTRADICTED in verdicts:
                result.verdict = CONTRADICTED
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
