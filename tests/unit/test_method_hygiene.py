"""Method hygiene: methods/ talks to models only through the adapter API and to the harness only through
public names.

`harness.models.adapters` is the one place that knows model attribute names (`q_proj`, `self_attn`,
`input_layernorm`, `experts` inside the MoE block, config keys, ...); a method that spells one out works
on the families it was tried on and silently skips or breaks the others. A method that imports an
`_`-prefixed harness name depends on an internal that its owner may change at any time.

The checker reads the source (AST), so docstrings, comments and error-message prose may name anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
METHODS_DIR = ROOT / "methods"
HARNESS_DIR = ROOT / "harness"

# -- the model vocabulary of harness/models/adapters/*.py ------------------------------------------------
#: Attribute names of transformers decoder modules: never spelled out in a method (attribute, getattr
#: string or dotted parameter path such as "model.layers.0.self_attn.q_proj.weight").
MODEL_ATTRS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "self_attn", "input_layernorm", "post_attention_layernorm", "embed_tokens",
    "shared_expert", "shared_expert_gate",
})
#: Config keys the adapters read (the adapter exposes them: `adapter.attention`, `adapter.hidden_size`, ...).
CONFIG_KEYS = frozenset({
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "rope_parameters", "rope_theta",
    "partial_rotary_factor", "sliding_window", "tie_word_embeddings", "num_experts_per_tok", "model_type",
})
#: Receivers on which `.lm_head` is the harness API, not the model's attribute (adapter.lm_head, scheme.lm_head).
LM_HEAD_OWNERS = ("adapter", "scheme")
#: `.mlp.<name>` may only call nn.Module's own API on the block the adapter hands out.
MODULE_API = frozenset(dir(torch.nn.Module))
#: `<x>.model.<name>` / `<x>.decoder.<name>`: the decoder's insides (adapter.decoder is the model's, not an API).
DECODER_INSIDES = frozenset({"model", "layers", "norm", "embed_tokens", "rotary_emb"})
ATTR_FUNCS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_harness_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "harness":
        return False
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _last_name(node: ast.AST) -> str:
    """The identifier a receiver expression ends with: `ctx.adapter` -> 'adapter', `f(x)` -> ''."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _dotted(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ['a', 'b', 'c'] (None when the chain does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


class _Checker(ast.NodeVisitor):
    def __init__(self, filename: str, tree: ast.AST):
        self.filename = filename
        self.found: list[tuple[int, str]] = []
        self.harness_aliases: set[str] = set()  # local names bound to harness modules
        self.docstrings = _docstring_nodes(tree)

    def add(self, node: ast.AST, msg: str) -> None:
        self.found.append((node.lineno, msg))

    # -- imports of private harness names --------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != "harness":
                continue
            bad = [p for p in alias.name.split(".") if _is_private(p)]
            if bad:
                self.add(node, f"imports private harness module {alias.name}")
            self.harness_aliases.add(alias.asname or "harness")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] == "harness":
            if any(_is_private(p) for p in module.split(".")):
                self.add(node, f"imports from private harness module {module}")
            for alias in node.names:
                if _is_private(alias.name):
                    self.add(node, f"imports private name {alias.name} from {module}")
                elif _is_harness_module(f"{module}.{alias.name}"):
                    self.harness_aliases.add(alias.asname or alias.name)
        self.generic_visit(node)

    # -- attribute access --------------------------------------------------------------------------------
    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr, recv = node.attr, node.value
        chain = _dotted(node)
        if chain and chain[0] in self.harness_aliases and any(_is_private(p) for p in chain[1:]):
            self.add(node, f"uses private harness name {'.'.join(chain)}")
        if attr in MODEL_ATTRS:
            self.add(node, f"model attribute .{attr} (use the adapter API)")
        elif attr == "lm_head" and not any(o in _last_name(recv).lower() for o in LM_HEAD_OWNERS):
            self.add(node, "model attribute .lm_head (use adapter.lm_head / adapter.lm_head_site())")
        elif attr == "experts" and (isinstance(node.ctx, ast.Store) or _last_name(recv) == "parent"
                                    or (isinstance(recv, ast.Attribute) and recv.attr == "mlp")):
            how = "assigns" if isinstance(node.ctx, ast.Store) else f"reads {_last_name(recv)}.experts, i.e."
            self.add(node, f"{how} the MoE block's .experts (use LayerView.experts / Experts.set_module)")
        elif isinstance(recv, ast.Attribute) and recv.attr == "mlp" and attr not in MODULE_API:
            # `x.mlp.<attr>` (a bare local `mlp` may be anything, e.g. a learned transform)
            self.add(node, f"reaches into the MLP block (.mlp.{attr}; use the adapter's LayerView)")
        elif attr in CONFIG_KEYS and _last_name(recv) == "config":
            self.add(node, f"reads config.{attr} (use adapter.attention / adapter.hidden_size / ...)")
        elif attr in DECODER_INSIDES and _last_name(recv) in ("model", "decoder") and isinstance(recv, ast.Attribute):
            self.add(node, f"reaches into the decoder (.{_last_name(recv)}.{attr}; use the adapter)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ATTR_FUNCS and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                if name.value in MODEL_ATTRS or name.value in ("experts", "mlp") or (
                        name.value in CONFIG_KEYS and _last_name(node.args[0]) == "config"):
                    self.add(node, f"{func.id}(..., {name.value!r}) names a model attribute (use the adapter API)")
                elif _is_private(name.value) and _dotted(node.args[0]) and \
                        _dotted(node.args[0])[0] in self.harness_aliases:
                    self.add(node, f"{func.id}(..., {name.value!r}) reads a private harness name")
        self.generic_visit(node)

    # -- parameter paths in strings ("model.layers.0.mlp.down_proj.weight") -------------------------------
    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self.docstrings and not any(c.isspace() for c in node.value):
            parts = set(node.value.replace("/", ".").replace(":", ".").split("."))
            hits = sorted(parts & MODEL_ATTRS)
            if hits:
                self.add(node, f"string {node.value!r} names model attribute {hits[0]} (use the adapter API)")


def find_offences(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for every use of a model attribute name or a private harness name in `source`."""
    tree = ast.parse(source, filename=filename)
    checker = _Checker(filename, tree)
    checker.visit(tree)
    return [f"{filename}:{line}: {msg}" for line, msg in sorted(set(checker.found))]


def method_files() -> list[Path]:
    return sorted(METHODS_DIR.rglob("*.py"))


def test_methods_use_only_the_adapter_api_and_public_harness_names():
    offences = []
    for path in method_files():
        offences += find_offences(path.read_text(), str(path.relative_to(ROOT)))
    assert not offences, f"{len(offences)} hygiene offence(s) in methods/:\n" + "\n".join(offences)


# ---- the checker itself ---------------------------------------------------------------------------------

CLEAN = '''
"""Docstrings may say q_proj, self_attn.o_proj, model.layers and lm_head."""
import torch
import harness.quant
from harness.quant import apply_scheme, get_scheme
from harness.quant.apply import wrap_linear
from harness.models import get_adapter
from harness import rotation

class M:
    def apply(self, model, adapter, state, scheme):
        # comments may say down_proj too
        for view in adapter.layers():
            view.q.weight.data.mul_(2)
            for name, lin in view.linears().items():
                wrap_linear(view.attn, name)
            if view.experts is not None:
                view.experts.gate_up.data.zero_()
                view.experts.set_module(view.experts.module)
                e = view.experts.down[0]
            view.mlp.register_forward_hook(print)
            state.layers.append(view.index)
        head = adapter.lm_head.weight
        mlp = self.transforms["mlp"]
        w = mlp.weight(head)
        if scheme.lm_head or getattr(scheme, "lm_head", False):
            raise ValueError("a scheme that keeps lm_head and embed_tokens in FP")
        d = adapter.attention.head_dim, adapter.hidden_size, adapter.decoder, adapter.model
        harness.quant.apply_scheme(model, adapter, scheme)
        rotation.install.__name__
        _local = 1
        self._cache = {"layers.0.q": _local}
        return apply_scheme(model, adapter, get_scheme("w4a4"))
'''


def test_the_checker_passes_clean_code():
    assert find_offences(CLEAN) == []


@pytest.mark.parametrize("line, expected", [
    ("x = layer.self_attn.q_proj", "model attribute .self_attn"),
    ("x = layer.mlp.down_proj.weight", "model attribute .down_proj"),
    ("x = module.gate_up_proj", "model attribute .gate_up_proj"),
    ("x = layer.input_layernorm", "model attribute .input_layernorm"),
    ("x = layer.post_attention_layernorm.weight", "model attribute .post_attention_layernorm"),
    ("x = model.model.embed_tokens", "model attribute .embed_tokens"),
    ("x = block.shared_expert", "model attribute .shared_expert"),
    ("x = model.lm_head.weight", "model attribute .lm_head"),
    ("layer.experts.parent.experts = q", "assigns the MoE block's .experts"),
    ("e = view.experts.parent.experts", "reads parent.experts"),
    ("e = layer.mlp.experts", "reads mlp.experts"),
    ("g = view.mlp.gate", "reaches into the MLP block (.mlp.gate"),
    ("n = model.config.num_attention_heads", "reads config.num_attention_heads"),
    ("n = cfg.config.hidden_size", "reads config.hidden_size"),
    ("l = model.model.layers[0]", "reaches into the decoder (.model.layers"),
    ("l = adapter.decoder.layers", "reaches into the decoder (.decoder.layers"),
    ("l = getattr(attn, 'o_proj')", "getattr(..., 'o_proj')"),
    ("l = hasattr(block, 'experts')", "hasattr(..., 'experts')"),
    ("p = params['model.layers.0.self_attn.q_proj.weight']", "names model attribute q_proj"),
    ("ok = name.endswith('down_proj')", "names model attribute down_proj"),
    ("from harness.quant.apply import _linear_sites, wrap_linear", "imports private name _linear_sites"),
    ("from harness.rotation._impl import fuse", "imports from private harness module harness.rotation._impl"),
    ("import harness._private", "imports private harness module harness._private"),
    ("import harness.quant.apply\nharness.quant.apply._linear_sites(v)", "uses private harness name "
                                                                         "harness.quant.apply._linear_sites"),
    ("import harness.quant.apply as qa\nqa._linear_sites(v)", "uses private harness name qa._linear_sites"),
    ("from harness.quant import apply\napply._linear_sites(v)", "uses private harness name apply._linear_sites"),
    ("from harness.quant import apply\ngetattr(apply, '_linear_sites')", "reads a private harness name"),
])
def test_the_checker_flags(line, expected):
    found = find_offences(line, "m.py")
    assert len(found) >= 1 and any(expected in f for f in found), found
    assert all(f.startswith("m.py:") for f in found)


def test_the_checker_reports_every_file_and_line(tmp_path):
    src = "import torch\nx = a.q_proj\ny = 1\nz = b.k_proj; w = c.v_proj\n"
    assert find_offences(src, "methods/x.py") == [
        "methods/x.py:2: model attribute .q_proj (use the adapter API)",
        "methods/x.py:4: model attribute .k_proj (use the adapter API)",
        "methods/x.py:4: model attribute .v_proj (use the adapter API)",
    ]


def test_private_names_of_other_packages_and_locals_are_fine():
    src = ("from torch.nn import functional as F\nfrom torch._C import _get_tracing_state\n"
           "import methods.gptq as g\nx = F._pair\ny = self._state\nfrom harness.quant import _scheme_cache\n")
    assert find_offences(src, "m.py") == ["m.py:6: imports private name _scheme_cache from harness.quant"]
