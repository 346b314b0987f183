"""QLoRA: LoRA and DoRA over a frozen quantised base, and merging with the error reported.

Adapters on a 4-bit base are ordinary LoRA adapters (same modules, same saved keys), so
an adapter trained on a 4-bit base loads on the 16/32-bit base and the other way round.
What differs is the base weight, which is never a dense tensor at rest::

    q_proj                        lora.Linear
    ├── base_layer                Linear4bit (deltatune) / bnb Linear4bit / bnb Linear8bitLt
    ├── lora_A {name: Linear}     (r, in), fp32
    └── lora_B {name: Linear}     (out, r), fp32

- forward: ``base_layer(x) + s·B A x``; the base dequantises one layer at a time.
- DoRA needs row norms of the dense weight: ``lora.Linear.base_weight()`` dequantises
  on demand (‖W_i‖² is cached per weight version).
- ``merge_adapter()`` cannot add s·BA into 4-bit codes without changing the model's
  output, so it raises and points to :func:`merge_quantized`, which dequantises, merges
  exactly in a dense copy, optionally re-quantises, and reports the output error
  per layer and for the whole model on a probe batch.

bitsandbytes layers are supported when bitsandbytes is imported (as it is after
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``).

How: this file registers the quantised layer types with ``stored_weights.register_stored_weight``; a LoRA
``Linear`` asks that registry on every call, so the same class serves dense and quantised
bases, and a base swapped later (``quantize_model`` on an adapted model, or
:func:`merge_quantized` putting a dense base back) needs nothing else. (IA)³ layers
(methods/ia3.py) run over the same bases and merge through :func:`merge_quantized` too.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.methods.base import AdapterLayer, replace_module
from deltatune.quant.nf4 import Linear4bit
from deltatune.stored_weights import (
    StoredWeight,
    adapter_dtype,
    quantized_merge_error,
    register_stored_weight,
)

__all__ = [
    "LayerMergeError",
    "MergeReport",
    "adapter_tensor_factory",
    "dequantize_weight",
    "is_quantized_linear",
    "merge_quantized",
    "to_dense_linear",
]


# -- quantised base layers -------------------------------------------------------------------


def _bnb_types() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")  # only if the user already imported it
    return () if bnb is None else (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """A deltatune ``Linear4bit`` or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``."""
    return isinstance(module, (Linear4bit, *_bnb_types()))


def _logical_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the quantised weight stands for (that of the original dense weight)."""
    if isinstance(module, Linear4bit):
        return module.weight_dtype
    state = getattr(module.weight, "quant_state", None)
    if state is not None:  # bnb 4-bit (its CPU eval repacking keeps the true dtype in original_dtype)
        packed = getattr(state, "packing_format_for_cpu", False)
        return state.original_dtype if packed else state.dtype  # type: ignore[no-any-return]
    w: Any = module.weight
    return w.dtype if w.is_floating_point() else torch.float32  # type: ignore[no-any-return]


def _dequantize_cpu_packed(w: Any) -> torch.Tensor:
    """A bitsandbytes 4-bit weight that bitsandbytes' CPU inference path repacked at its first
    eval-mode forward, which also rounded the absmax to bf16 (up to 2^-8 relative) and stored it
    transposed, (blocks per row, out). The codes are unpacked by bitsandbytes' inverse on copies
    (the layer keeps its packed form); the absmax is read back in row-major block order (the
    inverse leaves it transposed, which scrambles rows of more than one block)."""
    import bitsandbytes.functional as bnbf

    packed = w.quant_state
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(packed))
    state = bnbf.QuantState(
        absmax=packed.absmax.T.reshape(-1).float(),
        shape=packed.shape,
        code=packed.code,
        blocksize=packed.blocksize,
        quant_type=packed.quant_type,
        dtype=packed.original_dtype,
    )
    return bnbf.dequantize_4bit(codes, state)


def dequantize_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (out, in) of a quantised linear layer, in ``dtype`` (default: its logical dtype)."""
    dtype = dtype or _logical_dtype(module)
    if isinstance(module, Linear4bit):
        return module.dequantize(dtype)
    bnb_types = _bnb_types()
    if bnb_types and isinstance(module, bnb_types):
        import bitsandbytes.functional as bnbf

        w: Any = module.weight
        if getattr(w, "quant_state", None) is not None:  # 4-bit: codes + QuantState
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                return _dequantize_cpu_packed(w).to(dtype)
            return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
        scb = getattr(w, "SCB", None)
        if scb is None:  # after its first forward, a Linear8bitLt keeps the row scales in .state
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if w.dtype == torch.int8 and scb is not None:  # 8-bit: int8 rows + one fp32 scale per row
            return bnbf.int8_vectorwise_dequant(w.data, scb).to(dtype)
        if w.is_floating_point():  # bnb layer not quantised yet (still on its way to a device)
            return w.data.to(dtype)  # type: ignore[no-any-return]
    raise TypeError(
        f"dequantize_weight expects a deltatune Linear4bit or a bitsandbytes Linear4bit/Linear8bitLt, "
        f"got {type(module).__name__}."
    )


def _storage_key(module: nn.Module) -> tuple[Any, ...]:
    """Identifies the stored (quantised) weight and its version: a cache key for derived values."""
    t = module.weight_packed if isinstance(module, Linear4bit) else module.weight
    assert isinstance(t, torch.Tensor)
    return (t.data_ptr(), t._version, t.device)


def adapter_tensor_factory(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` for new adapter tensors beside a quantised layer: the device of its
    codes, and the dtype of the weight they stand for (fp32 when that is fp16/bf16)."""
    w = module.weight_packed if isinstance(module, Linear4bit) else module.weight
    device = w.device if isinstance(w, torch.Tensor) else None
    return {"device": device, "dtype": adapter_dtype(_logical_dtype(module))}


def to_dense_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` with the dequantised weight (out, in) and the bias of a quantised layer."""
    w = dequantize_weight(module, dtype)
    bias = getattr(module, "bias", None)
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(w.dtype).clone(), requires_grad=False)
    return out


def _requantize_like(dense: nn.Linear, original: nn.Module, path: str) -> Linear4bit:
    """NF4-quantise ``dense`` with the block size / double quantisation of ``original``."""
    if isinstance(original, Linear4bit):
        return Linear4bit.from_linear(
            dense, original.block_size, original.double_quant, original.compute_dtype
        )
    state = getattr(getattr(original, "weight", None), "quant_state", None)
    if state is None:
        raise ValueError(
            f"requantize=True: {path!r} is an 8-bit bitsandbytes layer, and deltatune re-quantises to NF4 "
            "only. Use requantize=False (dense merged weights), or quantise the merged model to 8 bits with "
            "bitsandbytes yourself."
        )
    if state.quant_type != "nf4":
        raise ValueError(
            f"requantize=True: {path!r} is a bitsandbytes {state.quant_type!r} layer; deltatune re-quantises "
            "to NF4 only. Use requantize=False, or re-quantise with bitsandbytes."
        )
    compute = getattr(original, "compute_dtype", None)
    return Linear4bit.from_linear(dense, state.blocksize, state.nested, compute)


# -- the LoRA layer --------------------------------------------------------------------------


def _lora_merge_error(adapter_name: str, base: nn.Module) -> str:
    return quantized_merge_error(f"adapter {adapter_name!r}", base, "adding s·BA to")


# LoRA / DoRA layers over any of these read the dense weight through dequantize_weight (one
# layer at a time, for DoRA's row norms) and refuse an in-place merge.
register_stored_weight(
    StoredWeight(
        name="4-bit / 8-bit quantised linear",
        accepts=is_quantized_linear,
        dense=dequantize_weight,
        version=_storage_key,
        factory=adapter_tensor_factory,
        merge_error=_lora_merge_error,
        types=(Linear4bit,),
    )
)


# -- merging into a quantised base -------------------------------------------------------------


@dataclass
class LayerMergeError:
    """Output error of one merged layer on the probe inputs of that layer.

    ``max_abs`` / ``mean_abs``: max and mean of |merged(x) - adapted(x)| over all output
    values; ``ref_mean_abs``: mean |adapted(x)|, for scale.
    """

    path: str
    max_abs: float
    mean_abs: float
    ref_mean_abs: float
    numel: int

    @property
    def rel_mean(self) -> float:
        return self.mean_abs / self.ref_mean_abs if self.ref_mean_abs else 0.0


@dataclass
class MergeReport:
    """How far the merged model is from the adapted (unmerged) model it replaces.

    ``layers``: one :class:`LayerMergeError` per merged quantised layer, each measured on
    that layer's own probe inputs (so errors do not compound). ``output_*``: the whole
    model's output (logits / last hidden state) on ``probe_inputs``; ``None`` when no model
    inputs were given (then every layer was probed with random N(0, 1) rows).
    """

    requantize: bool
    probe: str
    layers: list[LayerMergeError] = field(default_factory=list)
    output_max_abs: float | None = None
    output_mean_abs: float | None = None
    output_ref_mean_abs: float | None = None

    @property
    def max_abs(self) -> float:
        """Largest layer-output error over all merged layers."""
        return max((e.max_abs for e in self.layers), default=0.0)

    @property
    def mean_abs(self) -> float:
        """Mean layer-output error over all output values of all merged layers."""
        n = sum(e.numel for e in self.layers)
        return sum(e.mean_abs * e.numel for e in self.layers) / n if n else 0.0

    def table(self) -> str:
        mode = "re-quantised to NF4" if self.requantize else "dense (dequantised + ΔW)"
        rows = [("layer", "max |Δy|", "mean |Δy|", "mean |y|", "rel. mean")]
        rows += [
            (e.path, f"{e.max_abs:.3e}", f"{e.mean_abs:.3e}", f"{e.ref_mean_abs:.3e}", f"{e.rel_mean:.2e}")
            for e in self.layers
        ]
        ref = sum(e.ref_mean_abs * e.numel for e in self.layers) / max(1, sum(e.numel for e in self.layers))
        rows.append(
            (
                "all layers",
                f"{self.max_abs:.3e}",
                f"{self.mean_abs:.3e}",
                f"{ref:.3e}",
                f"{self.mean_abs / ref if ref else 0:.2e}",
            )
        )
        if self.output_max_abs is not None:
            o_ref = self.output_ref_mean_abs or 0.0
            rows.append(
                (
                    "model output",
                    f"{self.output_max_abs:.3e}",
                    f"{self.output_mean_abs:.3e}",
                    f"{o_ref:.3e}",
                    f"{(self.output_mean_abs or 0) / o_ref if o_ref else 0:.2e}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"Merge error ({mode}; probe: {self.probe})"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0 or i == len(self.layers):
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _model_output(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: logits, else last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    values = out.values() if isinstance(out, Mapping) else out
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"Cannot find an output tensor in the model's output of type {type(out).__name__}.")


def _run(model: nn.Module, probe: Any) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(probe, Mapping):
            return _model_output(model(**probe)).float()
        if isinstance(probe, torch.Tensor):
            return _model_output(model(probe)).float()
        raise TypeError(
            f"probe_inputs must be a tensor (e.g. input_ids) or a dict of model inputs, got {type(probe).__name__}."
        )


def _stats(diff: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    d = diff.abs()
    return float(d.max()), float(d.mean()), float(ref.abs().mean())


@contextmanager
def _bnb_4bit_kept(model: nn.Module) -> Iterator[None]:
    """Leave ``model``'s bitsandbytes 4-bit layers as they were after an eval-mode forward.

    On CPU, bitsandbytes' first eval-mode 4-bit forward repacks a layer's codes and rounds its
    absmax to bf16 in place, for good: its own inverse brings back the codes, not the fp32 absmax
    (up to 2^-8 relative error per block of weights). The codes and the quantisation state are put
    back as they were, so what is dequantised and merged afterwards is the stored weight.
    """
    kinds = _bnb_types()
    kept = []
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        packed = getattr(state, "packing_format_for_cpu", False)
        if kinds and isinstance(m, kinds[0]) and state is not None and not packed:
            kept.append((m.weight, m.weight.data, state, dict(vars(state))))
    try:
        yield
    finally:
        for weight, data, state, fields in kept:
            weight.data = data
            vars(state).clear()
            vars(state).update(fields)


@torch.no_grad()
def merge_quantized(
    peft_model: Any,
    requantize: bool = False,
    probe_inputs: Any = None,
    adapter_name: str | None = None,
    probe_rows: int = 64,
) -> tuple[nn.Module, MergeReport]:
    """Merge an adapter into a (partly) quantised base and report the error it makes.

    Every adapted layer whose base is quantised (deltatune ``Linear4bit``, bitsandbytes
    4-/8-bit) is dequantised into a dense ``nn.Linear`` and the adapter is merged into it
    exactly, by the method's own merge (LoRA, DoRA, (IA)³). Then:

    - ``requantize=False``: the merged layers stay dense (fp32/bf16: more memory, no
      added error beyond float rounding);
    - ``requantize=True``: they are quantised again to NF4 with the original block size
      and double quantisation (4-bit memory, adds a new quantisation error).

    Other adapted layers are merged as ``merge_and_unload()`` does. The error is measured
    against the adapted model as it was (quantised base + adapter, eval mode): each layer
    on the inputs it saw in a forward of ``probe_inputs`` (a tensor of input ids or a
    dict of model inputs), and the whole model's output on ``probe_inputs``. Without
    probe inputs, each layer gets ``probe_rows`` random N(0, 1) input rows and no
    whole-model figure is given.

    bitsandbytes 4-bit bases: the merged weight is bitsandbytes' own dequantised weight plus the
    update (the reference forwards leave the layers as stored). A model that already ran an
    eval-mode forward on a CPU with bf16 support was changed by bitsandbytes then: its absmax
    rounded to bf16, so each merged weight may be off by up to 2^-8 of its block's absmax.

    Returns:
        (the merged base model, a :class:`MergeReport`); ``peft_model`` is consumed, as by
        ``merge_and_unload()``. ``print(report)`` shows the table.
    """
    if adapter_name is not None:
        peft_model.set_adapter(adapter_name)
    name = peft_model.active_adapter
    if name is None:
        raise ValueError("No active adapter to merge; pass adapter_name=... .")
    base = peft_model.get_base_model()
    layers = [
        (path, m)
        for path, m in base.named_modules()
        if isinstance(m, AdapterLayer) and is_quantized_linear(m.base_layer) and name in m.adapter_names
    ]
    if not layers:
        raise ValueError(
            f"Adapter {name!r} sits on no quantised layer; merge it with peft_model.merge_and_unload() instead."
        )
    was_training = peft_model.training
    peft_model.eval()  # dropout off: the reference is what the adapted model computes at inference

    # 1. Reference: each layer's inputs and outputs (and the model output) with the adapter unmerged.
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in layers}
    outputs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in layers}
    ref_out = None
    if probe_inputs is not None:
        handles = []
        for path, layer in layers:

            def hook(_: nn.Module, args: tuple[Any, ...], out: torch.Tensor, path: str = path) -> None:
                inputs[path].append(args[0].detach().clone())
                outputs[path].append(out.detach().float().clone())

            handles.append(layer.register_forward_hook(hook))
        try:
            with _bnb_4bit_kept(peft_model):
                ref_out = _run(peft_model, probe_inputs)
        finally:
            for h in handles:
                h.remove()
        missing = [p for p, _ in layers if not inputs[p]]
        if missing:
            raise ValueError(
                f"probe_inputs never reached {missing[:3]}; give inputs that run the whole model."
            )
    else:
        gen = torch.Generator().manual_seed(0)
        for path, layer in layers:
            w_dtype = _logical_dtype(layer.base_layer)
            width = int(layer.in_features)  # type: ignore[arg-type]
            x = torch.randn(probe_rows, width, generator=gen).to(w_dtype)
            x = x.to(next((t.device for t in layer.parameters()), torch.device("cpu")))
            inputs[path].append(x)
            with _bnb_4bit_kept(layer):
                outputs[path].append(layer(x).float())

    # 2. Dense copies of the quantised bases, then the method's exact merge into them.
    originals = {path: layer.base_layer for path, layer in layers}
    for _, layer in layers:
        layer.base_layer = to_dense_linear(layer.base_layer)
    merged = peft_model.merge_and_unload(adapter_names=[name])
    if requantize:
        for path, original in originals.items():
            replace_module(merged, path, _requantize_like(merged.get_submodule(path), original, path))

    # 3. The error, layer by layer and for the whole model.
    report = MergeReport(
        requantize=requantize,
        probe="model inputs" if probe_inputs is not None else f"{probe_rows} random N(0,1) rows per layer",
    )
    for path, _ in layers:
        module = merged.get_submodule(path)
        ys = [module(x).float() for x in inputs[path]]
        diff = torch.cat([(y - r).flatten() for y, r in zip(ys, outputs[path])])
        ref = torch.cat([r.flatten() for r in outputs[path]])
        report.layers.append(LayerMergeError(path, *_stats(diff, ref), numel=ref.numel()))
    if probe_inputs is not None and ref_out is not None:
        merged.eval()
        with _bnb_4bit_kept(merged):  # the 4-bit layers left in the merged model stay as they were
            out = _run(merged, probe_inputs)
        report.output_max_abs, report.output_mean_abs, report.output_ref_mean_abs = _stats(
            out - ref_out, ref_out
        )
    merged.train(was_training)
    return merged, report
