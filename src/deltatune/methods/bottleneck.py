"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; parallel: He et al. 2022).

A small MLP with a residual connection is inserted at the output of a block's sub-layers::

    h ──► LayerNorm ──► down (d→m) ──► act ──► up (m→d) ──► × scaling ──► (+) ──► h'
    │                                                                      ▲
    └──────────────────────────────────────────────────────────────────────┘

Where it goes (``placement``)::

    houlsby    attention ─► [adapter] ─► (+ residual) ... FFN ─► [adapter] ─► (+ residual)
    pfeiffer                                              FFN ─► [adapter] ─► (+ residual)
    parallel   FFN(x) + scaling · adapter-MLP(x)          (beside the FFN, on its input)

The adapter wraps the sub-layer module (``self_attn``, ``mlp``, ...) and rewrites its output;
for post-LayerNorm encoders (BERT, RoBERTa) it hooks the sub-layer's output projection, before
the residual add and LayerNorm. The up-projection starts at zero, so a fresh adapter leaves the
model's outputs unchanged.

Parameters per adapter: down d·m + m, up m·d + d, LayerNorm 2d, i.e. ``2dm + m + d (+ 2d)``.
Houlsby places two per block, Pfeiffer and parallel one.

A bottleneck adapter is a sequential non-linear module: it cannot be folded into existing
weights, so merging raises. The files use the ecosystem's layout (``adapter_config.json`` +
``adapter_model.safetensors``) with ``peft_type: "BOTTLENECK"``, a format of deltatune's own.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import CliRecipe, PeftConfig, PeftType, register_method
from deltatune.methods.base import AdapterLayer, Tuner
from deltatune.targeting import DEFAULT_LAYERS_PATTERNS, _layer_index, linear_types, model_type, name_matches

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
}

# How an adapter treats the module it wraps.
SEQUENTIAL = "sequential"  # out ← out + s·f(out)                        (on out, or out[0] of a tuple)
PARALLEL = "parallel"  # out ← module(x) + s·f(x)                       (x: the module's first input)
RESIDUAL_ARG = "residual_arg"  # module(h, r) ← module(h, r + s·f(r))    (BERT's BertOutput: LN(dense(h) + r))


@dataclass(frozen=True)
class SubLayers:
    """Full-match regexes for the block sub-layers of one architecture."""

    attention: str
    ffn: str
    parallel: str  # the module a parallel adapter wraps
    parallel_mode: str = PARALLEL


_DECODER = SubLayers(attention=r"(.*\.)?layers\.\d+\.self_attn", ffn=r"(.*\.)?layers\.\d+\.mlp", parallel="")
_BERT = SubLayers(
    attention=r"(.*\.)?layer\.\d+\.attention\.output\.dense",  # before BertSelfOutput's residual + LN
    ffn=r"(.*\.)?layer\.\d+\.output\.dense",  # before BertOutput's residual + LN
    parallel=r"(.*\.)?layer\.\d+\.output",  # BertOutput(h, r) = LN(dense(h) + r)
    parallel_mode=RESIDUAL_ARG,
)
SUBLAYERS: dict[str, SubLayers] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gpt2": SubLayers(attention=r"(.*\.)?h\.\d+\.attn", ffn=r"(.*\.)?h\.\d+\.mlp", parallel=""),
    "bert": _BERT,
    "roberta": _BERT,
    "t5": SubLayers(attention=r"(.*\.)?layer\.0\.SelfAttention", ffn=r"(.*\.)?DenseReluDense", parallel=""),
}

MERGE_ERROR = (
    "Bottleneck adapters cannot be merged into the base weights: each one is a sequential non-linear "
    "module (LayerNorm → down-projection → activation → up-projection) whose effect depends non-linearly "
    "on its input, so no change of the existing weights reproduces it. Keep the PeftModel for inference, "
    "or call unload() to get the base model back without the adapters."
)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapter settings.

    ``bottleneck_size`` (m) or ``reduction_factor`` (m = d // reduction_factor; default 16);
    ``non_linearity`` relu | gelu | swish; ``placement`` houlsby | pfeiffer | parallel;
    ``scaling`` multiplies the adapter's output (default 1.0, 4.0 for parallel as in He et al.);
    ``init`` "zeros" (up-projection zero: identity at start) or "normal" (small random, for tests);
    ``attention_modules`` / ``ffn_modules`` name the sub-layers for architectures deltatune does
    not know (a list of names or suffixes, or a full-match regex).
    """

    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    placement: str = "houlsby"
    layer_norm: bool = True
    scaling: float | None = None
    init: str = "zeros"
    attention_modules: list[str] | str | None = None
    ffn_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK.value
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}: choose one of {list(PLACEMENTS)}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity={self.non_linearity!r}: choose one of {sorted(ACTIVATIONS)}.")
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
        if self.scaling is None:
            self.scaling = 4.0 if self.placement == "parallel" else 1.0
        if self.placement == "houlsby" and (self.attention_modules is None) != (self.ffn_modules is None):
            raise ValueError(
                "placement='houlsby' adapts both sub-layers: give both attention_modules and ffn_modules, or "
                "neither (for architectures deltatune knows)."
            )

    def size_for(self, d: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(d // (self.reduction_factor or 16)))


class BottleneckBlock(nn.Module):
    """LayerNorm → down (d→m) → act → up (m→d), times ``scaling``; (..., d) → (..., d)."""

    def __init__(self, d: int, m: int, config: BottleneckConfig, device: torch.device | None) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device}
        self.layer_norm = nn.LayerNorm(d, **factory) if config.layer_norm else nn.Identity()
        self.down = nn.Linear(d, m, **factory)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.up = nn.Linear(m, d, **factory)
        self.scaling = float(config.scaling if config.scaling is not None else 1.0)
        if not self.down.weight.is_meta:
            with torch.no_grad():
                nn.init.normal_(self.down.weight, std=0.02)
                nn.init.zeros_(self.down.bias)
                if config.init == "zeros":
                    nn.init.zeros_(self.up.weight)
                else:
                    nn.init.normal_(self.up.weight, std=0.02)
                nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return (self.up(self.act(self.down(self.layer_norm(h.to(dtype))))) * self.scaling).to(h.dtype)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out: Any, h: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (h, *out[1:])
    if isinstance(out, list):
        return [h, *out[1:]]
    return h


class BottleneckLayer(AdapterLayer):
    """A block sub-layer (``base_layer``) whose output passes through named bottleneck adapters."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("bottleneck",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, mode: str, d: int
    ) -> None:
        super().__init__(base_layer)
        self.mode = mode
        self.hidden_size = d
        self.bottleneck = nn.ModuleDict()
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        # Model code may read attributes of the sub-layer it called (e.g. ``self_attn.layer_idx``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_layer, name)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.bottleneck:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        params = [p for p in self.base_layer.parameters()]
        device = params[0].device if params else None
        self.bottleneck[adapter_name] = BottleneckBlock(
            self.hidden_size, config.size_for(self.hidden_size), config, device
        )
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def _adapt(self, h: torch.Tensor, names: list[str], residual: bool) -> torch.Tensor:
        """h (batch, ..., d) through the adapters: stacked with residual, or summed deltas (parallel)."""
        if self.row_groups is not None:  # mixed batch: each row through its own adapter (or none)
            out = h if residual else torch.zeros_like(h)
            for name, rows in self.row_groups:
                if name in self.bottleneck:
                    out = out.index_add(0, rows, self.bottleneck[name](h.index_select(0, rows)))
            return out
        if residual:
            for name in names:
                h = h + self.bottleneck[name](h)
            return h
        return sum((self.bottleneck[n](h) for n in names), torch.zeros_like(h))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [n for n in self.active_adapters if n in self.bottleneck]
        if self.disabled or (not names and self.row_groups is None):
            return self.base_layer(*args, **kwargs)
        if self.mode == SEQUENTIAL:
            out = self.base_layer(*args, **kwargs)
            return _replace_first(out, self._adapt(_first(out), names, residual=True))
        if self.mode == RESIDUAL_ARG:  # BertOutput(hidden_states, input_tensor)
            if len(args) >= 2:
                args = (args[0], self._adapt(args[1], names, residual=True), *args[2:])
            else:
                kwargs = {**kwargs, "input_tensor": self._adapt(kwargs["input_tensor"], names, residual=True)}
            return self.base_layer(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        out = self.base_layer(*args, **kwargs)
        return _replace_first(out, _first(out) + self._adapt(x, names, residual=False))

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        raise ValueError(MERGE_ERROR)


def _output_width(module: nn.Module) -> int | None:
    """Width of what a sub-layer returns: its own out_features, or that of its last linear layer."""
    from transformers.pytorch_utils import Conv1D

    last: nn.Module | None = None
    for m in module.modules():
        if isinstance(m, linear_types()):
            last = m
    if last is None:
        return None
    if isinstance(last, Conv1D):
        return int(last.weight.shape[1])
    return int(getattr(last, "out_features", 0)) or None


def _matches(path: str, spec: list[str] | str) -> bool:
    return name_matches(path, spec)


def _candidates(model: nn.Module) -> list[str]:
    """Names that look like block sub-layers: attention/MLP-like names, and children of numbered blocks."""
    hint = re.compile(r"attn|attention|mlp|ffn|feed_?forward", re.I)
    out: set[str] = set()
    for path, module in model.named_modules():
        leaf = path.split(".")[-1]
        in_block = re.search(r"\.\d+\.[^.]+$", path) is not None
        has_linear = any(isinstance(m, linear_types()) for m in module.modules())
        if path and has_linear and (hint.search(leaf) or in_block) and not leaf.isdigit():
            out.add(leaf)
    return sorted(out)[:12]


class BottleneckTuner(Tuner):
    prefix: ClassVar[str] = "bottleneck"
    layer_base: ClassVar[type[AdapterLayer]] = BottleneckLayer

    def _sites(self, model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str]]:
        """(module path, mode) of every place an adapter goes, or a clear error."""
        mtype = model_type(model)
        user = config.attention_modules is not None or config.ffn_modules is not None
        known = SUBLAYERS.get(mtype or "")
        if not user and known is None:
            raise ValueError(
                f"BottleneckConfig(placement={config.placement!r}) needs to know where each block's attention "
                f"and feed-forward sub-layers are; deltatune knows them for {sorted(SUBLAYERS)}, not for model "
                f"type {mtype!r}. Name them: BottleneckConfig(attention_modules=[...], ffn_modules=[...]) with "
                f"module names (or suffixes) of your model, e.g. among {_candidates(model)}."
            )
        wanted: list[tuple[list[str] | str, str, str]] = []  # (spec, mode, role)
        if user:
            if config.placement == "houlsby":
                wanted.append((config.attention_modules or [], SEQUENTIAL, "attention_modules"))
            if config.ffn_modules is None:
                raise ValueError(
                    f"placement={config.placement!r} needs ffn_modules (the feed-forward sub-layers)."
                )
            wanted.append(
                (
                    config.ffn_modules,
                    PARALLEL if config.placement == "parallel" else SEQUENTIAL,
                    "ffn_modules",
                )
            )
        else:
            assert known is not None
            if config.placement == "houlsby":
                wanted.append((known.attention, SEQUENTIAL, "attention"))
            if config.placement == "parallel":
                wanted.append(
                    (known.parallel or known.ffn, known.parallel_mode if known.parallel else PARALLEL, "ffn")
                )
            else:
                wanted.append((known.ffn, SEQUENTIAL, "ffn"))
        layers = config.layers_to_transform
        layer_set = {layers} if isinstance(layers, int) else set(layers) if layers is not None else None
        sites: list[tuple[str, str]] = []
        for spec, mode, role in wanted:
            found = []
            for path, _ in model.named_modules():
                if not path or ".base_layer" in "." + path or not _matches(path, spec):
                    continue
                if layer_set is not None and _layer_index(path, DEFAULT_LAYERS_PATTERNS) not in layer_set:
                    continue
                found.append((path, mode))
            if not found:
                leaves = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
                close = difflib.get_close_matches(str(spec).split(".")[-1], leaves, n=4, cutoff=0.3)
                raise ValueError(
                    f"Bottleneck {role}={spec!r} matched no module of the model"
                    + (f" (restricted to layers {sorted(layer_set)})" if layer_set is not None else "")
                    + f". Modules that look close: {close or _candidates(model)}."
                )
            sites += found
        return sites

    def target_paths(self, model: nn.Module, config: PeftConfig) -> list[str]:
        assert isinstance(config, BottleneckConfig)
        return [p for p, _ in self._sites(model, config)]

    def inject(self, peft_model: Any, config: PeftConfig, adapter_name: str) -> None:
        from deltatune.methods.base import replace_module

        assert isinstance(config, BottleneckConfig)
        model = peft_model.base_model
        sites = self._sites(model, config)
        existing = [p for p, m in model.named_modules() if isinstance(m, BottleneckLayer)]
        plan = []
        for path, mode in sites:  # check everything before changing anything
            module = model.get_submodule(path)
            if isinstance(module, BottleneckLayer):
                if module.mode != mode:
                    raise ValueError(
                        f"{path!r} already carries bottleneck adapters in {module.mode!r} mode; this "
                        f"adapter needs {mode!r} mode there (placement={config.placement!r}). Put adapters "
                        "of different placements on separate copies of the base model."
                    )
            elif any(e.startswith(path + ".") or path.startswith(e + ".") for e in existing):
                raise ValueError(
                    f"{path!r} contains (or is inside) a module that already carries bottleneck adapters of "
                    f"another placement; nesting them would change the other adapter's saved keys. Use a "
                    f"separate copy of the base model for placement={config.placement!r}."
                )
            d = _output_width(module.base_layer if isinstance(module, BottleneckLayer) else module)
            if d is None:
                cfg = getattr(model, "config", None)
                d = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
            if d is None:
                raise ValueError(
                    f"Cannot tell the hidden size at {path!r} (no linear layer inside it). Name a sub-layer that "
                    "ends in a linear projection."
                )
            plan.append((path, mode, int(d), module))
        for path, mode, d, module in plan:
            if isinstance(module, BottleneckLayer):
                module.add_adapter(adapter_name, config)
            else:
                replace_module(model, path, BottleneckLayer(module, adapter_name, config, mode, d))

    def check_mergeable(self, config: PeftConfig) -> None:
        raise ValueError(MERGE_ERROR)


register_method(
    PeftType.BOTTLENECK.value,
    BottleneckConfig,
    BottleneckTuner,
    cli=[CliRecipe("bottleneck", "bottleneck adapters after attention / FFN blocks", 1e-3)],
)
