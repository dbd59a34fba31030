"""ptqbench harness: shared machinery for LLM post-training-quantization benchmarks."""
from harness.env import apply_offline_defaults

apply_offline_defaults()

__version__ = "0.1.0"
