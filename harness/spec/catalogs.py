"""The names a spec may use (models, tasks, corpora, schemes) and the defaults of this machine.

Small functions, looked up through this module at call time, so tests can substitute toy catalogs.
"""
from __future__ import annotations

from typing import Any

from harness.errors import PtqbenchError
from harness.spec.hashing import content_hash

PPL_DATASETS = ("wikitext2", "c4", "ptb")


def task_catalog() -> dict[str, str]:
    """Known task names -> kind ("ppl", "lm_eval", "kl", "greedy", "routing")."""
    out = {name: "ppl" for name in PPL_DATASETS}
    try:
        from harness import eval as heval

        kinds = getattr(heval, "task_kinds", None)
        if callable(kinds):
            out.update(kinds())
        else:
            for name in heval.list_tasks():
                out.setdefault(name, "lm_eval")
    except (ImportError, AttributeError):
        pass
    out["kl"] = "kl"
    out["greedy"] = "greedy"
    out["routing"] = "routing"
    return out


def calib_corpora() -> list[str]:
    try:
        from harness.data import CALIB_CORPORA

        return sorted(CALIB_CORPORA)
    except ImportError:
        return ["c4", "wikitext2"]


def model_catalog() -> list[str]:
    try:
        from harness.models import list_models

        return list(list_models())
    except ImportError:
        return []


def model_source(name: str, revision: str | None) -> dict[str, Any]:
    """What the model name resolves to (hub id + revision, or a file fingerprint); part of the run id."""
    try:
        from harness import models as hmodels

        fingerprint = getattr(hmodels, "model_fingerprint", None)
        if callable(fingerprint):
            return dict(fingerprint(name, revision))
    except ImportError:
        pass
    return {"name": name, "revision": revision}


def resolve_scheme(entry: str | dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """(label, scheme object, scheme.to_dict()) for a preset name or an inline dict."""
    from harness import quant

    if isinstance(entry, str):
        scheme = quant.get_scheme(entry)
        label = entry
    else:
        data = dict(entry)
        builder = getattr(quant.QuantScheme, "from_dict", None)
        scheme = builder(data) if callable(builder) else quant.QuantScheme(**data)
        label = data.get("name") or f"custom-{content_hash(data, 8)}"
    config = scheme.to_dict()
    return str(label), scheme, config


BASELINE_SCHEME = "w16a16"


def baseline_scheme() -> tuple[str, Any, dict[str, Any] | None]:
    """The scheme cell of methods that ignore schemes (FP): named w16a16, as the reports expect."""
    try:
        return resolve_scheme(BASELINE_SCHEME)
    except (ImportError, PtqbenchError):
        return BASELINE_SCHEME, None, None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


from harness.devices import DEVICE_NAMES, check_device  # noqa: E402,F401  (re-exported: the spec's devices)


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"
