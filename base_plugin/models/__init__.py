"""Models built from the project's layers: a GPT-style LM with BASE layers (:mod:`.gpt`)."""
from .gpt import (GPT, SPARSE_KINDS, Block, CausalSelfAttention, GPTConfig, Inserted, MLP, TopKMoE, build_meta,
                  default_moe_factory)

__all__ = ["GPT", "GPTConfig", "SPARSE_KINDS", "Block", "CausalSelfAttention", "Inserted", "MLP", "TopKMoE",
           "build_meta", "default_moe_factory"]
