"""AdapterHub (``adapters`` / ``adapter-transformers``) bottleneck adapter folders.

``model.save_adapter(dir, name)`` writes ``adapter_config.json`` (``{"config": {...BnConfig...},
"model_type": ..., "name": ..., "version": "adapters.x"}``, no ``peft_type``) and the weights as
``adapter.safetensors`` or ``pytorch_adapter.bin`` (a pickle), keyed like
``encoder.layer.0.attention.output.adapters.<name>.adapter_down.0.weight`` (BERT, RoBERTa, XLM-RoBERTa) or
``layers.0.output_adapters.adapters.<name>.adapter_up.weight`` (Llama). This module turns such a
folder into a :class:`~deltatune.methods.bottleneck.BottleneckConfig` and deltatune's saved keys
(``<sub-layer>.bottleneck.down.weight``). A setting deltatune cannot compute is refused with an
error naming the field, never loaded half right.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltatune.config import PeftConfig, config_from_dict
from deltatune.io import CONFIG_NAME, load_pickled_tensors, open_snapshot, parse_json_object, tensor_shapes

SAFETENSORS_NAME = "adapter.safetensors"
PICKLE_NAME = "pytorch_adapter.bin"
HEAD_CONFIG_NAME = "head_config.json"  # written beside the adapter by save_adapter(..., with_head=True)

# AdapterHub's module (relative to a numbered block) → deltatune's bottleneck site, per model type.
_BERT = {"attention.output": "attention.output", "output": "output"}
_DECODER = {"attention_adapters": "self_attn", "output_adapters": "mlp"}
LOCATIONS: dict[str, dict[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "llama": _DECODER,
    "mistral": _DECODER,
    "gpt2": {"attention_adapters": "attn", "output_adapters": "mlp"},
}

# BnConfig fields carried over under the same name.
_SAME = (
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
    "adapter_residual_before_ln",
    "ln_before",
    "ln_after",
    "scaling",
    "dropout",
    "leave_out",
)
# Fields that change nothing once the weights exist (initialisation), or describe the layout.
_IGNORED = {
    "architecture",
    "init_weights",
    "init_weights_seed",
    "mh_adapter",
    "output_adapter",
    "is_parallel",
}
_KNOWN = {*_SAME, *_IGNORED, "reduction_factor", "inv_adapter_reduction_factor"}
# Features deltatune does not compute: refused when switched on.
_REFUSED = {
    "use_gating": "a gate that weighs the adapter's output (UniPELT)",
    "phm_layer": "PHM (Compacter) projections",
    "inv_adapter": "invertible adapters on the embeddings",
    "cross_adapter": "adapters after cross-attention",
    "stochastic_depth": "stochastic depth (DropPath) on the adapter's output",
}
# Settings of the refused features: irrelevant while the feature is off.
_FEATURE_SETTINGS = re.compile(
    r"^(phm_.*|.*_phm(_rule)?|factorized_phm_.*|hypercomplex_nonlinearity|learn_phm)$"
)

_KEY = re.compile(r"^(?P<block>(?:.*\.)?\d+)\.(?P<loc>.+?)\.adapters\.(?P<name>[^.]+)\.(?P<rest>.+)$")


def _read_json(directory: str | os.PathLike[str]) -> Any:
    # Read as untrusted input (a regular file inside the folder, bounded size and depth).
    try:
        text = open_snapshot(os.fspath(directory), weights=False).config_text
        return None if text is None else parse_json_object(text, os.path.join(directory, CONFIG_NAME))
    except (OSError, ValueError):
        return None  # not ours to judge: the regular reader reports a broken config


def is_adapterhub_folder(directory: str | os.PathLike[str]) -> bool:
    """An ``adapter_config.json`` without ``peft_type`` whose ``config`` is AdapterHub's."""
    data = _read_json(directory)
    return isinstance(data, dict) and "peft_type" not in data and isinstance(data.get("config"), dict)


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"This AdapterHub adapter sets {field}={value!r} ({why}), which deltatune's bottleneck adapters do "
        "not compute; loading it without that would give different outputs, so it is not loaded. "
        "Use AdapterHub's `adapters` library for this adapter."
    )


def bottleneck_fields(ah: dict[str, Any]) -> dict[str, Any]:
    """AdapterHub's ``BnConfig`` dict → BottleneckConfig fields, or a ValueError naming the field."""
    arch = ah.get("architecture", "bottleneck")
    if arch not in (None, "bottleneck"):
        raise ValueError(
            f"This AdapterHub adapter has architecture={arch!r}; deltatune reads AdapterHub's bottleneck "
            "adapters only (SeqBnConfig, DoubleSeqBnConfig, ParBnConfig and their variations)."
        )
    for key, value in ah.items():
        if key in _REFUSED:
            if value not in (None, False, 0, 0.0):
                raise _refuse(key, value, _REFUSED[key])
        elif (
            key not in _KNOWN and not _FEATURE_SETTINGS.match(key) and value not in (None, False, [], {}, "")
        ):
            raise _refuse(key, value, "a setting deltatune does not know")
    mh, out, par = bool(ah.get("mh_adapter")), bool(ah.get("output_adapter")), bool(ah.get("is_parallel"))
    if par and not mh and out:
        placement = "parallel"
    elif not par and mh and out:
        placement = "houlsby"
    elif not par and not mh and out:
        placement = "pfeiffer"
    else:
        raise _refuse(
            "mh_adapter/output_adapter/is_parallel",
            (mh, out, par),
            "a layout with no deltatune placement; those are houlsby (True, True, False), "
            "pfeiffer (False, True, False) and parallel (False, True, True)",
        )
    fields: dict[str, Any] = {"placement": placement}
    factor = ah.get("reduction_factor", 16)
    if isinstance(factor, dict):
        values = set(factor.values())
        if len(values) != 1:
            raise _refuse("reduction_factor", factor, "a different bottleneck size per layer")
        factor = values.pop()
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(
            f"This AdapterHub adapter has reduction_factor={factor!r}; expected a positive number."
        )
    fields["reduction_factor"] = float(factor)
    for key in _SAME:
        if key in ah:
            fields[key] = ah[key]
    if fields.get("leave_out") == []:
        fields["leave_out"] = None
    return fields


def _load_weights(
    directory: str | os.PathLike[str], allow_pickle: bool, device: str
) -> dict[str, torch.Tensor]:
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path, device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{st_path} is corrupt or truncated and cannot be read ({exc}).") from exc
    bin_path = os.path.join(directory, PICKLE_NAME)
    if not os.path.isfile(bin_path):
        raise FileNotFoundError(
            f"{os.fspath(directory)!r} holds an AdapterHub adapter_config.json but neither {SAFETENSORS_NAME} "
            f"nor {PICKLE_NAME}: the adapter's weights are missing."
        )
    if not allow_pickle:
        raise ValueError(
            f"{os.fspath(directory)!r} holds only {PICKLE_NAME}, a pickle file, which can run code when loaded. "
            "deltatune loads safetensors only. If you trust this file, pass allow_pickle=True (it is then loaded "
            "with torch.load(weights_only=True)), or save the adapter again with AdapterHub's "
            "save_adapter(..., use_safetensors=True)."
        )
    return load_pickled_tensors(bin_path, device, "as AdapterHub's save_adapter writes")


def _part(rest: str, ln_before: bool) -> str | None:
    """AdapterHub's name inside one adapter → deltatune's BottleneckBlock name (None: a duplicate)."""
    head, _, leaf = rest.rpartition(".")
    if rest == "scaling":
        return "scale"
    names = {
        "adapter_up": "up",
        "adapter_norm_before": "layer_norm",
        "adapter_norm_after": "layer_norm_after",
    }
    if (
        ln_before
    ):  # adapter_down = Sequential(LayerNorm (also registered as adapter_norm_before), Linear, act)
        names.update({"adapter_down.0": "", "adapter_down.1": "down"})
    else:  # adapter_down = Sequential(Linear, act)
        names["adapter_down.0"] = "down"
    if head not in names or leaf not in ("weight", "bias"):
        return None if head == "adapter_down.0" else f"?{rest}"
    return f"{names[head]}.{leaf}" if names[head] else None


def convert_state(
    state: dict[str, torch.Tensor], model_type: str, ln_before: bool
) -> dict[str, torch.Tensor]:
    """AdapterHub keys → deltatune's saved keys (``<block>.<site>.bottleneck.<part>``)."""
    if model_type not in LOCATIONS:
        raise ValueError(
            f"This AdapterHub adapter was saved from a {model_type!r} model; deltatune maps AdapterHub's "
            f"bottleneck weights for {sorted(LOCATIONS)}."
        )
    sites = LOCATIONS[model_type]
    out: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    for key, value in state.items():
        m = _KEY.match(key)
        part = _part(m["rest"], ln_before) if m else None
        if m is None or m["loc"] not in sites or (part is not None and part.startswith("?")):
            raise ValueError(
                f"The AdapterHub weights hold {key!r}, which is not part of a bottleneck adapter deltatune "
                f"knows (expected <block>.{{{', '.join(sites)}}}.adapters.<name>.adapter_down/adapter_up...). "
                "Heads and other adapter types are not read; save the adapter without them."
            )
        names.add(m["name"])
        if part is None:  # the input LayerNorm's second registration: must equal the first
            twin = (
                f"{m['block']}.{m['loc']}.adapters.{m['name']}.adapter_norm_before.{key.rpartition('.')[2]}"
            )
            if twin in state and not torch.equal(state[twin], value):
                raise ValueError(
                    f"{key!r} and {twin!r} should be one LayerNorm but differ; the file is corrupt."
                )
            if twin in state:
                continue
            part = f"layer_norm.{key.rpartition('.')[2]}"
        out[f"{m['block']}.{sites[m['loc']]}.bottleneck.{part}"] = value
    if len(names) > 1:
        raise ValueError(
            f"The AdapterHub weights hold several adapters {sorted(names)}; save them one per folder."
        )
    return out


def read_adapterhub(
    directory: str | os.PathLike[str], allow_pickle: bool = False, device: str = "cpu"
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """(BottleneckConfig, weights under deltatune's saved keys) of an AdapterHub adapter folder."""
    data = _read_json(directory)
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{os.fspath(directory)!r} is not an AdapterHub adapter folder.")
    fields = bottleneck_fields(data["config"])
    config = config_from_dict({"peft_type": "BOTTLENECK", **fields})
    state = _load_weights(directory, allow_pickle, device)
    if os.path.isfile(os.path.join(directory, HEAD_CONFIG_NAME)):
        warnings.warn(
            f"{os.fspath(directory)!r} also holds an AdapterHub prediction head ({HEAD_CONFIG_NAME}); deltatune "
            "loads the bottleneck adapter only. Give the base model its task head yourself.",
            stacklevel=4,
        )
    model_type = str(data.get("model_type") or "")
    return config, convert_state(state, model_type, bool(fields.get("ln_before")))


def describe_adapterhub(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``deltatune inspect`` shows of an AdapterHub folder, without unpickling anything."""
    data = _read_json(directory)
    assert isinstance(data, dict)
    try:
        fields: dict[str, Any] | None = bottleneck_fields(data["config"])
        problem = None
    except ValueError as exc:
        fields, problem = None, str(exc)
    shapes: dict[str, list[int]] = {}
    weights = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(weights):
        weights = os.path.join(directory, PICKLE_NAME)
    elif os.path.isfile(weights):
        try:
            shapes = tensor_shapes(weights)
        except Exception as exc:  # safetensors raises SafetensorError or OSError for a damaged file
            problem = problem or f"{weights} is corrupt or truncated ({exc})"
    # The input LayerNorm is registered twice (adapter_down.0 and adapter_norm_before): count it once.
    ln_before = bool(fields and fields.get("ln_before"))
    counted = {k: s for k, s in shapes.items() if not (ln_before and ".adapter_down.0." in k)}
    n = 0
    for shape in counted.values():
        size = 1
        for d in shape:
            size *= d
        n += size
    placement = fields["placement"] if fields else "?"
    return {
        "method": f"BOTTLENECK (AdapterHub {data.get('version', '')}, placement={placement})",
        "task_type": None,
        "base_model": data.get("model_name") or data.get("model_class"),
        "target_modules": None,
        "modules_to_save": None,
        "parameters": n,
        "tensors": len(counted),
        "file_bytes": os.path.getsize(weights) if os.path.isfile(weights) else 0,
        "config": {
            **(fields or {}),
            "adapterhub_config": data["config"],
            "model_type": data.get("model_type"),
        },
        "shapes": shapes,
        "format": "adapterhub",
        "weights_file": os.path.basename(weights),
        "loadable": problem is None,
        "problem": problem,
        "note": (
            f"weights in {PICKLE_NAME}, a pickle: not opened (load with allow_pickle=True if you trust it)"
            if weights.endswith(PICKLE_NAME) and os.path.isfile(weights)
            else None
        ),
    }
