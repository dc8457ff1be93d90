"""Language models: the embedded SmolLM2, tiny random test models, Llama-3-8B shape proxies, and any HF causal LM."""

from abmll_pyro.lms.hf import load_hf
from abmll_pyro.lms.load import load_lm
from abmll_pyro.lms.proxy import llama3_8b_config, llama3_8b_proxy
from abmll_pyro.lms.smollm2 import load_smollm2, smollm2_gguf_path
from abmll_pyro.lms.tiny import byte_tokenizer, tiny_model

__all__ = ["load_lm", "load_hf", "load_smollm2", "smollm2_gguf_path", "tiny_model", "byte_tokenizer",
           "llama3_8b_proxy", "llama3_8b_config"]
