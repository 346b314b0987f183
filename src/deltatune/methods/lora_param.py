"""LoRA on a named parameter (``LoraConfig(target_parameters=[...])``), above all the fused experts
of mixture-of-experts models.

In transformers 5 the experts of Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ... are not
``nn.Linear`` modules but one 3-D parameter per projection, e.g. ``mlp.experts.gate_up_proj`` of
shape (E, out, in) (GPT-OSS stores (E, in, out)), and the router is a module with a plain
``weight`` (E, hidden). LoRA on such a parameter gives every expert e its own factors::

    W'[e] = W[e] + s · B[e] A[e]        A[e]: (r, in)   B[e]: (out, r)   s = alpha / r

The factors of all experts live in one ``lora_A`` (E·r, in) and one ``lora_B`` (out, E·r), laid out
as the ecosystem's files have them (PEFT's ``ParamWrapper``)::

    A[e] = lora_A.weight.view(E, r, in)[e]
    B[e] = lora_B.weight.view(out, r, E)[:, :, e]     (expert index fastest along lora_B's columns)

A 2-D parameter (a router) is the E = 1 case: W' = W + s · B A. One :class:`ParamLora` wraps the
module that owns the parameter; a second targeted parameter of the same module nests a second
wrapper around the first (in the module's parameter order), so saved keys read
``mlp.experts.lora_A.weight`` (the outer, e.g. ``down_proj``) and
``mlp.experts.base_layer.lora_A.weight`` (the inner, e.g. ``gate_up_proj``)::

    mlp.experts                  ParamLora(parameter_name="down_proj")
    └── base_layer               ParamLora(parameter_name="gate_up_proj")
        └── base_layer           the model's experts module, frozen

The reference forward runs the owning module with W' in place of W (``torch.func.functional_call``),
for any module. The experts modules of transformers get a fast path (:mod:`lora_experts`): the
tokens are grouped by expert and the LoRA term is computed per token, y = x W[e]ᵀ + s·(x A[e]ᵀ) B[e]ᵀ,
with grouped matrix products over the expert dimension, so neither W' nor a weight gradient the size
of all experts is ever built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from deltatune.methods import lora_experts
from deltatune.methods.base import AdapterLayer, DelegatingLayer, adapter_dtype, replace_module

# Names of LoRA's per-adapter containers: a module inside one is an adapter's own, never a target.
_ADAPTER_PARTS = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "lora_dropout",
    "modules_to_save",
    "original_module",
}


class ParamLora(DelegatingLayer):
    """LoRA on one parameter (2-D, or 3-D with the experts first) of the wrapped module."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    def __init__(
        self, base_layer: nn.Module, parameter_name: str, adapter_name: str, config: Any, path: str = ""
    ) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        param = self.parameter()
        if param.dim() == 3:
            # transformers' experts store (E, out, in) unless the module says ``is_transposed``.
            self.transposed = bool(getattr(self.real_module(), "is_transposed", False))
            e, d1, d2 = param.shape
            self.num_experts = int(e)
            self.in_features, self.out_features = (
                (int(d1), int(d2)) if self.transposed else (int(d2), int(d1))
            )
        elif param.dim() == 2:
            self.transposed = False
            self.num_experts = 1
            self.out_features, self.in_features = int(param.shape[0]), int(param.shape[1])
        else:
            raise ValueError(
                f"target_parameters: {path!r} is a {param.dim()}-D parameter; LoRA on a parameter needs a 2-D "
                "weight (out, in) or a 3-D stack of expert weights (experts, out, in)."
            )
        self.add_adapter(adapter_name, config, path=path)

    @property
    def weight(self) -> torch.Tensor:
        return self.real_module().weight  # type: ignore[return-value]

    # -- structure ----------------------------------------------------------------------
    def chain(self) -> list[ParamLora]:
        """This wrapper and the ones nested inside it, outermost first."""
        out: list[ParamLora] = [self]
        while isinstance(out[-1].base_layer, ParamLora):
            out.append(out[-1].base_layer)
        return out

    def real_module(self) -> nn.Module:
        """The model's own module that holds the parameter (under every nested wrapper)."""
        return self.chain()[-1].base_layer

    def parameter(self) -> torch.Tensor:
        return getattr(self.real_module(), self.parameter_name)  # type: ignore[no-any-return]

    def unload(self) -> nn.Module:
        return self.real_module()

    # -- adapters -----------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.lora_A:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        path = kwargs.get("path", "")
        check_param_config(config)
        param = self.parameter()
        if not param.dtype.is_floating_point:
            raise ValueError(
                f"target_parameters: {path!r} is stored as {param.dtype} (quantised?); LoRA on a parameter "
                "needs the weight in floating point. Quantised expert stacks are not supported yet: load the "
                "experts unquantised (quantize_model and bitsandbytes leave 3-D expert weights dense)."
            )
        r = config.rank_for(path)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(path)
        device = param.device if (param.numel() or param.is_meta) else None
        factory = {"device": device, "dtype": adapter_dtype(param.dtype)}
        n = self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * n, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r * n, self.out_features, bias=False, **factory)
        a, b = self.factors(adapter_name)
        init = config.init_lora_weights
        if init is not False and not a.is_meta:
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)

    # -- maths --------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (A, B): (E·r, in) and (out, E·r)."""
        a: torch.Tensor = self.lora_A[adapter_name].weight  # type: ignore[assignment]
        b: torch.Tensor = self.lora_B[adapter_name].weight  # type: ignore[assignment]
        return a, b

    def expert_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert (A, B): (E, r, in) and (E, out, r); views of the stored factors."""
        a, b = self.factors(adapter_name)
        n = self.num_experts
        return a.view(n, -1, a.shape[-1]), b.view(b.shape[0], -1, n).permute(2, 0, 1)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s · B A in the parameter's layout: (out, in); (E, out, in), or (E, in, out) if transposed."""
        s = self.scaling[adapter_name]
        if self.parameter().dim() == 2:
            a, b = self.factors(adapter_name)
            return (b @ a) * s
        a3, b3 = self.expert_factors(adapter_name)
        delta = torch.bmm(b3, a3) * s  # (E, out, in)
        return delta.transpose(-2, -1) if self.transposed else delta

    def pending(self, names: list[str] | None = None) -> list[str]:
        """Adapters of this layer that apply now: active (or ``names``), present here, not merged."""
        names = self.active_adapters if names is None else names
        return [n for n in names if n in self.lora_A and n not in self.merged_adapters]

    # -- forward ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module with every parameter of the chain replaced by W + Σ s·B A.

        The outermost wrapper serves the whole chain, so nested wrappers are never called here.
        """
        chain = self.chain()
        real = chain[-1].base_layer
        if self.disabled:
            for layer in chain:
                if layer.merged:
                    layer.unmerge()
            return real(*args, **kwargs)
        if self.row_groups is not None:
            return _forward_mixed(chain, real, self.row_groups, args, kwargs)
        plan = {layer.parameter_name: [(layer, n) for n in layer.pending()] for layer in chain}
        return _run(real, plan, args, kwargs)

    # -- merging ------------------------------------------------------------------------
    def merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        param = self.parameter()
        with torch.no_grad():
            merged = param + self.delta_weight(adapter_name).to(param.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter {adapter_name!r} produces NaN/inf weights; not merged.")
            param.copy_(merged)

    def unmerge_one(self, adapter_name: str) -> None:
        param = self.parameter()
        with torch.no_grad():
            param.sub_(self.delta_weight(adapter_name).to(param.dtype))

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}"


Plan = dict[str, list[tuple[ParamLora, str]]]


def _run(real: nn.Module, plan: Plan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``real(*args, **kwargs)`` with the planned adapters' deltas on its parameters."""
    plan = {p: todo for p, todo in plan.items() if todo}
    if not plan:
        return real(*args, **kwargs)
    deltas = {
        p: [(*layer.expert_factors(n), layer.scaling[n]) for layer, n in todo]
        for p, todo in plan.items()
        if todo[0][0].parameter().dim() == 3
    }
    if len(deltas) == len(plan) and lora_experts.supports(real, deltas):
        call = lora_experts.call_args(real, args, kwargs)
        if call is not None:
            return lora_experts.forward(real, deltas, *call)
    values = {}
    for p, todo in plan.items():
        w = getattr(real, p)
        delta = sum((layer.delta_weight(n) for layer, n in todo[1:]), todo[0][0].delta_weight(todo[0][1]))
        values[p] = w + delta.to(w.dtype)
    return functional_call(real, values, args, kwargs, tie_weights=False, strict=False)


def _forward_mixed(
    chain: list[ParamLora],
    real: nn.Module,
    row_groups: list[tuple[str, torch.Tensor]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """One forward in which each batch row uses its own adapter (or none).

    The wrapped module may see the batch flattened to tokens (an MoE block hands its experts and
    router (batch·seq, hidden)): every tensor argument whose first dimension is that token count is
    split by row, each group runs with its adapter's deltas, and the outputs are put back in place.
    """
    if any(layer.merged for layer in chain):
        raise ValueError("A mixed-batch forward needs unmerged adapters; call unmerge_adapter() first.")
    batch = sum(int(rows.numel()) for _, rows in row_groups)
    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    tokens = int(x.shape[0])
    if tokens % batch:
        raise ValueError(
            f"Mixed-batch forward: {type(real).__name__} got {tokens} rows for a batch of {batch}; cannot tell "
            "which rows belong to which adapter."
        )
    per = tokens // batch
    out: Any = None
    for name, rows in row_groups:
        idx = (rows.unsqueeze(1) * per + torch.arange(per, device=rows.device)).reshape(-1)
        part_args = tuple(_take(a, idx, tokens) for a in args)
        part_kwargs = {k: _take(v, idx, tokens) for k, v in kwargs.items()}
        plan = {layer.parameter_name: [(layer, name)] if name in layer.lora_A else [] for layer in chain}
        y = _run(real, plan, part_args, part_kwargs)
        out = _put(out, y, idx, tokens)
    return out


def _take(value: Any, idx: torch.Tensor, tokens: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == tokens:
        return value.index_select(0, idx)
    return value


def _put(out: Any, part: Any, idx: torch.Tensor, tokens: int) -> Any:
    """Write ``part`` (a group's output: a tensor or a tuple/list of them) into rows ``idx`` of ``out``."""
    if isinstance(part, torch.Tensor):
        if out is None:
            out = part.new_zeros((tokens, *part.shape[1:]))
        return out.index_copy(0, idx, part)
    if isinstance(part, (tuple, list)):
        olds = out if out is not None else [None] * len(part)
        return type(part)(_put(o, p, idx, tokens) for o, p in zip(olds, part))
    raise ValueError(f"Mixed-batch forward: cannot split an output of type {type(part).__name__} by rows.")


# -- configuration ----------------------------------------------------------------------


def check_param_config(config: Any) -> None:
    """Refuse settings that have no meaning for LoRA on a parameter (PEFT refuses the same)."""
    if config.lora_dropout:
        raise ValueError(
            f"lora_dropout={config.lora_dropout} with target_parameters={config.target_parameters} (on a "
            "mixture-of-experts model, 'all-linear' adapts the experts and router this way): the update is added "
            "to the weight itself (W + s·B A), so there is no separate LoRA input to drop. Set lora_dropout=0 "
            "(PEFT refuses it for target_parameters too)."
        )
    if config.use_dora:
        raise ValueError(
            "use_dora=True with target_parameters: DoRA on fused expert weights is not supported (PEFT refuses "
            "it too). Use plain LoRA for target_parameters, or DoRA with target_modules only."
        )
    if config.fan_in_fan_out:
        raise ValueError("fan_in_fan_out=True does not apply to target_parameters; leave it False.")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} with target_parameters: only the default init "
            "(True), 'gaussian' and False are defined for LoRA on a parameter (PiSSA, OLoRA and LoftQ factor "
            "a 2-D weight). Use the default init, or apply that init to target_modules only."
        )


def check_param_names(names: object) -> None:
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"target_parameters={names!r}: give a list of parameter names, e.g. "
            "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'] (a name matches a parameter whose full name "
            "equals it or ends with '.' + it)."
        )


def unwrapped_path(path: str) -> str:
    """A module path without the ``base_layer`` steps that adapter wrappers insert."""
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", path).lstrip(".")


def _named_targets(model: nn.Module, names: list[str]) -> Iterator[tuple[str, str, str]]:
    """(module path, parameter name, full unwrapped parameter name) of every targeted parameter, in
    model order; a module's own parameters in their registration order."""
    for mpath, module in model.named_modules():
        if isinstance(module, ParamLora) or any(part in _ADAPTER_PARTS for part in mpath.split(".")):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{unwrapped_path(mpath)}.{pname}" if mpath else pname
            if full in names or any(full.endswith("." + n) for n in names):
                yield mpath, pname, full


def inject_parameters(model: nn.Module, config: Any, adapter_name: str, others: list[Any]) -> list[str]:
    """Wrap every parameter ``config.target_parameters`` names; return their full names.

    ``others``: the configs of the model's other adapters. Adapters that target parameters must all
    target the same ones, since the nesting of wrappers (and so every saved key) depends on the set.
    """
    names = sorted(set(config.target_parameters or []))
    if not names:
        return []
    check_param_config(config)
    for other in others:
        theirs = getattr(other, "target_parameters", None)
        if theirs and sorted(set(theirs)) != names:
            raise ValueError(
                f"All adapters that use target_parameters must target the same parameters (the nesting of the "
                f"wrappers, and so the saved keys, depend on it): this adapter has {names}, another has "
                f"{sorted(set(theirs))}. Target the same list, or use a separate model."
            )
    targets = list(_named_targets(model, names))
    if not targets:
        raise ValueError(
            f"target_parameters={names} matched no parameter of the model. Name parameters by their full "
            f"name or a suffix of it, e.g. {_example_params(model)}."
        )
    for mpath, pname, full in targets:
        if mpath == "":
            raise ValueError(
                f"target_parameters: {pname!r} belongs to the top-level module itself, which cannot be wrapped. "
                "Target a parameter of a submodule."
            )
        parent_path, _, leaf = mpath.rpartition(".")
        if leaf == "base_layer":
            parent = model.get_submodule(parent_path)
            if isinstance(parent, AdapterLayer) and not isinstance(parent, ParamLora):
                raise ValueError(
                    f"target_parameters: {full!r} belongs to {parent_path!r}, which target_modules already "
                    "adapts. Leave that module out of target_modules, or the parameter out of target_parameters."
                )
        outer_path = _outer_path(model, mpath)
        outer = model.get_submodule(outer_path)
        chain = outer.chain() if isinstance(outer, ParamLora) else []
        existing = next((w for w in chain if w.parameter_name == pname), None)
        if existing is not None:
            existing.add_adapter(adapter_name, config, path=full)
        else:
            replace_module(model, outer_path, ParamLora(outer, pname, adapter_name, config, path=full))
    return [full for _, _, full in targets]


def _outer_path(model: nn.Module, mpath: str) -> str:
    """The path at which the outermost wrapper of the module at ``mpath`` sits (or would sit)."""
    path = mpath
    while path.endswith(".base_layer") or path == "base_layer":
        parent = path.rpartition(".")[0] if "." in path else ""
        if not isinstance(model.get_submodule(parent), ParamLora):
            break
        path = parent
    return path


def _example_params(model: nn.Module) -> list[str]:
    seen: list[str] = []
    for name, p in model.named_parameters():
        if p.dim() == 3 or name.endswith("gate.weight"):
            short = ".".join(name.split(".")[-3:])
            if short not in seen:
                seen.append(short)
    return seen[:4] or ["mlp.experts.gate_up_proj"]
