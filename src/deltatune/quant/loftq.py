"""LoftQ (Li et al. 2023): a LoRA initialisation that absorbs the quantisation error.

QLoRA starts from Q = quantise(W) with B = 0, so training begins with the full error
W − Q. LoftQ instead picks Q and the factors together, alternating T times::

    Q_t        = quantise(W − s·B_{t-1} A_{t-1})        (B_0 A_0 = 0, so Q_1 = quantise(W))
    (A_t, B_t) = best rank-r approximation of (W − Q_t) / s      (truncated SVD)

so that Q + s·B A ≈ W, with s the adapter's LoRA scaling (alpha / r, or alpha / √r for
rsLoRA): the factors are divided by s so that the product the layer adds is exactly the
rank-r SVD of the residual. The SVD's singular values are split evenly, B = U √S / √s,
A = √S Vᵀ / √s.

Two ways in:

- ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4,
  loftq_iter=T))`` on a full-precision model: each targeted weight W is replaced, in its
  ``nn.Linear``, by the dequantised Q (as PEFT does), so ``disable_adapter()`` shows
  QLoRA's starting point. Quantise the model afterwards (``quantize_model``) to train
  in 4 bits: NF4 re-quantisation of Q gives Q back (see ``docs/qlora.md``).
- On a model that is already 4-bit, the full-precision weights are gone: create the
  adapter as usual and call :func:`loftq_initialize` with the original weights. For
  deltatune ``Linear4bit`` bases the whole algorithm runs and the layer's NF4 codes are
  replaced by LoftQ's Q; for bitsandbytes bases Q is kept as stored (one SVD, T = 1).

:func:`loftq_report` (or the return value of :func:`loftq_initialize`) gives per layer
and in total ‖W − Q_1‖_F (QLoRA's start) and ‖W − (Q + s·BA)‖_F (LoftQ's start).

Bits: 4 is NF4 (bitsandbytes-identical, blocks of 64, double-quantised absmax), 2 is
a 2-bit NormalFloat code built the same way as NF4 (blocks of 64), 8 is int8 with one
absmax per row (the storage of bitsandbytes' 8-bit layers). Only the 4-bit Q can be
stored in 4 bits here; 2- and 8-bit Q stay dense (dequantised).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn

from deltatune.methods.lora import LORA_INIT_FNS, Linear, LoraConfig
from deltatune.methods.lora.dora import row_norm
from deltatune.quant.nf4 import Linear4bit, NF4Tensor, quantize_nf4

__all__ = [
    "LoftQConfig",
    "LoftQLayerError",
    "LoftQReport",
    "LoftQResult",
    "loftq_decompose",
    "loftq_initialize",
    "loftq_into_4bit",
    "loftq_report",
    "quantize_dequantize",
]

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class LoftQConfig:
    """LoftQ settings, with PEFT's field names: ``loftq_bits`` (2, 4 or 8) and ``loftq_iter`` (T ≥ 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        _check_bits(self.loftq_bits)
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(
                f"loftq_iter={self.loftq_iter!r}: the number of alternating steps must be an integer ≥ 1 "
                "(1 to 5 is usual; the error falls with more steps)."
            )

    @classmethod
    def coerce(cls, value: Any) -> LoftQConfig:
        """A LoftQConfig from a LoftQConfig, a dict with PEFT's keys, or any object with those attributes."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(
                    "init_lora_weights='loftq' needs loftq_config, e.g. "
                    "LoraConfig(init_lora_weights='loftq', loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))."
                )
            unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
            if unknown:
                raise ValueError(
                    f"loftq_config has unknown keys {unknown}; it takes loftq_bits and loftq_iter."
                )
            return cls(**dict(value))
        if hasattr(value, "loftq_bits"):
            return cls(int(value.loftq_bits), int(getattr(value, "loftq_iter", 1)))
        raise TypeError(f"loftq_config must be a LoftQConfig or a dict, got {type(value).__name__}.")


def _check_bits(bits: Any) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"loftq_bits={bits!r} is not supported: LoftQ quantises to 2, 4 (NF4, QLoRA's format) or 8 bits."
        )


# -- quantisers (W → dequantised Q, plus what stores it) -----------------------------------------


@cache
def _nf2_codebook() -> tuple[float, ...]:
    # NormalFloat with 2 bits, built like NF4: quantiles of N(0, 1) (two positive, one
    # negative, and an exact zero), scaled to [-1, 1] → about [-1, 0, 0.338, 1].
    offset = 0.9677083  # NF4's outermost probability, (1 - 1/(2·15) + 1 - 1/(2·16)) / 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 3, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 2, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return tuple((levels / levels.abs().max()).tolist())


def _blockwise_nf2(w: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """2-bit NormalFloat, absmax per block of ``block_size`` values; returns the dequantised (out, in) fp32."""
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    code = torch.tensor(_nf2_codebook(), dtype=torch.float32, device=w.device)
    idx = torch.bucketize(blocks / absmax, (code[:-1] + code[1:]) / 2)
    return (code[idx] * absmax).view(-1)[: flat.numel()].view(w.shape)


def _rowwise_int8(w: torch.Tensor) -> torch.Tensor:
    """int8 with one absmax per output row (as bitsandbytes' 8-bit layers store weights), dequantised."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-38) / 127.0
    return torch.round(w / scale).clamp_(-127, 127) * scale


Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


def _quantizer(bits: int, block_size: int = 64, double_quant: bool = True) -> Quantizer:
    """W (out, in) → (dequantised Q (out, in) fp32, storage: an NF4Tensor for 4 bits, else None)."""
    _check_bits(bits)
    if bits == 4:

        def nf4(w: torch.Tensor) -> tuple[torch.Tensor, Any]:
            q = quantize_nf4(w.float(), block_size=block_size, double_quant=double_quant)
            return q.dequantize(torch.float32), q

        return nf4
    if bits == 2:
        return lambda w: (_blockwise_nf2(w, block_size), None)
    return lambda w: (_rowwise_int8(w), None)


def quantize_dequantize(weight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Q = dequantise(quantise(W)) for a weight (out, in) at 2, 4 (NF4) or 8 bits, as fp32."""
    return _quantizer(bits)(weight)[0]


# -- the algorithm ----------------------------------------------------------------------------


@dataclass
class LoftQResult:
    """Outcome of :func:`loftq_decompose` for one weight W (out, in).

    ``q``: dequantised Q (out, in) fp32; ``storage``: the NF4Tensor holding Q (4 bits) or
    None; ``a`` (r, in), ``b`` (out, r) fp32 with Q + s·B A ≈ W; ``qlora_error`` = ‖W − Q_1‖_F;
    ``errors[t]`` = ‖W − (Q_t + s·B_t A_t)‖_F after step t + 1; ``weight_norm`` = ‖W‖_F.
    """

    q: torch.Tensor
    storage: Any
    a: torch.Tensor
    b: torch.Tensor
    weight_norm: float
    qlora_error: float
    errors: list[float]


def _low_rank(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B A = the best rank-``rank`` approximation of ``residual`` (out, in)."""
    u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
    k = min(rank, sv.numel())
    root = (sv[:k] / scaling).sqrt()  # split √(S/s) between the factors
    b = u[:, :k] * root  # (out, k)
    a = root[:, None] * vh[:k]  # (k, in)
    if k < rank:  # rank above min(out, in): pad with zero directions, keep the asked shape
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    bits: int = 4,
    num_iter: int = 1,
    quantizer: Quantizer | None = None,
) -> LoftQResult:
    """Run LoftQ on one weight W (out, in): T = ``num_iter`` alternating steps.

    ``scaling`` is the LoRA scaling s of the layer that will use the factors. ``quantizer``
    overrides the ``bits`` default (it maps W to (dequantised Q, storage)).
    """
    if weight.dim() != 2:
        raise ValueError(f"LoftQ works on 2-D weights (out, in), got shape {tuple(weight.shape)}.")
    if not weight.is_floating_point():
        raise TypeError(f"LoftQ needs a floating-point weight, got {weight.dtype}.")
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r} must be an integer ≥ 1.")
    if scaling <= 0:
        raise ValueError(f"scaling={scaling!r} must be positive (it is the LoRA scaling alpha / r).")
    quantize = quantizer or _quantizer(bits)
    w = weight.detach().float()
    target = w
    errors: list[float] = []
    qlora_error = 0.0
    for step in range(num_iter):
        q, storage = quantize(target)
        residual = w - q
        if step == 0:
            qlora_error = float(torch.linalg.matrix_norm(residual))
        a, b = _low_rank(residual, rank, scaling)
        lowrank = (b @ a) * scaling
        errors.append(float(torch.linalg.matrix_norm(residual - lowrank)))
        target = w - lowrank
    return LoftQResult(q, storage, a, b, float(torch.linalg.matrix_norm(w)), qlora_error, errors)


# -- reports ------------------------------------------------------------------------------


@dataclass
class LoftQLayerError:
    """Frobenius errors of one layer: ‖W‖, ‖W − Q‖ (QLoRA's start), ‖W − (Q + s·BA)‖ (LoftQ's start)."""

    path: str
    weight_norm: float
    qlora_error: float
    loftq_error: float
    iter_errors: list[float] = field(default_factory=list)

    @property
    def qlora_relative(self) -> float:
        return self.qlora_error / self.weight_norm if self.weight_norm else 0.0

    @property
    def loftq_relative(self) -> float:
        return self.loftq_error / self.weight_norm if self.weight_norm else 0.0


@dataclass
class LoftQReport:
    """Per-layer and total LoftQ errors; ``print(report)`` shows the table.

    Totals are Frobenius norms over all layers together: √Σ‖·‖².
    """

    bits: int
    num_iter: int
    layers: list[LoftQLayerError] = field(default_factory=list)

    @property
    def weight_norm(self) -> float:
        return math.sqrt(sum(e.weight_norm**2 for e in self.layers))

    @property
    def qlora_error(self) -> float:
        return math.sqrt(sum(e.qlora_error**2 for e in self.layers))

    @property
    def loftq_error(self) -> float:
        return math.sqrt(sum(e.loftq_error**2 for e in self.layers))

    @property
    def qlora_relative(self) -> float:
        return self.qlora_error / self.weight_norm if self.layers else 0.0

    @property
    def loftq_relative(self) -> float:
        return self.loftq_error / self.weight_norm if self.layers else 0.0

    def table(self) -> str:
        rows: list[tuple[str, ...]] = [
            ("layer", "‖W‖", "‖W−Q‖ (QLoRA)", "‖W−Q−sBA‖ (LoftQ)", "rel. QLoRA", "rel. LoftQ")
        ]
        for e in [*self.layers, None]:
            if e is None:
                vals = ("total", self.weight_norm, self.qlora_error, self.loftq_error)
                rel = (self.qlora_relative, self.loftq_relative)
            else:
                vals = (e.path, e.weight_norm, e.qlora_error, e.loftq_error)
                rel = (e.qlora_relative, e.loftq_relative)
            rows.append((str(vals[0]), *(f"{v:.4f}" for v in vals[1:]), *(f"{v:.4f}" for v in rel)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"LoftQ, {self.bits} bits, {self.num_iter} step(s)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _record(layer: Linear, adapter_name: str, err: LoftQLayerError) -> None:
    # Kept on the layer (outside the state dict) so that loftq_report() can collect it.
    store: dict[str, LoftQLayerError] = layer.__dict__.setdefault("loftq_errors", {})
    store[adapter_name] = err


def loftq_report(peft_model: Any, adapter_name: str | None = None) -> LoftQReport:
    """The errors recorded when adapter ``adapter_name`` (default: the active one) was LoftQ-initialised."""
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config.get(name)
    settings = _settings_of(config) if config is not None else None
    layers = [
        m.__dict__["loftq_errors"][name]
        for m in peft_model.get_base_model().modules()
        if isinstance(m, Linear) and name in m.__dict__.get("loftq_errors", {})
    ]
    if not layers:
        raise ValueError(
            f"Adapter {name!r} was not initialised with LoftQ in this session (init_lora_weights='loftq' or "
            "loftq_initialize()); there is nothing to report."
        )
    bits, iters = (settings.loftq_bits, settings.loftq_iter) if settings else (4, len(layers[0].iter_errors))
    return LoftQReport(bits, iters, layers)


def _settings_of(config: Any) -> LoftQConfig | None:
    raw = getattr(config, "loftq_config", None)
    if raw is None or (isinstance(raw, Mapping) and not raw):
        return None
    return LoftQConfig.coerce(raw)


# -- applying it to layers -----------------------------------------------------------------------


def _apply(layer: Linear, adapter_name: str, path: str, result: LoftQResult) -> None:
    """Write A, B into the adapter (factors in the adapter's dtype)."""
    a, b = layer.factors(adapter_name)
    with torch.no_grad():
        a.copy_(result.a.to(dtype=a.dtype, device=a.device))
        b.copy_(result.b.to(dtype=b.dtype, device=b.device))
    _record(
        layer,
        adapter_name,
        LoftQLayerError(path, result.weight_norm, result.qlora_error, result.errors[-1], result.errors),
    )


def _dense_weight_param(layer: Linear) -> torch.Tensor | None:
    w = getattr(layer.base_layer, "weight", None)
    if layer.quantized or not isinstance(w, torch.Tensor) or not w.is_floating_point():
        return None
    return w


_WARNED: set[int] = set()


def _init_hook(layer: Linear, adapter_name: str, config: LoraConfig, path: str) -> None:
    """``init_lora_weights="loftq"``: run LoftQ on a full-precision base (W → Q in place; A, B set)."""
    settings = LoftQConfig.coerce(config.loftq_config)
    w = _dense_weight_param(layer)
    if w is None:
        streamed = layer.base_layer.__dict__.pop("loftq_streamed", {})  # see loftq_into_4bit
        key = (layer.r[adapter_name], layer.scaling[adapter_name], settings.loftq_bits, settings.loftq_iter)
        if key in streamed:
            _apply(layer, adapter_name, path, streamed[key])
            return
        if id(config) not in _WARNED:  # once per config, not once per layer
            _WARNED.add(id(config))
            warnings.warn(
                f"init_lora_weights='loftq': {path!r} is already quantised ({type(layer.base_layer).__name__}), "
                "so its full-precision weight is gone and the adapter starts as plain QLoRA (B = 0). Call "
                "deltatune.quant.loftq_initialize(peft_model, original_weights=<state dict, model or "
                "safetensors path>) to run LoftQ with the original weights, or apply LoftQ to the "
                "full-precision model (it quantises the weights itself).",
                stacklevel=4,
            )
        return
    if w.is_meta:
        raise ValueError(
            f"LoftQ needs real weights, but {path!r} is on the meta device; load the weights first."
        )
    transposed = layer.fan_in_fan_out  # GPT-2 Conv1D stores (in, out)
    dense = w.T if transposed else w
    result = loftq_decompose(
        dense, layer.r[adapter_name], layer.scaling[adapter_name], settings.loftq_bits, settings.loftq_iter
    )
    with torch.no_grad():
        w.copy_((result.q.T if transposed else result.q).to(w.dtype))
    _apply(layer, adapter_name, path, result)


LORA_INIT_FNS["loftq"] = _init_hook


@torch.no_grad()
def loftq_into_4bit(
    layer: Linear4bit, weight: torch.Tensor, rank: int, scaling: float, num_iter: int
) -> None:
    """LoftQ for one weight W (out, in) of a model being loaded into 4 bits (``load_quantized``).

    ``layer``'s codes become LoftQ's Q, and A, B are kept on it until an adapter with the same
    rank, scaling and settings is created with ``init_lora_weights="loftq"``: the values
    ``loftq_initialize`` gives on the quantised model. W itself is not kept."""
    quantizer = _quantizer(4, layer.block_size, layer.double_quant)
    result = loftq_decompose(weight, rank, scaling, 4, num_iter, quantizer)
    q: NF4Tensor = result.storage
    layer.weight_packed, layer.weight_absmax = q.packed, q.absmax
    layer.weight_absmax_scale, layer.weight_absmax_offset = q.absmax_scale, q.absmax_offset
    result.q, result.storage = torch.empty(0), None  # only A, B and the errors are kept
    layer.__dict__["loftq_streamed"] = {(rank, scaling, 4, num_iter): result}


def _load_original(original: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(original, nn.Module):
        return original.state_dict()
    if isinstance(original, Mapping):
        return original
    if isinstance(original, (str, os.PathLike)):
        from safetensors.torch import load_file

        path = os.fspath(original)
        files = (
            sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if os.path.isdir(path)
            else [path]
        )
        if not files:
            raise FileNotFoundError(
                f"No .safetensors files in {path!r}; pass the folder of the original model."
            )
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(f))
        return out
    raise TypeError(
        "original_weights must be a state dict (name → tensor), an nn.Module holding the original weights, or a "
        f"safetensors file/folder path; got {type(original).__name__}."
    )


def _find_weight(weights: Mapping[str, torch.Tensor], path: str) -> torch.Tensor | None:
    """The original weight of module ``path``: key ``<path>.weight``, allowing a differing prefix
    (``bert.encoder...`` vs ``encoder...``), but only when the match is unique."""
    want = path + ".weight"
    if want in weights:
        return weights[want]
    hits = [k for k in weights if k.endswith("." + want) or want.endswith("." + k)]
    if len(hits) > 1:
        raise ValueError(
            f"original_weights has several candidates for {path!r}: {hits[:4]}; pass exact keys."
        )
    return weights[hits[0]] if hits else None


@torch.no_grad()
def loftq_initialize(
    peft_model: Any,
    original_weights: Any,
    adapter_name: str | None = None,
    loftq_config: LoftQConfig | Mapping[str, int] | None = None,
) -> LoftQReport:
    """(Re-)initialise a LoRA adapter with LoftQ from the original full-precision weights.

    For a model that is already quantised (or whose dense weights you replaced). For every
    LoRA layer of the adapter:

    - deltatune ``Linear4bit`` base: T alternating steps; the layer's NF4 codes are replaced
      by LoftQ's Q (same block size and double quantisation), A and B are set. Needs
      ``loftq_bits=4``.
    - bitsandbytes 4/8-bit base: its stored Q is kept; A, B = rank-r SVD of (W − Q) / s.
    - dense base: W in the layer is replaced by Q as with ``init_lora_weights="loftq"``.

    Args:
        original_weights: the original model's state dict (keys ``<module path>.weight``;
            a different prefix such as ``bert.`` is matched), the original ``nn.Module``,
            or a safetensors file or folder.
        loftq_config: bits and steps; default: the adapter config's ``loftq_config``, else
            ``LoftQConfig()`` (4 bits, 1 step).

    Returns:
        A :class:`LoftQReport` (also available later from :func:`loftq_report`).
    """
    from deltatune.quant.qlora import dequantize_weight, is_quantized_linear

    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {name!r}; this model has {list(peft_model.peft_config)}.")
    settings = (
        LoftQConfig.coerce(loftq_config)
        if loftq_config is not None
        else (_settings_of(peft_model.peft_config[name]) or LoftQConfig())
    )
    weights = _load_original(original_weights)
    report = LoftQReport(settings.loftq_bits, settings.loftq_iter)
    layers = [
        (p, m)
        for p, m in peft_model.get_base_model().named_modules()
        if isinstance(m, Linear) and name in m.lora_A
    ]
    if not layers:
        raise ValueError(f"Adapter {name!r} has no LoRA linear layers to initialise.")
    for path, layer in layers:
        w = _find_weight(weights, path)
        if w is None:
            raise ValueError(
                f"original_weights has no weight for {path!r} (looked for key {path + '.weight'!r}, with any prefix)."
            )
        base = layer.base_layer
        expected = (
            (layer.in_features, layer.out_features)
            if layer.fan_in_fan_out
            else (layer.out_features, layer.in_features)
        )
        if tuple(w.shape) != expected:
            raise ValueError(
                f"original weight for {path!r} has shape {tuple(w.shape)}, the layer expects {expected}."
            )
        r, s = layer.r[name], layer.scaling[name]
        if isinstance(base, Linear4bit):
            if settings.loftq_bits != 4:
                raise ValueError(
                    f"{path!r} stores its weight in NF4 (4 bits); loftq_bits={settings.loftq_bits} cannot be stored "
                    "there. Use loftq_bits=4, or run LoftQ on the full-precision model."
                )
            quantizer = _quantizer(4, base.block_size, base.double_quant)
            result = loftq_decompose(w.to(base.weight_packed.device), r, s, 4, settings.loftq_iter, quantizer)
            q: NF4Tensor = result.storage
            base.weight_packed = q.packed
            base.weight_absmax = q.absmax
            base.weight_absmax_scale = q.absmax_scale
            base.weight_absmax_offset = q.absmax_offset
        elif is_quantized_linear(base):
            fixed = dequantize_weight(base, torch.float32)

            def stored(_: torch.Tensor, q_fixed: torch.Tensor = fixed) -> tuple[torch.Tensor, Any]:
                return q_fixed, None  # bitsandbytes' Q is kept: only the factors are fitted

            result = loftq_decompose(w.to(fixed.device), r, s, num_iter=1, quantizer=stored)
        else:
            dense = _dense_weight_param(layer)
            assert dense is not None
            result = loftq_decompose(
                (w.T if layer.fan_in_fan_out else w).to(dense.device),
                r,
                s,
                settings.loftq_bits,
                settings.loftq_iter,
            )
            dense.copy_((result.q.T if layer.fan_in_fan_out else result.q).to(dense.dtype))
        _apply(layer, name, path, result)
        layer.reset_caches()  # the base changed: cached row norms are stale
        if layer.use_dora.get(name):  # DoRA's magnitude starts at the row norms of the new Q + s·BA
            layer.lora_magnitude_vector[name].copy_(row_norm(layer, name))
        report.layers.append(layer.__dict__["loftq_errors"][name])
    return report
