"""4-bit quantisation for QLoRA: NF4 tensors, a 4-bit Linear layer and model helpers."""

from deltatune.quant.nf4 import (
    DEFAULT_SKIP_MODULES,
    NF4_CODEBOOK,
    Linear4bit,
    NF4Tensor,
    dynamic_map,
    logical_param_count,
    memory_footprint,
    nf4_codebook,
    prepare_model_for_kbit_training,
    quantize_model,
    quantize_nf4,
)

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "NF4_CODEBOOK",
    "Linear4bit",
    "NF4Tensor",
    "dynamic_map",
    "logical_param_count",
    "memory_footprint",
    "nf4_codebook",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "quantize_nf4",
]
