"""Bootstrap intervals for perplexity and for comparisons between runs on the same windows.

Every perplexity record keeps, per evaluation window, the sum of its next-token NLLs
(`info.window_nll`) and the tokens each window predicts (`tokens_per_window`). A value's uncertainty is
a bootstrap over those windows; two values measured on the same windows (same model, task and window
cut) are compared *paired*: both are recomputed on the same resampled windows, so the window-to-window
difficulty, which dominates the spread of a single perplexity, cancels in their ratio.

lm-eval records keep acc / acc_norm per document (`info.example_scores.<metric>`); an accuracy is
resampled over its documents the same way, paired between runs on the same documents.

Seeded methods add a second level: each replicate also resamples the seed runs (with replacement) of
each value, independently per value (different methods' seeds are independent). Metrics without
per-window or per-document data (KL, method diagnostics, older accuracy records) fall back to a normal approximation from their
recorded standard error or seed spread; with neither they are point values (a zero-width interval, said
so in the claim's detail).

Resamples are seeded (`SEED`), so reports are reproducible; `RESAMPLES` = 2000, intervals at 95%.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 20240601


def _stable(key: object) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()[:8], "little")


class Resampler:
    """Window resamples shared by every value measured on the same windows (that makes comparisons paired),
    and seed resamples drawn independently per value."""

    def __init__(self, resamples: int = RESAMPLES, seed: int = SEED):
        self.resamples, self.seed = resamples, seed
        self._windows: dict[tuple, np.ndarray] = {}

    def window_indices(self, key: tuple, n_windows: int) -> np.ndarray:
        """[resamples, n_windows] indices, the same for every value whose windows are `key`."""
        full = (*key, n_windows)
        if full not in self._windows:
            rng = np.random.default_rng([self.seed, _stable(full)])
            self._windows[full] = rng.integers(0, n_windows, size=(self.resamples, n_windows))
        return self._windows[full]

    def rng(self, label: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, _stable(["value", label])])


def _mean_over_seeds(per_seed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[S, B] replicates per seed run -> [B] replicates of the mean over seeds, the seeds resampled too."""
    if per_seed.shape[0] == 1:
        return per_seed[0]
    picks = rng.integers(0, per_seed.shape[0], size=(per_seed.shape[1], per_seed.shape[0]))  # [B, S]
    return per_seed[picks, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)


def ppl_draws(window_nll: list[np.ndarray], tokens_per_window: int, indices: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates [resamples] of the mean-over-seeds perplexity of one value.

    window_nll: one array [W] of per-window NLL sums per seed run (all on the same windows)."""
    stacked = np.stack([np.asarray(w, dtype=np.float64) for w in window_nll])  # [S, W]
    n_windows = stacked.shape[1]
    return _mean_over_seeds(np.exp(stacked[:, indices].sum(axis=2) / (n_windows * tokens_per_window)), rng)


def mean_draws(example_scores: list[np.ndarray], indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates [resamples] of the mean-over-seeds average score (an accuracy) of one value.

    example_scores: one array [N] of per-document scores per seed run (all on the same documents)."""
    stacked = np.stack([np.asarray(e, dtype=np.float64) for e in example_scores])  # [S, N]
    return _mean_over_seeds(stacked[:, indices].mean(axis=2), rng)


def normal_draws(mean: float, stderr: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of a value known only by its mean and standard error (zero width when stderr is 0)."""
    if not stderr or not math.isfinite(stderr):
        return np.full(resamples, mean, dtype=np.float64)
    return mean + stderr * rng.standard_normal(resamples)


@dataclass(frozen=True)
class Interval:
    """A central `CONFIDENCE` interval of some replicates."""

    low: float
    high: float

    @classmethod
    def of(cls, draws: np.ndarray) -> Interval:
        tail = (1 - CONFIDENCE) / 2 * 100
        low, high = np.percentile(draws, [tail, 100 - tail])
        return cls(float(low), float(high))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def relative_half_width(self, center: float) -> float:
        return self.half_width / abs(center) if center else math.inf

    def __str__(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]"


def parse_numbers(value: object) -> np.ndarray | None:
    """A record's per-window NLLs or per-document scores (a list, or the JSON text the tidy table holds),
    else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value, dtype=np.float64)
    return None


def _by_seed(rows):
    """The runs in seed order, so a value's seed resamples do not depend on the order of the records (their
    run ids change with the code)."""
    return rows.sort_values("seed", kind="stable") if "seed" in rows and len(rows) > 1 else rows


#: What identifies the windows a perplexity was measured on (the pairing key)
WINDOW_KEY = ("model", "task", "protocol.seqlen", "protocol.bos_per_window")


def runs_ppl_draws(rows, resampler: Resampler, label: str) -> tuple[np.ndarray, tuple] | None:
    """(replicates of the mean-over-seeds perplexity of `rows`, the windows they resample) for one value's
    runs in the tidy table, or None when a run lacks per-window data or the runs used different windows."""
    if "info.window_nll" not in rows or "protocol.tokens_predicted" not in rows:
        return None
    rows = _by_seed(rows)
    nll = [parse_numbers(v) for v in rows["info.window_nll"]]
    if not nll or any(w is None for w in nll) or len({len(w) for w in nll}) != 1:
        return None
    first = rows.iloc[0]
    windows = len(nll[0])
    key = tuple(str(first.get(c)) for c in WINDOW_KEY)
    draws = ppl_draws(nll, int(first["protocol.tokens_predicted"]) // windows,
                      resampler.window_indices(key, windows), resampler.rng(label))
    return draws, (*key, windows)


#: What identifies the documents an lm-eval score was measured on (the pairing key)
EXAMPLE_KEY = ("model", "task", "protocol.limit", "protocol.num_fewshot")


def runs_example_draws(rows, resampler: Resampler, label: str, metric: str) -> tuple[np.ndarray, tuple] | None:
    """(replicates of the mean-over-seeds `metric` of `rows`, the documents they resample) for one value's
    lm-eval runs, or None when a run lacks per-document scores of that metric or the runs scored different
    documents."""
    column = f"info.example_scores.{metric}"
    if column not in rows:
        return None
    rows = _by_seed(rows)
    scores = [parse_numbers(v) for v in rows[column]]
    if not scores or any(e is None for e in scores) or len({len(e) for e in scores}) != 1:
        return None
    first = rows.iloc[0]
    key = tuple(str(first.get(c)) for c in EXAMPLE_KEY)
    draws = mean_draws(scores, resampler.window_indices(key, len(scores[0])), resampler.rng(label))
    return draws, (*key, len(scores[0]))
