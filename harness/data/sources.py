"""Where each dataset lives: the local mirror (PTQBENCH_DATA_DIR) or the Hugging Face hub.

The mirror layout is described in shared/data/README.md. A dataset's rows come out the same from
either source (same fields, same row boundaries), so the text protocols in `text.py` apply to both.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import PtqbenchError, UnknownNameError

ENV_VAR = "PTQBENCH_DATA_DIR"


class DatasetMissingError(PtqbenchError, FileNotFoundError):
    """A known dataset whose file is not in the configured data directory (or the hub load failed)."""


class DataFileError(PtqbenchError):
    """A dataset file of the mirror that is there but unreadable: not UTF-8, a line that is not JSON."""


@dataclass(frozen=True)
class Source:
    """One split of one dataset: its file in the mirror and how to get the same rows from the hub."""

    mirror: str  # path relative to the data dir
    hub: dict[str, Any]  # load_dataset kwargs (path, name, data_files, split)
    field: str | None = None  # row field for text corpora (None: whole JSON object for task data)
    note: str = ""  # what differs from the protocol's original source, recorded with every number


_C4_HUB = "allenai/c4"

#: (dataset, split) -> Source. Text corpora give strings, task data gives JSON objects.
SOURCES: dict[tuple[str, str], Source] = {
    ("wikitext2", "test"): Source("wikitext2/wiki.test.raw",
                                  {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}, "text"),
    ("wikitext2", "validation"): Source("wikitext2/wiki.valid.raw",
                                        {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1",
                                         "split": "validation"}, "text"),
    ("c4", "validation"): Source("c4/c4_validation_shard0_first1025.jsonl",
                                 {"path": _C4_HUB, "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                  "split": "validation"}, "text",
                                 "mirror holds the first 1025 docs of en validation shard 0"),
    ("c4", "train"): Source("c4/c4_train_shard0_first_docs.jsonl",
                            {"path": _C4_HUB, "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                             "split": "train"}, "text",
                            "mirror holds the first 1041 docs of en train shard 0"),
    ("ptb", "test"): Source("ptb/ptb.test.txt", {"path": "ptb-text-only/ptb_text_only", "split": "test"}, "sentence"),
    ("ptb", "validation"): Source("ptb/ptb.valid.txt", {"path": "ptb-text-only/ptb_text_only",
                                                        "split": "validation"}, "sentence"),
    # lm-eval task data: same fields as the hub datasets lm-eval reads (hub side used via lm-eval's stock tasks)
    ("piqa", "validation"): Source("piqa/validation.jsonl", {"path": "baber/piqa", "split": "validation"}),
    ("arc_easy", "test"): Source("arc_easy/test.jsonl", {"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "test"},
                                 note="mirror items have exactly 4 choices"),
    ("arc_challenge", "test"): Source("arc_challenge/test.jsonl",
                                      {"path": "allenai/ai2_arc", "name": "ARC-Challenge", "split": "test"},
                                      note="mirror items have exactly 4 choices"),
    ("hellaswag", "validation"): Source("hellaswag/validation_subset1000.jsonl",
                                        {"path": "Rowan/hellaswag", "split": "validation"},
                                        note="mirror holds a 1000-item subset of the 10042 validation items"),
    ("winogrande", "validation"): Source("winogrande/validation_processed.jsonl",
                                         {"path": "allenai/winogrande", "name": "winogrande_xl", "split": "validation"},
                                         note="processed partial-evaluation form (context_options, continuation, gold)"),
    ("lambada_openai", "test"): Source("lambada_openai/test.jsonl",
                                       {"path": "EleutherAI/lambada_openai", "name": "default", "split": "test"}),
    ("boolq", "validation"): Source("boolq/validation.jsonl",
                                    {"path": "aps/super_glue", "name": "boolq", "split": "validation"}),
    ("openbookqa", "test"): Source("openbookqa/test.jsonl", {"path": "allenai/openbookqa", "name": "main",
                                                             "split": "test"}),
    ("social_iqa", "validation"): Source("social_iqa/validation_processed.jsonl",
                                         {"path": "lighteval/siqa", "split": "validation"},
                                         note="processed letter-choice form (query, choices, gold)"),
    ("copa", "validation"): Source("copa/validation_processed.jsonl",
                                   {"path": "aps/super_glue", "name": "copa", "split": "validation"},
                                   note="processed form (query, choices, gold)"),
}

DATASETS: tuple[str, ...] = tuple(sorted({name for name, _ in SOURCES}))


#: Where the CLI looks for a mirror when PTQBENCH_DATA_DIR is unset: the one the Makefile finds, next to the
#: checkout (`../shared/data` with its README.md).
NEXT_TO_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_dir() -> Path | None:
    """The local mirror: $PTQBENCH_DATA_DIR; if unset, `../shared/data` next to the checkout when it has a
    README.md (as the Makefile does); None (the hub) when neither, or when the variable is set but empty."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return NEXT_TO_CHECKOUT if (NEXT_TO_CHECKOUT / "README.md").is_file() else None
    value = value.strip()
    return Path(value).expanduser().resolve() if value else None


def splits(name: str) -> list[str]:
    check_name(name)
    return sorted(split for ds, split in SOURCES if ds == name)


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, DATASETS)


def source(name: str, split: str) -> Source:
    check_name(name)
    try:
        return SOURCES[(name, split)]
    except KeyError:
        raise UnknownNameError(f"split of dataset {name!r}", split, splits(name)) from None


def available_in(directory: Path) -> list[str]:
    """Names of the folders in `directory` that hold at least one file."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and any(c.is_file() for c in p.iterdir()))


def mirror_path(name: str, split: str) -> Path:
    """Absolute path of a dataset file in the mirror; a one-line DatasetMissingError if it is absent."""
    src = source(name, split)
    root = data_dir()
    if root is None:
        raise DatasetMissingError(f"dataset {name!r} needs a local mirror but {ENV_VAR} is not set")
    path = root / src.mirror
    if not path.is_file():
        have = available_in(root)
        raise DatasetMissingError(
            f"dataset {name!r} ({split}) not found in data dir {root} (expected {src.mirror}); "
            f"available there: {', '.join(have) if have else 'nothing'}")
    return path


def check_available(needs: set[tuple[str, str]]) -> None:
    """Before any work: every (dataset, split) is in the mirror, or (no mirror) the hub is reachable; else one
    line naming what is missing, so a matrix stops before its first cell rather than failing every cell."""
    if not needs:
        return
    root = data_dir()
    if root is None:
        from harness.hub import hub_offline

        if hub_offline():
            names = ", ".join(f"{n} ({s})" for n, s in sorted(needs))
            why = (f"{ENV_VAR} is set but empty, which means the hub" if os.environ.get(ENV_VAR) is not None
                   else f"{ENV_VAR} is unset and there is none next to the checkout")
            raise DatasetMissingError(
                f"no data mirror ({why}) and the Hugging Face hub is unreachable here, so {names} cannot be read; "
                f"point {ENV_VAR} at a mirror (see README)")
        return
    missing = []
    for name, split in sorted(needs):
        try:
            mirror_path(name, split)
        except DatasetMissingError:
            missing.append(f"{name} ({split}) as {source(name, split).mirror}")
    if missing:
        have = available_in(root)
        raise DatasetMissingError(f"data dir {root} lacks {', '.join(missing)}; available there: "
                                  f"{', '.join(have) if have else 'nothing'}")


def _read_lines(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8") as f:
            return list(f)
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataFileError(f"data file {path} is not UTF-8 text (line {line}, byte {exc.start}: "
                                  f"{exc.reason}); re-download it or fix the mirror") from None
    except OSError as exc:
        raise DataFileError(f"data file {path} cannot be read: {exc.strerror or exc}") from None


def _mirror_rows(name: str, path: Path, field: str | None) -> list[Any]:
    lines = _read_lines(path)
    if path.suffix == ".jsonl":
        objs = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataFileError(f"data file {path} line {number} is not JSON ({exc.msg}); "
                                          f"re-download it or fix the mirror") from None
            if field and not (isinstance(obj, dict) and field in obj):
                raise DataFileError(f"data file {path} line {number} has no {field!r} field "
                                          f"(a JSON {type(obj).__name__}); re-download it or fix the mirror")
            objs.append(obj)
        return [o[field] for o in objs] if field else objs
    # Plain-text corpora. Iterating the file object gives exactly the rows the hub loaders yield.
    if name == "wikitext2":
        # hub wikitext rows: a non-blank line keeps its trailing "\n", a blank line becomes ""
        return [line if line.strip() else "" for line in lines]
    if name == "ptb":
        # hub ptb_text_only rows: each line stripped of its surrounding whitespace
        return [line.strip() for line in lines]
    raise AssertionError(f"no row rule for {name}")  # pragma: no cover


def _hub_rows(name: str, split: str, src: Source, limit: int | None) -> list[Any]:
    try:
        import datasets

        kwargs = dict(src.hub)
        if limit is not None and name == "c4":  # only the first docs of a huge shard are needed
            kwargs["split"] = f"{kwargs['split']}[:{limit}]"
        ds = datasets.load_dataset(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line naming the dataset
        msg = " ".join(str(exc).split())[:300]
        raise DatasetMissingError(f"dataset {name!r} ({split}): {ENV_VAR} is not set and the hub load of "
                                  f"{src.hub.get('path')} failed: {type(exc).__name__}: {msg}") from None
    return list(ds[src.field]) if src.field else [dict(r) for r in ds]


def load_rows(name: str, split: str, limit: int | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Rows of one split (strings for text corpora, dicts for task data) and where they came from."""
    src = source(name, split)
    root = data_dir()
    if root is not None:
        path = mirror_path(name, split)
        rows = _mirror_rows(name, path, src.field)
        where: dict[str, Any] = {"source": "mirror", "file": src.mirror}
    else:
        rows = _hub_rows(name, split, src, limit)
        where = {"source": "hub", "hub": {k: v for k, v in src.hub.items()}}
    if limit is not None:
        rows = rows[:limit]
    where.update(dataset=name, split=split, rows=len(rows))
    if src.note and where["source"] == "mirror":
        where["note"] = src.note
    return rows, where

