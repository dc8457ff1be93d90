"""Language models: the embedded SmolLM2, tiny random test models, and any HF causal LM."""

from abmll_pyro.lms.hf import load_hf
from abmll_pyro.lms.load import load_lm
from abmll_pyro.lms.smollm2 import load_smollm2, smollm2_gguf_path
from abmll_pyro.lms.tiny import byte_tokenizer, tiny_model

__all__ = ["load_lm", "load_hf", "load_smollm2", "smollm2_gguf_path", "tiny_model", "byte_tokenizer"]
