"""Quantization: DeepSeek-V3 block-wise FP8 (see ``docs/fp8.md``)."""

from .fp8 import (
    DEFAULT_BLOCK_SIZE,
    FP8_DTYPE,
    FP8_MAX,
    FP8Linear,
    default_fp8_selector,
    dequantize_activation,
    dequantize_blockwise,
    dequantize_state_dict_fp8,
    fp8_linear,
    hub_quantization_config,
    parse_quantization_config,
    quantize_activation,
    quantize_blockwise,
    quantize_state_dict_fp8,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8Linear",
    "default_fp8_selector",
    "dequantize_activation",
    "dequantize_blockwise",
    "dequantize_state_dict_fp8",
    "fp8_linear",
    "hub_quantization_config",
    "parse_quantization_config",
    "quantize_activation",
    "quantize_blockwise",
    "quantize_state_dict_fp8",
]
