"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations.

A targeted linear layer W (out × in) gets one vector l per adapter, initialised to ones::

    attention-type module:   y = l ⊙ (W x + b)        l: (out, 1)
    feed-forward module:     y = W (l ⊙ x) + b        l: (1, in)

By default l rescales the outputs of the key and value projections and the input of the
FFN's down projection. Several active adapters multiply. Merging folds l into W (and, for
output scaling, into the bias), exactly; unmerging divides it out again, which is exact
only when l has no zeros (otherwise it raises and says so).

Saved keys are ``<module path>.ia3_l`` with the shapes above, as in Hugging Face PEFT.

Quantised bases (deltatune ``Linear4bit``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``)
take (IA)³ too: the forward only scales the base layer's input or output, so it runs
unchanged, and the vectors are fp32 beside a 16-bit (or 4/8-bit) weight. Saved files are
the same, so vectors move freely between a quantised base and its dense original. The
scale cannot be folded into 4/8-bit codes without changing the outputs, so merging such a
layer raises and points to :func:`deltatune.quant.merge_quantized`, which merges into a
dequantised copy (optionally re-quantised) and reports the error, as for QLoRA.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import CliRecipe, PeftConfig, PeftType, register_method
from deltatune.methods.base import AdapterHost, AdapterLayer, Tuner, replace_module
from deltatune.stored_weights import adapter_factory, quantized_merge_error, stored_weight
from deltatune.targeting import find_targets, model_type, name_matches, resolved_targets

# The ecosystem's defaults (PEFT's tables), so that an empty config means the same everywhere.
IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "deberta": ["in_proj", "output.dense"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
}
IA3_DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "phi": ["fc2"],
    "opt": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "gptj": ["fc_out"],
    "bloom": ["mlp.dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "t5": ["wo"],
    "mt5": [],
    "bart": ["fc2"],
    "gpt_neo": ["c_proj"],
    "deberta": ["output.dense"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama4": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "RefinedWeb": ["dense_4h_to_h"],
}


@dataclass
class IA3Config(PeftConfig):
    """(IA)³ settings; field names and defaults are the ecosystem's (Hugging Face PEFT).

    ``target_modules``: modules whose output (or, for feed-forward ones, input) is rescaled;
    ``feedforward_modules``: the subset of them scaled on the input side.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError(
                f"feedforward_modules={self.feedforward_modules!r} was given without target_modules. "
                "feedforward_modules must be a subset of target_modules: pass both, or neither for the "
                "architecture's defaults."
            )
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            targets = self.target_modules
            # A name counts as covered when a target equals it or is a longer path ending in it
            # (targets written out as full module paths after injection).
            extra = sorted(
                f for f in self.feedforward_modules if not any(t == f or t.endswith("." + f) for t in targets)
            )
            if extra:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules, but {extra} are not in "
                    f"target_modules={self.target_modules}. Add them to target_modules or drop them."
                )


def _shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in, out, transposed) of a Linear, a GPT-2 Conv1D or a quantised linear layer."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, Conv1D):
        return int(base.weight.shape[0]), int(base.weight.shape[1]), True
    assert isinstance(base, nn.Linear) or stored_weight(base) is not None
    return int(base.in_features), int(base.out_features), False  # type: ignore[arg-type]


def _supported(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) or stored_weight(module) is not None


class IA3Layer(AdapterLayer):
    """One learned scaling vector per adapter on a Linear / Conv1D / quantised linear layer."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("ia3_l",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: IA3Config, is_feedforward: bool
    ) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = _shape(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.add_adapter(adapter_name, config)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.ia3_l:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        factory = adapter_factory(self.base_layer)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vec = torch.ones(shape, **factory)
        if not config.init_ia3_weights:  # random vector, e.g. for tests of the maths
            vec = vec + 0.5 * torch.randn(shape, dtype=factory["dtype"]).to(factory["device"])
        self.ia3_l[adapter_name] = nn.Parameter(vec)
        self.activate(adapter_name)

    @property
    def quantized(self) -> bool:
        """Whether the base stores its weight in 4 or 8 bits (read each time: the base can be swapped)."""
        return stored_weight(self.base_layer) is not None

    def vector(self, adapter_name: str) -> torch.Tensor:
        """The adapter's scale as a flat vector: (in,) for feed-forward modules, else (out,)."""
        v: torch.Tensor = self.ia3_l[adapter_name]
        return v.flatten()

    def _scale(self, names: list[str]) -> torch.Tensor | None:
        scale: torch.Tensor | None = None
        for name in names:
            if name in self.ia3_l and name not in self.merged_adapters:
                scale = self.vector(name) if scale is None else scale * self.vector(name)
        return scale

    def forward_active(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """y = base(l ⊙ x) for feed-forward modules, else l ⊙ base(x); l = the product of the
        active adapters' vectors."""
        scale = self._scale(names)
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    def forward_mixed(
        self, x: torch.Tensor, row_groups: list[tuple[str, torch.Tensor]], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each row gets its own adapter's vector (ones for base rows): one base call."""
        width = self.in_features if self.is_feedforward else self.out_features
        any_vec = next(iter(self.ia3_l.values()))
        per_row = torch.ones(x.shape[0], width, dtype=any_vec.dtype, device=x.device)  # (batch, features)
        for name, rows in row_groups:
            if name in self.ia3_l:
                per_row = per_row.index_copy(0, rows, self.vector(name).expand(len(rows), width))
        per_row = per_row.view(x.shape[0], *([1] * (x.dim() - 2)), width)
        if self.is_feedforward:
            return self.base_layer((x * per_row).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * per_row).to(out.dtype)

    # -- merging ----------------------------------------------------------------------
    def _weight_factor(self, vec: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply the stored weight ((out, in), or (in, out) for Conv1D)."""
        if self.is_feedforward:  # scales input columns
            return vec.view(-1, 1) if self.fan_in_fan_out else vec.view(1, -1)
        return vec.view(1, -1) if self.fan_in_fan_out else vec.view(-1, 1)

    def _params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        b: torch.Tensor | None = getattr(self.base_layer, "bias", None)
        return w, b

    def check_merge(self, adapter_name: str) -> None:
        if self.quantized:
            raise ValueError(
                quantized_merge_error(f"(IA)³ adapter {adapter_name!r}", self.base_layer, "scaling")
            )

    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        w, b = self._params()
        vec = self.vector(adapter_name).detach()
        weight = w * self._weight_factor(vec).to(w.dtype)
        new_bias = b * vec.to(b.dtype) if (not self.is_feedforward and b is not None) else None
        if safe_merge and not (
            torch.isfinite(weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
        ):
            raise ValueError(f"Merging (IA)³ adapter {adapter_name!r} produces NaN/inf weights; not merged.")
        with torch.no_grad():
            w.copy_(weight)
            if b is not None and new_bias is not None:
                b.copy_(new_bias)

    def unmerge_one(self, adapter_name: str) -> None:
        w, b = self._params()
        vec = self.vector(adapter_name).detach()
        zeros = int((vec == 0).sum())
        if zeros:
            self.merged_adapters.append(adapter_name)  # still merged: nothing was changed
            raise ValueError(
                f"Cannot unmerge (IA)³ adapter {adapter_name!r}: its vector has {zeros} zero entr"
                f"{'y' if zeros == 1 else 'ies'}, so the weights it multiplied by 0 are lost and cannot be "
                "divided back. Reload the base model's weights (or merge into a copy next time)."
            )
        with torch.no_grad():
            w.div_(self._weight_factor(vec).to(w.dtype))
            if not self.is_feedforward and b is not None:
                b.div_(vec.to(b.dtype))


class IA3Tuner(Tuner[IA3Config]):
    layer_base: ClassVar[type[AdapterLayer]] = IA3Layer

    def check_config(self, model: nn.Module, config: IA3Config) -> None:
        if config.target_modules is None and model_type(model) not in IA3_DEFAULT_TARGETS:
            raise ValueError(
                f"(IA)³ has no default target modules for model type {model_type(model)!r}. Pass "
                "target_modules (the key/value projections and the FFN's down projection) and "
                "feedforward_modules (the down projection), e.g. IA3Config(target_modules=['k_proj', "
                "'v_proj', 'down_proj'], feedforward_modules=['down_proj'])."
            )

    def _feedforward(self, model: nn.Module, config: IA3Config) -> list[str] | str:
        if config.feedforward_modules is not None:
            return config.feedforward_modules
        if config.target_modules is None:
            return IA3_DEFAULT_FEEDFORWARD.get(model_type(model) or "", [])
        return []

    def target_paths(self, model: nn.Module, config: IA3Config) -> list[str]:
        ff = self._feedforward(model, config)
        paths = find_targets(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            defaults=IA3_DEFAULT_TARGETS,
            accept=lambda _, m: isinstance(m, IA3Layer) or _supported(m),
            method="(IA)³",
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
        )
        if config.target_modules is None:  # written as the ecosystem writes defaults: the names
            config.target_modules = list(IA3_DEFAULT_TARGETS[model_type(model) or ""])
        else:
            config.target_modules = resolved_targets(model, config.target_modules, paths)
        config.feedforward_modules = ff
        return paths

    def create_layer(
        self, path: str, module: nn.Module, config: IA3Config, adapter_name: str
    ) -> AdapterLayer:
        _, _, transposed = _shape(module)
        if transposed:
            config.fan_in_fan_out = True  # GPT-2 Conv1D: record it so other readers merge correctly
        is_ff = name_matches(path, config.feedforward_modules)
        return IA3Layer(module, adapter_name, config, is_feedforward=is_ff)

    def inject(self, peft_model: AdapterHost, config: IA3Config, adapter_name: str) -> None:
        model = peft_model.get_base_model()
        self.check_config(model, config)
        for path in self.target_paths(model, config):
            module = model.get_submodule(path)
            if isinstance(module, IA3Layer):
                is_ff = name_matches(path, config.feedforward_modules)
                if is_ff != module.is_feedforward:
                    raise ValueError(
                        f"{path!r} is a {'feed-forward' if module.is_feedforward else 'non-feed-forward'} "
                        "(IA)³ module for the adapters already on it; a new adapter cannot change that. "
                        "Use the same feedforward_modules for every adapter of a model."
                    )
                module.add_adapter(adapter_name, config)
            else:
                replace_module(model, path, self.create_layer(path, module, config, adapter_name))

    def add_weighted_adapter(
        self,
        peft_model: AdapterHost,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        **kwargs: Any,
    ) -> None:
        """New vectors l = Σ wᵢ lᵢ per module (a linear combination of the scales).

        All adapters must hit the same modules with the same feed-forward split.
        """
        unknown = sorted(set(kwargs) - {"combination_type"})
        if unknown:
            raise ValueError(
                f"(IA)³ add_weighted_adapter takes no {unknown}; only a linear combination exists."
            )
        ctype = kwargs.get("combination_type", "linear")
        if ctype != "linear":
            raise ValueError(
                f"(IA)³ adapters combine linearly only; combination_type={ctype!r} is not available."
            )
        layers = [(p, m) for p, m in peft_model.get_base_model().named_modules() if isinstance(m, IA3Layer)]
        for path, layer in layers:
            present = [a for a in adapters if a in layer.ia3_l]
            if present and len(present) != len(adapters):
                raise ValueError(
                    f"Adapters {adapters} do not all target {path!r} (only {present} do); (IA)³ adapters "
                    "can be combined only when they target the same modules."
                )
        first = peft_model.peft_config[adapters[0]]
        new_config = copy.deepcopy(first)
        peft_model.add_adapter(adapter_name, new_config)
        with torch.no_grad():
            for _, layer in layers:
                if adapter_name in layer.ia3_l:
                    combined = sum(w * layer.ia3_l[a] for a, w in zip(adapters, weights))
                    layer.ia3_l[adapter_name].copy_(combined)


register_method(
    PeftType.IA3.value,
    IA3Config,
    IA3Tuner,
    cli=[CliRecipe("ia3", "(IA)3: learned rescaling of keys, values and FFN activations", 5e-3)],
)
