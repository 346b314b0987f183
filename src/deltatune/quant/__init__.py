"""4-bit quantisation for QLoRA: NF4 tensors, a 4-bit Linear layer, model helpers, LoRA on
quantised bases with an error-reporting merge, and loading a model folder straight into 4 bits."""

from deltatune.quant.load import load_quantized, safetensors_files, streams_loftq
from deltatune.quant.loftq import (
    LoftQConfig,
    LoftQLayerError,
    LoftQReport,
    LoftQResult,
    loftq_decompose,
    loftq_initialize,
    loftq_report,
    quantize_dequantize,
)
from deltatune.quant.nf4 import NF4_CODEBOOK, Linear4bit, NF4Tensor, dynamic_map, nf4_codebook, quantize_nf4
from deltatune.quant.qlora import (
    LayerMergeError,
    MergeReport,
    dequantize_weight,
    is_quantized_linear,
    merge_quantized,
    to_dense_linear,
)
from deltatune.quant.whole_model import (
    DEFAULT_SKIP_MODULES,
    logical_param_count,
    memory_footprint,
    prepare_model_for_kbit_training,
    quantize_model,
)

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "LayerMergeError",
    "LoftQConfig",
    "LoftQLayerError",
    "LoftQReport",
    "LoftQResult",
    "loftq_decompose",
    "loftq_initialize",
    "loftq_report",
    "quantize_dequantize",
    "MergeReport",
    "dequantize_weight",
    "is_quantized_linear",
    "merge_quantized",
    "to_dense_linear",
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
    "load_quantized",
    "safetensors_files",
    "streams_loftq",
]
