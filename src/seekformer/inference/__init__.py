"""Inference: the latent KV cache, sampling, batched generation and MTP speculative decoding."""

from .cache import KVCache
from .generation import GenerationOutput, GenerationStats, GenerationStream, Piece, generate
from .sampling import SamplingParams

__all__ = ["GenerationOutput", "GenerationStats", "GenerationStream", "KVCache", "Piece", "SamplingParams",
           "generate"]
