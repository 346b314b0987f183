"""What LoRA configs name on transformers-5 mixture-of-experts models, as PEFT reads them.

transformers 5 fused the per-expert Linear layers of the Mixtral and Qwen2-MoE families into
stacked parameters (``w1``/``w3`` or ``gate_proj``/``up_proj`` -> ``gate_up_proj``, ``w2`` /
``down_proj`` -> ``down_proj``) and turned the router ``gate`` into a plain-weight module. Two
things follow, both done here as PEFT does them:

- a config's old names (and ``"all-linear"``) map onto ``target_parameters`` (:func:`convert_moe_targets`);
- an adapter file trained on the old layout gets its factors fused into the new one
  (:func:`convert_v4_state`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from deltatune.methods.lora_param import ParamLora, unwrapped_path
from deltatune.patterns import fullmatch

# transformers 5 fused the experts of these families into stacked parameters and turned the router
# into a plain-weight module. PEFT maps the names a config (or "all-linear") gives for the old
# per-expert Linear layers to the new parameters, so that a config means the same on both versions:
# old leaf name -> parameter name, per family (the family of a model type is transformers' own table).
MOE_RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
# Fused parameters and the old layers they concatenate: LoRA on the fused one gets rank and alpha
# times their number (the old adapters side by side), which keeps the scale alpha / r.
MOE_FUSED: dict[str, dict[str, list[str]]] = {
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


def moe_family(model: nn.Module) -> str | None:
    """ "mixtral" / "qwen2_moe" for a model whose experts transformers 5 fused from those layouts."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype is None:
        return None
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: experts are Linear layers, nothing to map
        return None
    family = "mixtral" if mtype == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(mtype)
    if family not in MOE_RENAMES or get_checkpoint_conversion_mapping(mtype) is None:
        return None
    return family


def convert_moe_targets(model: nn.Module, config: Any, all_linear_leaves: list[str]) -> None:
    """Map ``target_modules`` names of the old per-expert layers onto the fused parameters, in place.

    ``all_linear_leaves``: the leaf names of the model's linear layers (what "all-linear" names).
    A no-op for models of other families and for ``target_modules=None`` (the per-architecture
    default applies then).
    """
    family = moe_family(model)
    if family is None or config.target_modules is None:
        return
    renames, fused = MOE_RENAMES[family], MOE_FUSED[family]
    targets = config.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            targets = set(all_linear_leaves) | set(renames)
        else:
            targets = _regex_leaves(model, targets, renames)
            if not targets:
                return  # matches nothing: the usual error follows
    new_params = set(config.target_parameters or [])
    remaining: set[str] = set()
    hit: dict[str, set[str]] = {name: set() for name in fused}
    for target in targets:
        old = next((o for o in renames if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.add(target)
            continue
        new_params.add(renames[old])
        if renames[old] in fused:
            hit[renames[old]].add(old)
    for new, parts in fused.items():
        found = hit[new]
        if 0 < len(found) < len(parts):
            raise ValueError(
                f"target_modules names {sorted(found)} but not {sorted(set(parts) - found)}: in transformers 5 "
                f"they are fused into one parameter, {new!r}, which can only be adapted as a whole. Name all of "
                f"{parts} (or target_parameters=[{new!r}])."
            )
        if len(found) == len(parts) > 1:
            key = rf".*\.{re.escape(new)}"
            config.rank_pattern = {**config.rank_pattern, key: config.r * len(parts)}
            config.alpha_pattern = {**config.alpha_pattern, key: config.lora_alpha * len(parts)}
    config.target_parameters = sorted(new_params)
    config.target_modules = sorted(remaining)


def _regex_leaves(model: nn.Module, regex: str, renames: dict[str, str]) -> set[str]:
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    leaves = {k.rsplit(".", 1)[-1] for k in keys if k and fullmatch(regex, k)}  # RE2: linear time
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(owner)
    for old, new in renames.items():
        if old not in leaves and any(fullmatch(regex, f"{c}.{old}") for c in containers.get(new, ())):
            leaves.add(old)
    return leaves


# Adapters trained on transformers 4, where each expert was a Linear layer: keys such as
# ``layers.0.block_sparse_moe.experts.3.w1.lora_A.weight``. Their factors become the fused layout.
_V4_BLOCK = {"mixtral": (".block_sparse_moe.", ".mlp.")}
_V4_EXPERT_KEY = re.compile(
    r"^(?P<owner>.*\.experts)\.(?P<e>\d+)\.(?P<leaf>[A-Za-z0-9_]+)\.(?P<ab>lora_[AB])\.weight$"
)


def convert_v4_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers-4 MoE adapter's tensors, keyed and laid out for the fused experts.

    Per expert e, old layers fused into one parameter (w1 and w3 into gate_up_proj) concatenate
    their A along the rank, A_e = [A1_e; A3_e] (2r, in), and put their B block-diagonally,
    B_e = [[B1_e, 0], [0, B3_e]] (2·out, 2r): W'_e = [W1_e + B1_e A1_e; W3_e + B3_e A3_e], exact.
    Then the experts are stacked as in :class:`ParamLora` (A rows by expert, B columns expert-fastest).
    Keys of other layers pass through (renamed where transformers renamed their block).
    """
    family = moe_family(model)
    if family is None or not any(_V4_EXPERT_KEY.match(k) for k in state):
        return state
    old, new = _V4_BLOCK.get(family, ("", ""))
    renames, fused = MOE_RENAMES[family], MOE_FUSED[family]
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[str, dict[int, torch.Tensor]]] = {}
    for key, value in state.items():
        key = key.replace(old, new) if old else key
        m = _V4_EXPERT_KEY.match(key)
        if m is None or m["leaf"] not in renames:
            out[key] = value
            continue
        groups.setdefault((m["owner"], renames[m["leaf"]]), {}).setdefault(f"{m['leaf']}.{m['ab']}", {})[
            int(m["e"])
        ] = value
    wrappers = {
        (unwrapped_path(path), module.parameter_name): path
        for path, module in model.named_modules()
        if isinstance(module, ParamLora)
    }
    for (owner, param), parts in groups.items():
        path = wrappers.get((owner, param))
        if path is None:
            raise ValueError(
                f"The adapter file has per-expert tensors for {owner}.{param} (a transformers-4 layout), but this "
                f"model does not adapt {param!r}; its config's target_modules should name those layers."
            )
        leaves = fused.get(param, [next(o for o, n in renames.items() if n == param)])
        a_parts, b_parts = [], []
        for leaf in leaves:
            a, b = parts.get(f"{leaf}.lora_A"), parts.get(f"{leaf}.lora_B")
            if a is None or b is None:
                raise ValueError(
                    f"The adapter file lacks {owner}.<expert>.{leaf} LoRA tensors needed for {param}."
                )
            count = max(a) + 1
            a_parts.append(torch.stack([a[e] for e in range(count)]))  # (E, r, in)
            b_parts.append(torch.stack([b[e] for e in range(count)]))  # (E, out, r)
        a3 = torch.cat(a_parts, dim=1)  # (E, n·r, in)
        b3 = torch.stack([torch.block_diag(*(bp[e] for bp in b_parts)) for e in range(a3.shape[0])])
        out[f"{path}.lora_A.weight"] = a3.reshape(-1, a3.shape[-1])
        out[f"{path}.lora_B.weight"] = b3.permute(1, 2, 0).reshape(b3.shape[1], -1)
    return out
