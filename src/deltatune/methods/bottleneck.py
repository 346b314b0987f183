"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; parallel: He et al. 2022).

The adapter is a small MLP with a residual connection, computed as AdapterHub's ``adapters``
library computes it (``BnConfig``), so that its adapters load here with the same outputs::

    f(x) = dropout( scaling · up( act( down( [LayerNorm_before](x) ) ) ) )      # (..., d) → (..., d)

Where it sits in a transformer block (``h``: the sub-layer's output, ``r``: the residual
stream entering the sub-layer, ``LN``: the block's own LayerNorm, post-LN models only)::

    houlsby   after attention and after the FFN:  LN( h + f(h) + r )                 (both sub-layers)
    pfeiffer  after the FFN only:                  LN( h + f(LN(h + r)) + r )
    parallel  beside the FFN, reading r:            LN( h + f(r) + r )  (scaling 4)

In pre-LN models (Llama, GPT-2, T5) there is no ``LN`` around the sum: ``h + f(LN(h + r)) + r``
becomes ``h + f(h + r) + r``, and ``r`` is read where the block feeds its LayerNorm. The switches
of AdapterHub's ``BnConfig`` (``original_ln_before``, ``original_ln_after``,
``residual_before_ln``, ``adapter_residual_before_ln``, ``ln_before``, ``ln_after``, ``scaling``,
``dropout``, ``leave_out``) are fields of :class:`BottleneckConfig`; the three placements are
presets of them (see ``docs/bottleneck.md`` for the table). The general formula, for one
adapter at one site, is :func:`sequential_site` / :func:`parallel_site`.

A fresh adapter's up-projection is zero (PEFT's convention), so adding one leaves the model's
outputs unchanged; AdapterHub draws it at random instead.

Parameters per adapter: down d·m + m, up m·d + d, each LayerNorm 2d, a ``"channel"`` scaling d,
i.e. ``2dm + m + d`` for the presets. Houlsby places two per block, Pfeiffer and parallel one.

A bottleneck adapter is a sequential non-linear module: it cannot be folded into existing
weights, so merging raises. The files use the ecosystem's layout (``adapter_config.json`` +
``adapter_model.safetensors``) with ``peft_type: "BOTTLENECK"``, a format of deltatune's own;
AdapterHub's folders are read by :mod:`deltatune.formats.adapterhub`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import CliRecipe, PeftConfig, PeftType, register_method
from deltatune.methods.base import AdapterLayer, DelegatingLayer, Tuner
from deltatune.methods.bottleneck_config import (
    MERGE_ERROR,
    POST_LN,
    PRE_LN,
    SCALING_MODES,
    SUBLAYERS,
    BottleneckConfig,
    activation,
)
from deltatune.targeting import DEFAULT_LAYERS_PATTERNS, _layer_index, linear_types, model_type, name_matches


class BottleneckBlock(nn.Module):
    """One adapter: ``f(x) = dropout(scaling · up(act(down(ln_before(x)))))``, then ``ln_after``
    and the adapter's own residual as the config orders them. (..., d) → (..., d)."""

    def __init__(self, d: int, m: int, config: BottleneckConfig, device: torch.device | None) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device}
        self.config = config
        self.layer_norm = nn.LayerNorm(d, **factory) if config.ln_before else nn.Identity()
        self.down = nn.Linear(d, m, **factory)
        self.act = activation(str(config.non_linearity))
        self.up = nn.Linear(m, d, **factory)
        self.layer_norm_after = nn.LayerNorm(d, **factory) if config.ln_after else nn.Identity()
        self.dropout = nn.Dropout(float(config.dropout))
        self.scaling = 1.0
        if config.scaling in SCALING_MODES:
            self.scale = nn.Parameter(torch.ones(1 if config.scaling == "learned" else d, **factory))
        else:
            self.scaling = float(config.scaling)  # type: ignore[arg-type]
        if not self.down.weight.is_meta:
            with torch.no_grad():
                nn.init.normal_(self.down.weight, std=0.02)
                nn.init.zeros_(self.down.bias)
                if config.init == "zeros":
                    nn.init.zeros_(self.up.weight)
                else:
                    nn.init.normal_(self.up.weight, std=0.02)
                nn.init.zeros_(self.up.bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """f(x), the scaled (and dropped-out) bottleneck MLP."""
        up = self.up(self.act(self.down(self.layer_norm(x))))
        up = up * self.scale if hasattr(self, "scale") else up * self.scaling
        return self.dropout(up)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Sequential: ``ln_after(f(x)) + residual`` (or ``ln_after(f(x) + residual)``); parallel
        (``residual=None``): ``ln_after(f(x))``."""
        dtype = self.down.weight.dtype
        out = self.mlp(x.to(dtype))
        if residual is None:
            return self.layer_norm_after(out).to(x.dtype)
        residual = residual.to(dtype)
        if self.config.adapter_residual_before_ln:
            return self.layer_norm_after(out + residual).to(x.dtype)
        return (self.layer_norm_after(out) + residual).to(x.dtype)


LayerNormFn = nn.Module | None


def sequential_site(
    blocks: list[BottleneckBlock], h: torch.Tensor, r: torch.Tensor | None, ln: LayerNormFn
) -> torch.Tensor:
    """Sequential adapters (stacked, as AdapterHub's ``Stack``) on sub-layer output ``h``.

    Returns ``z``, what goes into the block's residual add (and LayerNorm) in place of ``h``.
    The first adapter's config decides what the adapters read and their residual.
    """
    cfg = blocks[0].config
    residual, x = h, h
    if cfg.original_ln_before:
        assert r is not None
        x = h + r
        if cfg.residual_before_ln == "post_add":
            residual = x
        if ln is not None:
            x = ln(x)
    if cfg.residual_before_ln is False:
        residual = x
    for block in blocks:
        x = block(x, residual)
    return x


def parallel_site(
    blocks: list[BottleneckBlock], h: torch.Tensor, r: torch.Tensor | None, ln: LayerNormFn
) -> torch.Tensor:
    """Parallel adapters read the sub-layer's residual input ``r``: ``z = h + Σ f(r)``."""
    assert r is not None
    for block in blocks:
        h = h + block(r, None)
    return h


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out: Any, h: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (h, *out[1:])
    if isinstance(out, list):
        return [h, *out[1:]]
    return h


class BottleneckLayer(DelegatingLayer):
    """A block sub-layer (``base_layer``) whose output passes through named bottleneck adapters.

    ``mode`` POST_LN: the wrapped module ends a post-LN sub-layer (``LN(dropout(dense(x)) + r)``)
    and this layer computes it with the adapters inside. PRE_LN: the block adds the wrapped
    sub-layer's output to the residual stream itself; ``r`` is the input of the sub-layer's
    LayerNorm (``residual_source``, read by a forward pre-hook), or the sub-layer's own input.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("bottleneck",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: BottleneckConfig,
        mode: str,
        d: int,
        parts: tuple[str, str, str] | None = None,
        residual_source: nn.Module | None = None,
    ) -> None:
        super().__init__(base_layer)
        self.mode = mode
        self.hidden_size = d
        self.parts = parts
        self.bottleneck = nn.ModuleDict()
        self._residual: torch.Tensor | None = None
        # A plain attribute, not a submodule: the LayerNorm belongs to the block, not to this layer.
        object.__setattr__(self, "_residual_source", residual_source)
        if residual_source is not None:
            residual_source.register_forward_pre_hook(self._capture_residual)
        self.add_adapter(adapter_name, config)

    def _capture_residual(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._residual = args[0] if args else None

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if adapter_name in self.bottleneck:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        params = [p for p in self.base_layer.parameters()]
        device = params[0].device if params else None
        block = BottleneckBlock(self.hidden_size, config.size_for(self.hidden_size), config, device)
        block.train(self.base_layer.training)  # an adapter added to a model in eval mode drops out nothing
        self.bottleneck[adapter_name] = block
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def unload(self) -> nn.Module:
        source = self._residual_source
        if source is not None:  # drop this layer's hook (found by owner, so a deep copy drops its own)
            hooks = source._forward_pre_hooks
            for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is self]:
                del hooks[key]
            object.__setattr__(self, "_residual_source", None)
        return self.base_layer

    def block(self, name: str) -> BottleneckBlock:
        block = self.bottleneck[name]
        assert isinstance(block, BottleneckBlock)
        return block

    # -- the maths -------------------------------------------------------------------------
    def _site(
        self, names: list[str], h: torch.Tensor, r: torch.Tensor | None, ln: LayerNormFn
    ) -> torch.Tensor:
        blocks = [self.block(n) for n in names]
        site = parallel_site if blocks[0].config.is_parallel else sequential_site
        return site(blocks, h, r, ln)

    def _z(self, names: list[str], h: torch.Tensor, r: torch.Tensor | None, ln: LayerNormFn) -> torch.Tensor:
        """``z`` for the whole batch: one setup, or each row group through its own adapter."""
        if self.row_groups is None:
            return self._site(names, h, r, ln)
        out = h
        for name, rows in self.row_groups:
            if name in self.bottleneck:
                rr = r.index_select(0, rows) if r is not None else None
                out = out.index_copy(0, rows, self._site([name], h.index_select(0, rows), rr, ln))
        return out

    def _needs_residual(self, names: list[str]) -> bool:
        groups = [n for n, _ in self.row_groups] if self.row_groups is not None else names
        return any(
            (c := self.block(n).config).is_parallel or bool(c.original_ln_before)
            for n in groups
            if n in self.bottleneck
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [n for n in self.active_adapters if n in self.bottleneck]
        if self.disabled or (not names and self.row_groups is None):
            self._residual = None
            return self.base_layer(*args, **kwargs)
        if self.mode == POST_LN:
            return self._forward_post_ln(names, *args, **kwargs)
        r = self._residual
        self._residual = None
        if self._residual_source is None:  # a sub-layer without a known LayerNorm: its input is r
            r = args[0] if args else next(iter(kwargs.values()), None)
        if r is None and self._needs_residual(names):
            raise RuntimeError(
                "This bottleneck adapter reads the residual stream, but the block did not call the LayerNorm "
                "in front of the sub-layer before it; use original_ln_before=False and a sequential placement "
                "for this model."
            )
        out = self.base_layer(*args, **kwargs)
        return _replace_first(out, self._z(names, _first(out), r, None))

    def _forward_post_ln(
        self, names: list[str], hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        assert self.parts is not None
        dense, dropout, norm = (getattr(self.base_layer, p) for p in self.parts)
        r = args[0] if args else kwargs["input_tensor"]
        h = dropout(dense(hidden_states))
        z = self._z(names, h, r, norm)
        if self.row_groups is None:
            after = self.block(names[-1]).config.original_ln_after  # the last adapter's, as AdapterHub
            return norm(z + r) if after else z
        out = norm(z + r)
        for name, rows in self.row_groups:
            if name in self.bottleneck and not self.block(name).config.original_ln_after:
                out = out.index_copy(0, rows, z.index_select(0, rows))
        return out

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


@dataclass(frozen=True)
class Site:
    path: str
    mode: str
    parts: tuple[str, str, str] | None = None  # POST_LN: (dense, dropout, LayerNorm) attribute names
    ln_path: str | None = None  # PRE_LN: the LayerNorm whose input is the residual stream


class BottleneckTuner(Tuner):
    prefix: ClassVar[str] = "bottleneck"
    layer_base: ClassVar[type[AdapterLayer]] = BottleneckLayer

    def _sites(self, model: nn.Module, config: BottleneckConfig) -> list[Site]:
        """Every place an adapter goes, or a clear error."""
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
        wanted: list[tuple[list[str] | str, str | None, str]] = []  # (spec, sibling LayerNorm, role)
        if user:
            if config.placement == "houlsby":
                wanted.append((config.attention_modules or [], None, "attention_modules"))
            if config.ffn_modules is None:
                raise ValueError(
                    f"placement={config.placement!r} needs ffn_modules (the feed-forward sub-layers)."
                )
            wanted.append((config.ffn_modules, None, "ffn_modules"))
        else:
            assert known is not None
            if config.placement == "houlsby":
                wanted.append((known.attention, known.attention_ln, "attention"))
            wanted.append((known.ffn, known.ffn_ln, "ffn"))
        parts = known.post_ln if known is not None and not user else None
        layers = config.layers_to_transform
        layer_set = {layers} if isinstance(layers, int) else set(layers) if layers is not None else None
        leave_out = set(config.leave_out or [])
        sites: list[Site] = []
        for spec, ln_leaf, role in wanted:
            found = []
            for path, _ in model.named_modules():
                if not path or ".base_layer" in "." + path or not name_matches(path, spec):
                    continue
                index = _layer_index(path, DEFAULT_LAYERS_PATTERNS)
                if (layer_set is not None and index not in layer_set) or index in leave_out:
                    continue
                if parts is not None:
                    found.append(Site(path, POST_LN, parts=parts))
                else:
                    ln_path = path.rpartition(".")[0] + "." + ln_leaf if ln_leaf else None
                    found.append(Site(path, PRE_LN, ln_path=ln_path))
            if not found:
                leaves = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
                close = difflib.get_close_matches(str(spec).split(".")[-1], leaves, n=4, cutoff=0.3)
                restricted = " (restricted to layers" if layer_set is not None or leave_out else ""
                raise ValueError(
                    f"Bottleneck {role}={spec!r} matched no module of the model"
                    + (
                        f"{restricted} {sorted(layer_set or [])}, leave_out {sorted(leave_out)})"
                        if restricted
                        else ""
                    )
                    + f". Modules that look close: {close or _candidates(model)}."
                )
            sites += found
        if not config.original_ln_after and any(s.mode == PRE_LN for s in sites):
            raise ValueError(
                f"original_ln_after=False makes a sub-layer return the adapter's output without the block's "
                f"residual, but in this model ({mtype}) the block adds the residual itself after "
                f"{sites[0].path!r}, so deltatune cannot take it away (AdapterHub refuses this too for such "
                "models). Use original_ln_after=True here."
            )
        return sites

    def target_paths(self, model: nn.Module, config: PeftConfig) -> list[str]:
        assert isinstance(config, BottleneckConfig)
        return [s.path for s in self._sites(model, config)]

    def inject(self, peft_model: Any, config: PeftConfig, adapter_name: str) -> None:
        from deltatune.methods.base import replace_module

        assert isinstance(config, BottleneckConfig)
        model = peft_model.get_base_model()
        sites = self._sites(model, config)
        existing = [p for p, m in model.named_modules() if isinstance(m, BottleneckLayer)]
        plan = []
        for site in sites:  # check everything before changing anything
            path = site.path
            module = model.get_submodule(path)
            if isinstance(module, BottleneckLayer):
                kinds = {module.block(n).config.is_parallel for n in module.bottleneck}
                if module.mode != site.mode or kinds != {config.is_parallel}:
                    raise ValueError(
                        f"{path!r} already carries bottleneck adapters of another placement; this adapter "
                        f"(placement={config.placement!r}) would be combined with them in a way neither "
                        "means. Put adapters of different placements on separate copies of the base model."
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
            plan.append((site, int(d), module))
        for site, d, module in plan:
            if isinstance(module, BottleneckLayer):
                module.add_adapter(adapter_name, config)
                continue
            ln = model.get_submodule(site.ln_path) if site.ln_path else None
            layer = BottleneckLayer(module, adapter_name, config, site.mode, d, site.parts, ln)
            replace_module(model, site.path, layer)

    def load_state_dict(
        self, peft_model: Any, config: PeftConfig, adapter_name: str, state: dict[str, torch.Tensor]
    ) -> None:
        """As every layer method, after lining up a differing model prefix (``bert.encoder...`` saved
        from a model with a head, loaded into a bare ``BertModel``): keys are matched from the
        numbered block on, and only when that matches every key one to one."""
        kmap = self.key_map(peft_model.get_base_model(), config, adapter_name)
        if state and not set(state) <= set(kmap):
            # Older deltatune files put BERT's adapters on the sub-layer's dense layer.
            state = {_OLD_BERT_SITE.sub(".output.bottleneck.", k): v for k, v in state.items()}
        if state and not set(state) <= set(kmap):
            state = _align_prefix(state, list(kmap)) or state
        super().load_state_dict(peft_model, config, adapter_name, state)

    def check_mergeable(self, config: PeftConfig) -> None:
        raise ValueError(MERGE_ERROR)


_OLD_BERT_SITE = re.compile(r"\.output\.dense\.bottleneck\.")
_BLOCK = re.compile(r"(?:^|\.)((?:layers|layer|h|block|blocks)\.\d+\..*)$")


def _align_prefix(state: dict[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor] | None:
    def tail(key: str) -> str | None:
        m = _BLOCK.search(key)
        return m.group(1) if m else None

    by_tail: dict[str, str] = {}
    for k in wanted:
        t = tail(k)
        if t is None or t in by_tail:
            return None
        by_tail[t] = k
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        t = tail(k)
        if t is None or t not in by_tail or by_tail[t] in out:
            return None
        out[by_tail[t]] = v
    return out


register_method(
    PeftType.BOTTLENECK.value,
    BottleneckConfig,
    BottleneckTuner,
    cli=[CliRecipe("bottleneck", "bottleneck adapters after attention / FFN blocks", 1e-3)],
)
