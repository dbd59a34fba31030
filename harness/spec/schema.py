"""The YAML schema of an experiment spec: pydantic models, typed, unknown keys rejected.

Matrix entries (models, methods, schemes, tasks) stay loosely typed here: `harness.spec.expand` checks
them one by one, which gives better errors than pydantic unions do.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibSettings(Strict):
    corpus: str = "c4"
    n: PositiveInt = 128
    seqlen: PositiveInt = 2048


class PplSettings(Strict):
    seqlen: PositiveInt = 2048
    max_windows: PositiveInt | None = None
    batch_size: PositiveInt = 1  # speed only: not part of the run id


class LmEvalSettings(Strict):
    limit: PositiveInt | None = None
    num_fewshot: NonNegativeInt = 0
    batch_size: PositiveInt = 8  # speed only: not part of the run id


class KlSettings(Strict):
    dataset: str = "wikitext2"
    seqlen: PositiveInt = 512
    max_windows: PositiveInt = 8
    topk: PositiveInt = 64  # FP top-k logits kept per token (+ one tail bucket); harness.eval.DEFAULT_TOPK


class GreedySettings(Strict):
    dataset: str = "wikitext2"
    prompt_len: PositiveInt = 256  # prompt tokens (the first tokens of each evaluation window)
    new_tokens: PositiveInt = 64  # FP greedy tokens to agree with
    prompts: PositiveInt = 8


class RoutingSettings(Strict):
    dataset: str = "wikitext2"
    seqlen: PositiveInt = 512
    windows: PositiveInt = 4  # evaluation windows whose routing is compared with the FP model's


KIND_SETTINGS: dict[str, type[Strict]] = {"ppl": PplSettings, "lm_eval": LmEvalSettings, "kl": KlSettings,
                                          "greedy": GreedySettings, "routing": RoutingSettings}
#: Task settings that change only the speed, never the number: left out of the run id.
NOT_HASHED = {"lm_eval": {"batch_size"}, "ppl": {"batch_size"}}


class MethodEntry(Strict):
    name: str
    params: Union[dict[str, Any], list[dict[str, Any]]] = Field(default_factory=dict)
    label: str | None = None


class Matrix(Strict):
    """The keys a scale may override."""

    models: list[str] | None = None
    methods: list[Any] | None = None
    schemes: list[Any] | None = None
    tasks: list[Any] | None = None
    seeds: list[Any] | None = None  # checked one by one in expand (valid_seed): bools and negatives rejected
    calib: Union[dict[str, Any], list[Any]] | None = None
    ppl: dict[str, Any] | None = None
    lm_eval: dict[str, Any] | None = None
    kl: dict[str, Any] | None = None
    greedy: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    include: list[Any] | None = None
    exclude: list[Any] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    # torch's intra-op threads for every cell (CPU reductions such as a Cholesky depend on it); see DEFAULT_THREADS
    threads: int | None = Field(default=None, ge=1, le=1024, strict=True)
    # what one cell asks the scheduler for (Ray), e.g. {num_gpus: 2}; not part of any run id
    resources: dict[Literal["num_gpus", "num_cpus"], Annotated[float, Field(ge=0, le=1e6)]] | None = None


class SpecFile(Matrix):
    """The whole YAML file."""

    name: str | None = None
    title: str | None = None
    description: str | None = None
    paper: str | None = None
    notes: str | None = None
    claims: list[Any] | None = None  # read by the report, not by the runner
    reported: list[Any] | None = None
    scales: dict[str, Matrix] = Field(default_factory=dict)


#: Keys a scale merges into the top level key by key (every other key it replaces).
MERGED_MAPPINGS = ("ppl", "lm_eval", "kl", "greedy", "routing")
SEED_LIMIT = 2 ** 63
#: torch intra-op threads of a cell unless the spec says `threads:`. CPU results depend on the thread count
#: (a blocked Cholesky or reduction sums in another order), so it is fixed per cell, not taken from the machine:
#: the same run id gives the same number under every executor. 2 is the CI machine's core count.
DEFAULT_THREADS = 2


def valid_seed(value: Any) -> bool:
    """A seed is a non-negative int below 2**63 (bool is not an int here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT


RULE_KEYS = ("model", "method", "params", "scheme", "seed", "task")
