"""The adapter API: the one place that knows model-specific attribute names.

Methods (rotation fusion, GPTQ, smoothing, quantized execution) see a decoder-only model only through
an adapter:

    adapter = get_adapter(model)
    adapter.attention            # AttentionGeometry: heads, KV heads, head_dim, RoPE, QK-norm kind
    adapter.embed, adapter.final_norm, adapter.lm_head, adapter.tied_embeddings
    for layer in adapter.layers():          # LayerView per decoder layer
        layer.attn_norm -> layer.q, layer.k, layer.v     (share the normed residual)
        attention output -> layer.o
        layer.mlp_norm  -> layer.mlp_in (gate, up | shared expert's) + routers + experts' gate_up
        act(gate) * up  -> layer.mlp_out (down | shared expert's down); per expert -> experts' down
        layer.groups()  # the same as a list of LinearGroup
    for ref in adapter.linear_weights():    # every weight matrix to quantize, one expert slice at a time
        ref.name, ref.weight ([out, in] view, writable in place), ref.param, ref.expert

transformers 5 keeps MoE experts as fused 3-D parameters (no nn.Linear per expert):
`gate_up_proj [E, 2I, H]` (gate rows first, then up rows) and `down_proj [E, H, I]`; a walker over
nn.Linear would silently skip every routed expert, hence `linear_weights()`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes of the attention block and how Q/K are post-processed before the dot product."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None
    rope_type: str
    rotary_dim: int  # leading channels of each head that RoPE rotates (head_dim unless partial RoPE)
    qk_norm: str | None  # None, "per_head" (Qwen3: RMSNorm over head_dim) or "full" (OLMoE: over all heads)
    qkv_bias: bool
    sliding_window: int | None

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass
class Experts:
    """The routed experts of one MoE layer (transformers 5 fused layout) and what surrounds them."""

    module: nn.Module  # holds gate_up_proj [E, 2I, H] and down_proj [E, H, I] (possibly a QuantExperts)
    router: nn.Module  # .weight [E, H]: reads the normed residual; kept in full precision
    parent: nn.Module  # the sparse-MoE block; `parent.experts` is `module` (replace it there)
    top_k: int
    shared: nn.Module | None = None  # shared expert MLP (Qwen2-MoE), plain nn.Linear layers
    shared_gate: nn.Module | None = None  # sigmoid gate of the shared expert, Linear [1, H]; FP
    attr: str = "experts"  # `parent.<attr>` is `module`

    @property
    def gate_up(self) -> nn.Parameter:
        return self.module.gate_up_proj

    @property
    def down(self) -> nn.Parameter:
        return self.module.down_proj

    @property
    def num_experts(self) -> int:
        return self.module.gate_up_proj.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.module.down_proj.shape[-1]

    def gate(self, e: int) -> torch.Tensor:
        """Expert e's gate projection [I, H] (a view into the fused tensor)."""
        return self.gate_up.data[e, : self.intermediate_size]

    def up(self, e: int) -> torch.Tensor:
        """Expert e's up projection [I, H] (a view into the fused tensor)."""
        return self.gate_up.data[e, self.intermediate_size:]

    def set_module(self, module: nn.Module) -> None:
        """Swap the experts module inside its MoE block (e.g. for a quantizing replacement)."""
        setattr(self.parent, self.attr, module)
        self.module = module


@dataclass
class LinearGroup:
    """Weights that read the same input tensor, and the op that produces that input.

    `norm` is the RMSNorm in front when there is one (its scale can be folded into every reader);
    `routers` read the same input but stay in full precision; `expert_params` are fused 3-D expert
    tensors reading it (gate_up: one input for all experts; down: each expert its own input,
    `per_expert_input=True`).
    """

    name: str  # "qkv", "o", "mlp_in", "down", "shared_down", "experts_down"
    source: str  # what feeds the group, e.g. "input_layernorm", "attention", "act(gate)*up"
    linears: dict[str, nn.Linear]
    norm: nn.Module | None = None
    routers: dict[str, nn.Module] = field(default_factory=dict)
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)
    per_expert_input: bool = False

    @property
    def in_features(self) -> int:
        for lin in self.linears.values():
            return lin.in_features
        for p in self.expert_params.values():
            return p.shape[-1]
        raise ValueError(f"linear group {self.name!r} is empty")


@dataclass
class LayerView:
    """One decoder layer as methods see it (all modules are the model's own, edit them in place)."""

    index: int
    module: nn.Module  # the decoder layer
    attn: nn.Module  # the attention module (KV quantization and R3 hook in here)
    attn_norm: nn.Module  # RMSNorm feeding q, k, v
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear  # reads the attention output (per head), writes the residual
    mlp_norm: nn.Module  # RMSNorm feeding the MLP (or router + experts + shared expert)
    mlp: nn.Module | None = None  # the MLP / sparse-MoE block
    mlp_in: list[nn.Linear] = field(default_factory=list)  # dense: [gate, up]; MoE: shared expert [gate, up]
    mlp_out: list[nn.Linear] = field(default_factory=list)  # dense: [down]; MoE: shared expert [down]
    experts: Experts | None = None
    router_linears: list[nn.Module] = field(default_factory=list)  # read the normed residual, stay FP
    q_norm: nn.Module | None = None  # Qwen3 (per head) / OLMoE (whole projection) QK-norm, after q_proj
    k_norm: nn.Module | None = None
    dense_mlp: nn.Module | None = None  # the module holding gate_proj/up_proj/down_proj (MLP or shared expert)
    #: norms applied to each branch's output before the residual add (Gemma's sandwich norms); when set,
    #: o / down write into these norms, not into the residual stream
    branch_out_norms: list[nn.Module] = field(default_factory=list)
    #: role -> (parent module, attribute): where each part of the layer lives (set by the adapter)
    sites: dict[str, tuple[nn.Module, str]] = field(default_factory=dict, repr=False)

    # ---- roles: the live module of each part, by role (no model attribute names outside adapters) ----
    def roles(self) -> list[str]:
        """The roles this layer has: q, k, v, o, gate, up, down (dense MLP) or shared_gate, shared_up,
        shared_down, router, experts, shared_expert, shared_expert_gate (MoE); attn, mlp, attn_norm, mlp_norm."""
        return list(self.sites)

    def site(self, role: str) -> nn.Module:
        """The live module of a role: what the layer's forward calls (a QuantLinear / QuantExperts
        wrapper once the harness wrapped it, else the model's own module)."""
        if role not in self.sites:
            from harness.errors import UnknownNameError

            raise UnknownNameError(f"role of layer {self.index}", role, self.sites)
        parent, attr = self.sites[role]
        return getattr(parent, attr)

    def replace_site(self, role: str, module: nn.Module) -> None:
        """Put `module` where the role's module is (a wrapper around it, or a replacement)."""
        parent, attr = self.sites[role]
        setattr(parent, attr, module)
        if role == "experts" and self.experts is not None:
            self.experts.module = module

    def site_of(self, linear: nn.Module) -> nn.Module:
        """The module whose forward really runs for this nn.Linear (its wrapper, if any)."""
        for role in self.linear_roles():
            module = self.site(role)
            if module is linear or getattr(module, "linear", None) is linear:
                return module
        return linear

    def linear_roles(self) -> list[str]:
        """Roles of the quantizable nn.Linears, in layer order (routers excluded, experts are fused)."""
        return [r for r in ("q", "k", "v", "o", "gate", "up", "down", "shared_gate", "shared_up", "shared_down")
                if r in self.sites]

    # names kept short and stable: they are keys in reports and weight dictionaries
    @property
    def attn_in_norm(self) -> nn.Module:
        return self.attn_norm

    @property
    def mlp_in_norm(self) -> nn.Module:
        return self.mlp_norm

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    @property
    def residual_readers(self) -> list[nn.Linear]:
        """nn.Linears whose input is the (normed) residual stream (routers and experts not included)."""
        return [self.q, self.k, self.v, *self.mlp_in]

    @property
    def residual_writers(self) -> list[nn.Linear]:
        """nn.Linears that write the residual stream (experts' down not included); none when each branch's
        output is normalised first (`branch_out_norms`): then those norms are the writers."""
        return [] if self.branch_out_norms else [self.o, *self.mlp_out]

    @property
    def mlp_linears(self) -> dict[str, nn.Linear]:
        """The MLP's nn.Linears: gate/up/down, or shared_gate/shared_up/shared_down for MoE."""
        prefix = "" if self.experts is None else "shared_"
        names = [f"{prefix}gate", f"{prefix}up", f"{prefix}down"]
        return dict(zip(names, [*self.mlp_in, *self.mlp_out]))

    def linears(self) -> dict[str, nn.Linear]:
        """Every quantizable nn.Linear of the layer by short name (routers excluded, experts are fused)."""
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o, **self.mlp_linears}

    def linear_sites(self) -> list[tuple[str, nn.Module, str]]:
        """(role, parent module, attribute) of every quantizable nn.Linear: where to put a wrapper."""
        return [(role, *self.sites[role]) for role in self.linear_roles()]

    def groups(self) -> list[LinearGroup]:
        """The layer's weights grouped by shared input, in execution order."""
        out = [
            LinearGroup("qkv", "input_layernorm", {"q": self.q, "k": self.k, "v": self.v}, norm=self.attn_norm),
            LinearGroup("o", "attention", {"o": self.o}),
        ]
        mlp = self.mlp_linears
        if self.experts is None:
            out += [LinearGroup("mlp_in", "post_attention_layernorm", {"gate": mlp["gate"], "up": mlp["up"]},
                                norm=self.mlp_norm),
                    LinearGroup("down", "act(gate)*up", {"down": mlp["down"]})]
            return out
        e = self.experts
        routers = {"router": e.router}
        if e.shared_gate is not None:
            routers["shared_expert_gate"] = e.shared_gate
        readers = {k: mlp[k] for k in ("shared_gate", "shared_up") if k in mlp}
        out.append(LinearGroup("mlp_in", "post_attention_layernorm", readers, norm=self.mlp_norm, routers=routers,
                               expert_params={"experts.gate_up": e.gate_up}))
        if "shared_down" in mlp:
            out.append(LinearGroup("shared_down", "act(shared gate)*shared up", {"shared_down": mlp["shared_down"]}))
        out.append(LinearGroup("experts_down", "per expert act(gate)*up", {}, expert_params={"experts.down": e.down},
                               per_expert_input=True))
        return out


@dataclass
class WeightRef:
    """One weight matrix to quantize, [out, in] (quantization groups run along `in`)."""

    name: str  # stable key: "layers.3.q", "layers.3.experts.5.gate_up", ...
    layer: int
    role: str  # "q", "k", "v", "o", "gate", "up", "down", "shared_*", "experts.gate_up", "experts.down"
    weight: torch.Tensor  # a view into the parameter: editing it in place edits the model
    param: nn.Parameter  # the owning parameter (fused 3-D for experts)
    expert: int | None = None
    module: nn.Module | None = None  # the nn.Linear (None for expert slices)


class DecoderAdapter:
    """Adapter for the transformers-5 decoder-only layout shared by Llama, Mistral, Qwen2/3 and their MoE
    variants: model.model.{embed_tokens, layers[i], norm}, model.lm_head; per layer self_attn.{q,k,v,o}_proj,
    input_layernorm, post_attention_layernorm, and mlp.{gate,up,down}_proj or a sparse-MoE block.

    Family subclasses set the class attributes below; they differ only in names and optional parts.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: evaluation and calibration windows start with the BOS token (a model that breaks without it)
    window_bos: ClassVar[bool] = False
    qk_norm: ClassVar[str | None] = None  # "per_head" | "full" | None
    router_attr: ClassVar[str] = "gate"  # attribute of the MoE block holding the router
    shared_expert_attr: ClassVar[str | None] = None
    shared_gate_attr: ClassVar[str | None] = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.family = self.config.model_type
        self.info = None  # harness.models.ModelInfo when loaded through load_model

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family}, {self.num_layers} layers, hidden {self.hidden_size})"

    # ---- global pieces -------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def embed(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def lm_head_site(self) -> tuple[nn.Module, str]:
        """(parent, attribute) of lm_head, for a wrapper."""
        return self.model, "lm_head"

    @property
    def rotary_emb(self) -> nn.Module | None:
        return getattr(self.decoder, "rotary_emb", None)

    @property
    def tied_embeddings(self) -> bool:
        """True when lm_head and the embedding table are the same storage."""
        return self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()

    def untie_embeddings(self) -> None:
        """Give lm_head its own weight (rotations and quantizers treat the two differently)."""
        if self.tied_embeddings:
            head = _linear(self.lm_head)
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.config.tie_word_embeddings = False

    # ---- geometry ------------------------------------------------------------------------
    @property
    def attention(self) -> AttentionGeometry:
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        rope = dict(getattr(c, "rope_parameters", None) or {})
        partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0
        attn = self.layers_module[0].self_attn
        return AttentionGeometry(
            hidden_size=c.hidden_size, num_heads=heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim, rope_theta=rope.get("rope_theta", getattr(c, "rope_theta", None)),
            rope_type=rope.get("rope_type", "default"), rotary_dim=int(head_dim * partial), qk_norm=self.qk_norm,
            qkv_bias=_linear(attn.q_proj).bias is not None,
            sliding_window=getattr(c, "sliding_window", None))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def num_layers(self) -> int:
        return len(self.layers_module)

    @property
    def is_moe(self) -> bool:
        return any(layer.experts is not None for layer in self.layers())

    @property
    def has_branch_out_norms(self) -> bool:
        """True when each branch's output is normalised before the residual add (Gemma-3's sandwich norms):
        then o / down do not write the residual stream and R1 cannot be fused into them."""
        return bool(self.layer(0).branch_out_norms)

    def require_direct_residual_writers(self, method: str) -> None:
        """Refuse, in one line, a method that fuses R1 into o / down weights on a sandwich-norm model."""
        if self.has_branch_out_norms:
            from harness.errors import UnsupportedModelError

            raise UnsupportedModelError(method, self.family, "it trains R1 fused into o_proj / down_proj, but this "
                                        "architecture normalises each branch's output before the residual add, "
                                        "where R1 does not commute (rotation-only methods such as quarot run)")

    # ---- layers ---------------------------------------------------------------------------
    @property
    def layers_module(self) -> nn.ModuleList:
        return self.decoder.layers

    def layers(self) -> list[LayerView]:
        return [self.layer(i) for i in range(self.num_layers)]

    def layer(self, index: int) -> LayerView:
        layer = self.layers_module[index]
        attn, mlp = layer.self_attn, layer.mlp
        view = LayerView(index, layer, attn, layer.input_layernorm, _linear(attn.q_proj), _linear(attn.k_proj),
                         _linear(attn.v_proj), _linear(attn.o_proj), layer.post_attention_layernorm, mlp=mlp,
                         q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))
        view.sites = {"attn": (layer, "self_attn"), "mlp": (layer, "mlp"), "attn_norm": (layer, "input_layernorm"),
                      "mlp_norm": (layer, "post_attention_layernorm"),
                      **{r: (attn, f"{r}_proj") for r in ("q", "k", "v", "o")}}
        if hasattr(mlp, "experts"):
            self._moe_view(view, mlp)
        else:
            view.dense_mlp = mlp
            view.mlp_in = [_linear(mlp.gate_proj), _linear(mlp.up_proj)]
            view.mlp_out = [_linear(mlp.down_proj)]
            view.sites.update({r: (mlp, f"{r}_proj") for r in ("gate", "up", "down")})
        return view

    def _moe_view(self, view: LayerView, block: nn.Module) -> None:
        router = getattr(block, self.router_attr)
        shared = getattr(block, self.shared_expert_attr, None) if self.shared_expert_attr else None
        shared_gate = getattr(block, self.shared_gate_attr, None) if self.shared_gate_attr else None
        top_k = getattr(router, "top_k", None) or self.config.num_experts_per_tok
        view.experts = Experts(block.experts, router, block, int(top_k), shared, shared_gate)
        view.router_linears = [router] + ([shared_gate] if shared_gate is not None else [])
        view.sites.update({"router": (block, self.router_attr), "experts": (block, "experts")})
        if shared_gate is not None:
            view.sites["shared_expert_gate"] = (block, self.shared_gate_attr)
        if shared is not None:
            view.dense_mlp = shared
            view.mlp_in = [_linear(shared.gate_proj), _linear(shared.up_proj)]
            view.mlp_out = [_linear(shared.down_proj)]
            view.sites["shared_expert"] = (block, self.shared_expert_attr)
            view.sites.update({f"shared_{r}": (shared, f"{r}_proj") for r in ("gate", "up", "down")})

    # ---- weights -----------------------------------------------------------------------------
    def linear_weights(self, layer: LayerView | int | None = None) -> Iterator[WeightRef]:
        """Every weight matrix weight quantization must touch, expert slices one by one.

        lm_head, embeddings, routers and norms are not included (they stay in full precision unless a
        scheme says otherwise).
        """
        views = self.layers() if layer is None else [self.layer(layer) if isinstance(layer, int) else layer]
        for view in views:
            for role, lin in view.linears().items():
                yield WeightRef(f"layers.{view.index}.{role}", view.index, role, lin.weight.data, lin.weight,
                                module=lin)
            if view.experts is not None:
                for part, param in (("gate_up", view.experts.gate_up), ("down", view.experts.down)):
                    for e in range(param.shape[0]):
                        yield WeightRef(f"layers.{view.index}.experts.{e}.{part}", view.index, f"experts.{part}",
                                        param.data[e], param, expert=e)

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight that weight quantization must touch, experts as fused 3-D tensors (name -> tensor)."""
        out = {}
        for view in self.layers():
            for name, lin in view.linears().items():
                out[f"layers.{view.index}.{name}"] = lin.weight
            if view.experts is not None:
                out[f"layers.{view.index}.experts.gate_up"] = view.experts.gate_up
                out[f"layers.{view.index}.experts.down"] = view.experts.down
        return out

    def describe(self) -> dict[str, Any]:
        """What a run record keeps about the architecture."""
        out: dict[str, Any] = {"family": self.family, "adapter": type(self).__name__, "num_layers": self.num_layers,
                               "hidden_size": self.hidden_size, "vocab_size": self.embed.weight.shape[0],
                               "tied_embeddings": self.tied_embeddings, "attention": self.attention.to_dict()}
        moe = [v for v in self.layers() if v.experts is not None]
        if moe:
            e = moe[0].experts
            out["moe"] = {"layers": [v.index for v in moe], "num_experts": e.num_experts, "top_k": e.top_k,
                          "expert_intermediate": e.intermediate_size, "shared_expert": e.shared is not None}
        if self.info is not None:
            out["source"] = self.info.to_dict()
        return out


def _linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear inside a (possibly already wrapped, e.g. QuantLinear) module."""
    return getattr(module, "linear", module)
