"""Bottleneck adapters' configuration: AdapterHub's placement presets, the activations,
where each model family's sub-layers sit, and :class:`BottleneckConfig`. The adapter's formula and
its placements are described in :mod:`deltatune.methods.bottleneck`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.activations import ACT2FN

from deltatune.config import PeftConfig, PeftType

# Placement presets: the values AdapterHub's DoubleSeqBnConfig / SeqBnConfig / ParBnConfig give
# the fields that a BottleneckConfig leaves unset (None).
PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": {
        "original_ln_before": False,
        "non_linearity": "swish",
        "reduction_factor": 16,
        "scaling": 1.0,
    },
    "pfeiffer": {"original_ln_before": True, "non_linearity": "relu", "reduction_factor": 16, "scaling": 1.0},
    "parallel": {"original_ln_before": False, "non_linearity": "relu", "reduction_factor": 2, "scaling": 4.0},
}
ALIASES = {"double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}
PLACEMENTS = (*PRESETS, *ALIASES)
SCALING_MODES = ("learned", "channel")  # a trained scalar / a trained vector of width d, both start at 1


def activation(name: str) -> nn.Module:
    """The non-linearity by AdapterHub's names (transformers' ``ACT2FN`` names, plus ``leakyrelu``)."""
    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    module: nn.Module = ACT2FN[key]  # a new instance per lookup
    return module


def _known_activation(name: object) -> bool:
    return isinstance(name, str) and (name.lower() in ACT2FN or name.lower() == "leakyrelu")


# How an adapter layer treats the module it wraps.
POST_LN = "post_ln"  # module(h_in, r) = LN(dropout(dense(h_in)) + r): BERT's BertSelfOutput / BertOutput
PRE_LN = "pre_ln"  # the block adds the sub-layer's output to r itself: out ← z(out, r)


@dataclass(frozen=True)
class SubLayers:
    """Where the adapters go in one architecture's blocks.

    ``attention`` / ``ffn``: full-match regexes of the sub-layers. Post-LN blocks (``post_ln``
    set) name the module that ends the sub-layer (``dense``, ``dropout``, ``LayerNorm`` inside);
    pre-LN blocks name the sub-layer, and ``attention_ln`` / ``ffn_ln`` its sibling LayerNorm,
    whose input is the residual stream ``r``.
    """

    attention: str
    ffn: str
    post_ln: tuple[str, str, str] | None = None  # attribute names of (dense, dropout, LayerNorm)
    attention_ln: str | None = None
    ffn_ln: str | None = None


_DECODER = SubLayers(
    attention=r"(.*\.)?layers\.\d+\.self_attn",
    ffn=r"(.*\.)?layers\.\d+\.mlp",
    attention_ln="input_layernorm",
    ffn_ln="post_attention_layernorm",
)
_BERT = SubLayers(
    attention=r"(.*\.)?layer\.\d+\.attention\.output",  # BertSelfOutput: LN(dropout(dense(h)) + r)
    ffn=r"(.*\.)?layer\.\d+\.output",  # BertOutput, the same shape
    post_ln=("dense", "dropout", "LayerNorm"),
)
SUBLAYERS: dict[str, SubLayers] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gpt2": SubLayers(
        attention=r"(.*\.)?h\.\d+\.attn", ffn=r"(.*\.)?h\.\d+\.mlp", attention_ln="ln_1", ffn_ln="ln_2"
    ),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "t5": SubLayers(
        attention=r"(.*\.)?layer\.0\.SelfAttention",
        ffn=r"(.*\.)?DenseReluDense",
        attention_ln="layer_norm",
        ffn_ln="layer_norm",
    ),
}

MERGE_ERROR = (
    "Bottleneck adapters cannot be merged into the base weights: each one is a sequential non-linear "
    "module (down-projection → activation → up-projection) whose effect depends non-linearly "
    "on its input, so no change of the existing weights reproduces it. Keep the PeftModel for inference, "
    "or call unload() to get the base model back without the adapters."
)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapter settings; field names and meanings follow AdapterHub's ``BnConfig``.

    ``placement``: ``houlsby`` (alias ``double_seq_bn``), ``pfeiffer`` (``seq_bn``) or ``parallel``
    (``par_bn``); it sets the fields left at None as AdapterHub's preset does (``PRESETS``).
    ``bottleneck_size`` (m) or ``reduction_factor`` (m = d // reduction_factor).
    ``non_linearity``: relu | swish | gelu | tanh | ... (transformers' activation names).
    ``original_ln_before``: the adapter reads ``LN(h + r)`` (the block's LayerNorm; pre-LN models:
    ``h + r``) instead of ``h``. ``original_ln_after``: the block's residual add and LayerNorm
    follow the adapter (False: the sub-layer returns the adapter's output alone; post-LN only).
    ``residual_before_ln``: the adapter's residual is ``h`` (True), the adapter's input (False) or
    ``h + r`` ("post_add"). ``adapter_residual_before_ln``: add that residual before ``ln_after``.
    ``ln_before`` / ``ln_after``: a new LayerNorm before the down-projection / after the
    up-projection (``layer_norm`` is the older name of ``ln_before``). ``scaling``: a number,
    "learned" (a trained scalar) or "channel" (a trained vector). ``dropout``: on the adapter's
    output. ``leave_out``: layer indices without adapters (``layers_to_transform``: the opposite).
    ``init``: "zeros" (up-projection zero: identity at start) or "normal" (small random, for tests).
    ``attention_modules`` / ``ffn_modules`` name the sub-layers for architectures deltatune does
    not know (a list of names or suffixes, or a full-match regex); their input is taken as ``r``.
    """

    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str | None = None
    placement: str = "houlsby"
    original_ln_before: bool | None = None
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    layer_norm: bool | None = None
    scaling: float | str | None = None
    dropout: float = 0.0
    init: str = "zeros"
    attention_modules: list[str] | str | None = None
    ffn_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    leave_out: list[int] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK.value
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}: choose one of {list(PLACEMENTS)}.")
        self.placement = ALIASES.get(self.placement, self.placement)
        preset = PRESETS[self.placement]
        if self.layer_norm is not None:  # the older name of ln_before
            self.ln_before, self.layer_norm = bool(self.layer_norm), None
        if self.non_linearity is None:
            self.non_linearity = preset["non_linearity"]
        if self.original_ln_before is None:
            self.original_ln_before = preset["original_ln_before"]
        if self.scaling is None:
            self.scaling = preset["scaling"]
        if not _known_activation(self.non_linearity):
            raise ValueError(
                f"non_linearity={self.non_linearity!r}: choose one of relu, swish, gelu, gelu_new, tanh, "
                "sigmoid, leakyrelu (or another transformers activation name)."
            )
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError(
                f"Give bottleneck_size (m) or reduction_factor (m = d // factor), not both "
                f"(got {self.bottleneck_size} and {self.reduction_factor})."
            )
        if self.bottleneck_size is not None and (
            not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0
        ):
            raise ValueError(f"bottleneck_size={self.bottleneck_size!r} must be a positive integer, e.g. 64.")
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be positive, e.g. 16.")
        if self.init not in ("zeros", "normal"):
            raise ValueError(f"init={self.init!r}: use 'zeros' (identity at start) or 'normal'.")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(
                f"residual_before_ln={self.residual_before_ln!r}: use True, False or 'post_add'."
            )
        if isinstance(self.scaling, str):
            if self.scaling not in SCALING_MODES:
                raise ValueError(f"scaling={self.scaling!r}: use a number, 'learned' or 'channel'.")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling={self.scaling!r}: use a number, 'learned' or 'channel'.")
        else:
            self.scaling = float(self.scaling)
        for name in (
            "original_ln_before",
            "original_ln_after",
            "adapter_residual_before_ln",
            "ln_before",
            "ln_after",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")
        if self.leave_out is not None and not all(isinstance(i, int) for i in self.leave_out):
            raise ValueError(f"leave_out={self.leave_out!r} must be a list of layer indices, e.g. [0, 1].")
        if self.placement == "houlsby" and (self.attention_modules is None) != (self.ffn_modules is None):
            raise ValueError(
                "placement='houlsby' adapts both sub-layers: give both attention_modules and ffn_modules, or "
                "neither (for architectures deltatune knows)."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BottleneckConfig:
        """As every config; a file saved before the AdapterHub switches existed (no
        ``original_ln_before`` key) keeps its meaning: every adapter read ``h``, and the size
        default was d // 16 for every placement."""
        if "original_ln_before" not in data and "layer_norm" in data:
            data = {**data, "original_ln_before": False}
            if data.get("bottleneck_size") is None and data.get("reduction_factor") is None:
                data["reduction_factor"] = 16
            if data.get("placement") == "parallel":
                warnings.warn(
                    "This parallel bottleneck adapter was saved by an older deltatune, whose parallel adapters "
                    "on pre-LayerNorm models (Llama, GPT-2, T5) read the FFN's normalised input; they now read "
                    "the residual stream, as AdapterHub's. On those models its outputs differ; retrain it.",
                    stacklevel=2,
                )
        return super().from_dict(data)

    @property
    def is_parallel(self) -> bool:
        return self.placement == "parallel"

    def size_for(self, d: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        factor = self.reduction_factor or PRESETS[self.placement]["reduction_factor"]
        return max(1, int(d // factor))
