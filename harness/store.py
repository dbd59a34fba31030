"""Result store: one JSON record per run under `<results>/runs/<run_id>.json`, written atomically.

The results directory is, in order: an explicit argument, `$PTQBENCH_RESULTS_DIR`, `./results`.
A record is written to a hidden temporary file in the same directory, fsynced, then renamed over the
final name (`os.replace` is atomic on POSIX), so a crash leaves either the old record or the new one,
never half a file. Calibration states are cached under `<results>/cache/calib/<key>/`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.claims import Claim
from harness.errors import PtqbenchError, UnknownNameError
from harness import fingerprint

DONE, FAILED = "done", "failed"
#: The error text of a run whose perplexity was measured but diverged (written by harness.runner.check_result).
DIVERGED_MARK = "RunFailure: diverged:"


def is_diverged(record: dict[str, Any] | None) -> bool:
    """A failed run whose number was measured but is above the divergence limit: a deterministic outcome (the
    value stays in its metrics), so it is not retried, is not an error exit, and still counts in claims."""
    return bool(record) and record.get("status") == FAILED and DIVERGED_MARK in str(record.get("error"))
# Record fields that hold nested config: flattened into dotted columns by `load_results`.
_NESTED = ("method_params", "scheme_config", "protocol", "calib", "timings", "versions", "model_source", "info",
           "kv_cache")


class StoreWarning(UserWarning):
    """Something in the results directory was unreadable and set aside (the run goes on)."""


#: A run id, paper id or label used as a file name: no separators, no leading dot, no "..".
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
#: Temporary files / directories older than this (seconds) are a killed writer's leftovers.
STALE_TMP_S = 600.0


def check_name(kind: str, value: object) -> str:
    """`value` if it is a safe file name (`[A-Za-z0-9][A-Za-z0-9._-]*`, no ".."); else a one-line error."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        raise PtqbenchError(f"invalid {kind} {shown}; valid: a name of letters, digits, '.', '_', '-' "
                            f"starting with a letter or digit, without '..'")
    return value


def inside(root: str | os.PathLike, path: str | os.PathLike, kind: str = "path") -> Path:
    """`path` resolved, if it lies inside `root` (resolved); else a one-line error."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise PtqbenchError(f"{kind} {str(path)!r} resolves outside {str(root_r)!r}; refusing to write there")
    return path_r


def results_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("PTQBENCH_RESULTS_DIR") or "results")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _json_safe(obj: Any) -> Any:
    """NaN/Inf are not JSON: store them as strings so the file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class Store:
    """The runs directory plus the calibration cache of one results directory."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = results_dir(root)
        self.runs = self.root / "runs"
        self.calib_cache = self.root / "cache" / "calib"
        self._opened = False
        self._warned: set[str] = set()

    # --- opening -------------------------------------------------------------------------------
    def open_for_writing(self) -> Store:
        """Check, before any work, that records and calibration states can be written here (one-line
        error otherwise), and remove the temporary files a killed writer left (only ones older than
        `STALE_TMP_S`, so a concurrent writer's live temporaries survive)."""
        if self._opened:
            return self
        for d in (self.root, self.runs, self.calib_cache):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except (OSError, ValueError) as exc:
                raise PtqbenchError(f"results directory {str(self.root)!r} is not usable: cannot create "
                                    f"{str(d)!r}: {getattr(exc, 'strerror', None) or exc}") from None
            if not d.is_dir():
                raise PtqbenchError(f"results directory {str(self.root)!r} is not usable: {str(d)!r} is not a directory")
            try:
                fd, probe = tempfile.mkstemp(dir=d, prefix=".probe.", suffix=".tmp")
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise PtqbenchError(f"results directory {str(self.root)!r} is not writable: {str(d)!r}: "
                                    f"{exc.strerror or exc}") from None
        self._opened = True
        self.clean_stale_temporaries()
        return self

    def clean_stale_temporaries(self, older_than: float = STALE_TMP_S) -> list[Path]:
        """Remove `runs/.*.tmp` records and `cache/calib/.KEY.*` directories older than `older_than` s."""
        now, removed = time.time(), []
        candidates = []
        if self.runs.is_dir():
            candidates += [p for p in self.runs.glob(".*.tmp")]
        if self.calib_cache.is_dir():
            candidates += [p for p in self.calib_cache.glob(".*") if p.name != ".bad"]
        for p in candidates:
            try:
                if now - p.lstat().st_mtime < older_than:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            except OSError:
                continue
        return removed

    # --- records -------------------------------------------------------------------------------
    def path(self, run_id: str) -> Path:
        check_name("run id", run_id)
        return inside(self.runs, self.runs / f"{run_id}.json", "run record")

    def write(self, record: dict[str, Any]) -> Path:
        if "run_id" not in record:
            raise PtqbenchError(f"a record needs a run_id; got the keys {sorted(record)[:20]}")
        if record.get("status") not in (DONE, FAILED):
            raise PtqbenchError(f"invalid record status {str(record.get('status'))[:80]!r}; valid: {DONE}, {FAILED}")
        path = self.path(record["run_id"])
        self.open_for_writing()
        _atomic_write_text(path, json.dumps(_json_safe(record), sort_keys=True, indent=1, default=str) + "\n")
        return path

    def _set_aside(self, path: Path, why: str) -> None:
        """Warn once naming the file, and move it to `runs/.bad/` so later commands skip it quietly."""
        moved = ""
        try:
            bad = self.runs / ".bad"
            bad.mkdir(exist_ok=True)
            target = bad / f"{path.name}.{int(time.time())}"
            os.replace(path, target)
            moved = f"; moved to {target}"
        except OSError:
            pass
        if str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(f"ptqbench: skipping unreadable run record {path}: {why}{moved}", StoreWarning, stacklevel=3)

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            if not path.is_file():
                if path.exists():
                    self._set_aside(path, "not a regular file")
                return None
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._set_aside(path, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            return None
        if not isinstance(record, dict) or "run_id" not in record or "status" not in record:
            self._set_aside(path, f"not a run record (a JSON {type(record).__name__} without run_id/status)")
            return None
        return record

    def get(self, run_id: str) -> dict[str, Any] | None:
        path = self.path(run_id)
        if not os.path.lexists(path):
            return None
        return self._read(path)

    def status(self, run_id: str) -> str | None:
        record = self.get(run_id)
        return None if record is None else record.get("status")

    def check_readable(self) -> None:
        """A one-line error when the results directory (or its runs/) exists but is not a directory."""
        for d in (self.root, self.runs):
            if d.exists() and not d.is_dir():
                raise PtqbenchError(f"results directory {str(self.root)!r} is not usable: {str(d)!r} is not a directory")

    def records(self) -> Iterator[dict[str, Any]]:
        self.check_readable()
        if not self.runs.is_dir():
            return
        for path in sorted(self.runs.glob("*.json")):
            if path.name.startswith("."):
                continue  # a temporary file left by a crash
            record = self._read(path)
            if record is not None:
                yield record

    def find(self, prefix: str) -> dict[str, Any]:
        """The record whose run id starts with `prefix` (unique)."""
        check_name("run id", prefix)
        self.check_readable()
        matches = sorted(p.stem for p in self.runs.glob(f"{glob_escape(prefix)}*.json") if not p.name.startswith("."))
        if len(matches) == 1:
            record = self.get(matches[0])
            if record is not None:
                return record
            matches = []
        if not matches:
            known = sorted(p.stem for p in self.runs.glob("*.json")) if self.runs.is_dir() else []
            shown = known[:20] + ([f"... and {len(known) - 20} more (ptqbench table lists them)"] if len(known) > 20 else [])
            raise UnknownNameError(f"run id in {self.runs}", prefix, shown or ["(no runs)"])
        raise PtqbenchError(f"run id prefix {prefix!r} is ambiguous: {', '.join(matches[:10])}")

    # --- claims (concurrent drivers) ----------------------------------------------------------
    def claim(self, kind: str, key: str) -> Claim:
        """The claim on a run (`kind="run"`, key = run id) or a calibration (`"calib"`, its cache key)."""
        check_name(f"{kind} key", key)
        return Claim(self.root / "claims", f"{kind}-{key}")

    # --- calibration cache ---------------------------------------------------------------------
    def calib_dir(self, key: str) -> Path:
        check_name("calibration key", key)
        return inside(self.calib_cache, self.calib_cache / key, "calibration state")

    def has_calib(self, key: str) -> bool:
        """A complete, intact state is cached under the key. A damaged one (a file truncated or changed
        since it was saved) is moved to `cache/calib/.bad/` with one warning and counts as missing, so
        the cell recomputes it instead of failing on every rerun."""
        d = self.calib_dir(key)
        if not ((d / "state.safetensors").exists() and (d / "state.json").exists()):
            return False
        problem = verify_calib_dir(d)
        if problem is None:
            return True
        moved = ""
        try:
            bad = self.calib_cache / ".bad"
            bad.mkdir(parents=True, exist_ok=True)
            target = bad / f"{key}.{int(time.time())}"
            os.replace(d, target)
            moved = f"; moved to {target}"
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            moved = "; removed"
        if f"calib:{key}" not in self._warned:
            self._warned.add(f"calib:{key}")
            warnings.warn(f"ptqbench: cached calibration state {d} is damaged ({problem}){moved}; recomputing it",
                          StoreWarning, stacklevel=2)
        return False

    def save_calib(self, key: str, state) -> Path:
        """Save a `State` under the key: written to a temporary directory, then renamed into place."""
        final = self.calib_dir(key)
        self.open_for_writing()
        tmp = Path(tempfile.mkdtemp(dir=self.calib_cache, prefix=f".{key}."))
        try:
            state.save(tmp)
            # what computed it, readable without the state's codec (`ptqbench cache du`)
            info = {k: v for k, v in (state.meta.get("_ptqbench") or {}).items() if k in ("cell", "created_at")}
            info["code_executed"] = fingerprint.snapshot()  # what computed it (harness.fingerprint)
            (tmp / CALIB_INFO).write_text(json.dumps(info, indent=1) + "\n")
            write_manifest(tmp)
            try:
                os.replace(tmp, final)
            except OSError as exc:  # a concurrent writer got there first: identical content by construction
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                    raise
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def calib_info(self, key: str) -> dict[str, Any]:
        """The cached state's info.json (cell, created_at, code_executed), {} if none is readable."""
        try:
            return json.loads((self.calib_dir(key) / CALIB_INFO).read_text())
        except (OSError, ValueError):
            return {}

    def calib_entries(self) -> list[dict[str, Any]]:
        """Every cached calibration: key, bytes, what computed it (cell), when, and whether a run record uses it."""
        if not self.calib_cache.is_dir():
            return []
        used = {r.get("calib_key") for r in self.records()}
        out = []
        for d in sorted(p for p in self.calib_cache.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            info: dict[str, Any] = {}
            try:
                info = json.loads((d / CALIB_INFO).read_text())
            except (OSError, ValueError):
                pass
            out.append({"key": d.name, "bytes": size, "cell": info.get("cell", "?"),
                        "created_at": info.get("created_at", "?"), "mtime": d.stat().st_mtime,
                        "used": d.name in used})
        return out

    def cache_bytes(self) -> tuple[int, int]:
        """(bytes, number of states) of the calibration cache."""
        entries = self.calib_entries()
        return sum(e["bytes"] for e in entries), len(entries)

    def prune_calib(self, unused: bool = False, older_than_days: float | None = None,
                    everything: bool = False) -> list[dict[str, Any]]:
        """Remove cached calibrations (those no run record uses, those older than N days, or all); returns them.
        A removed state is recomputed by the next run that needs it."""
        if not (unused or everything or older_than_days is not None):
            raise PtqbenchError("cache prune needs what to remove: --unused, --older-than DAYS or --all")
        now, removed = time.time(), []
        for entry in self.calib_entries():
            old = older_than_days is not None and now - entry["mtime"] > older_than_days * 86400
            if everything or old or (unused and not entry["used"]):
                shutil.rmtree(self.calib_cache / entry["key"], ignore_errors=True)
                removed.append(entry)
        return removed

    def load_calib(self, key: str, state_type: type | None = None, device: str = "cpu"):
        """The State saved under the key, rebuilt as `state_type` (a harness.state.State subclass)."""
        from harness.state import State

        d = self.calib_dir(key)
        problem = verify_calib_dir(d)
        if problem is not None:
            raise PtqbenchError(f"cached calibration state {d} is damaged ({problem}); rerun to recompute it")
        return (state_type or State).load(d, device=device)


MANIFEST = "manifest.json"
CALIB_INFO = "info.json"
_VERIFIED: dict[tuple, str | None] = {}  # (dir, files' size + mtime) -> problem or None, per process


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
    """`manifest.json`: size and sha256 of every file of a saved calibration state."""
    directory = Path(directory)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    _atomic_write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def _safetensors_problem(path: Path) -> str | None:
    """A cheap truncation check for states saved before manifests: the header's offsets cover the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name}: {size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            return f"{path.name}: header of {n} bytes does not fit in {size} bytes"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name}: unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
              default=0)
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, header says {8 + n + end}"
    return None


def verify_calib_dir(directory: str | os.PathLike) -> str | None:
    """None if the state in `directory` matches its manifest (sizes and sha256; verified once per process
    for given sizes and mtimes), else what is wrong. States without a manifest get a truncation check."""
    d = Path(directory)
    try:
        files = sorted(p for p in d.iterdir() if p.is_file())
        key = (str(d.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if key in _VERIFIED:
        return _VERIFIED[key]
    problem = None
    try:
        if (d / MANIFEST).exists():
            manifest = json.loads((d / MANIFEST).read_text())["files"]
            for name, want in sorted(manifest.items()):
                p = d / name
                if not p.is_file():
                    problem = f"{name} missing"
                elif p.stat().st_size != want["size"]:
                    problem = f"{name}: {p.stat().st_size} bytes, saved {want['size']}"
                elif _sha256(p) != want["sha256"]:
                    problem = f"{name}: sha256 differs from the one saved"
                if problem:
                    break
        else:
            for p in files:
                if p.suffix == ".safetensors":
                    problem = _safetensors_problem(p)
                    if problem:
                        break
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"unreadable manifest: {type(exc).__name__}"
    _VERIFIED[key] = problem
    return problem


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_results(path: str | os.PathLike | None = None):
    """Tidy DataFrame: one row per run x metric; every config field is a column.

    Nested config (method_params, scheme_config, protocol, calib, timings, versions, model_source,
    info, kv_cache) becomes dotted
    columns such as `method_params.damp` or `protocol.seqlen`. A failed run gives one row with
    metric NaN and its `error`, so failures stay visible in every table.
    """
    import pandas as pd

    rows = []
    for record in Store(path).records():
        base: dict[str, Any] = {}
        for key, value in record.items():
            if key in ("metrics", "code_executed"):  # code_executed: provenance, kilobytes per record
                continue
            if key in _NESTED and isinstance(value, dict):
                _flatten(key, value, base)
            elif isinstance(value, (dict, list)):
                base[key] = json.dumps(value, sort_keys=True)
            else:
                base[key] = value
        base["method_params_json"] = json.dumps(record.get("method_params") or {}, sort_keys=True)
        metrics = record.get("metrics") or {}
        if not metrics:
            rows.append({**base, "metric": None, "value": math.nan})
        for name, value in metrics.items():
            rows.append({**base, "metric": name, "value": _to_float(value)})
    return pd.DataFrame(rows)


def export_parquet(out: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write `load_results(path)` to a parquet file (mixed-type columns are stored as strings)."""
    df = load_results(path)
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col].dropna()}
            if len(kinds) > 1:
                df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    return out
