"""Which modules a config hits.

``target_modules`` is a list of names (a module matches when its full path equals a name
or ends with ``.name``), a regex string (full match against the path), or ``"all-linear"``.
With no targets, a per-architecture default applies, and for architectures nobody listed,
every linear layer of the attention and MLP blocks (never the output head).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from deltatune.stored_weights import stored_weight, stored_weight_types

# The ecosystem's defaults: PEFT's table (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PEFT
# 0.21) in full, so that a config with no targets means the same thing here and there. A value is a
# list of module names or a regex string. The last entries are deltatune's own, for architectures
# PEFT has no default for (PEFT raises there); any architecture in neither gets the fallback below.
LORA_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # deltatune's additions (no PEFT default):
    "distilbert": ["q_lin", "v_lin"],
    "mbart": ["q_proj", "v_proj"],
}

# Layer index patterns for ``layers_to_transform`` (model.layers.3, transformer.h.3, ...).
DEFAULT_LAYERS_PATTERNS = ["layers", "h", "block", "blocks", "layer"]

# Heads that the fallback (no targets, unknown architecture) never targets: a linear layer whose
# own name is one of these. ("output" is no head name: BERT's blocks hold ``output.dense``.)
_HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out"}

# Task heads that ``all-linear`` leaves out of a sequence-classification model with no output
# embeddings: the first of these attributes the model has (PEFT's rule).
_SEQ_CLS_HEADS = ("score", "classifier")


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def linear_types() -> tuple[type, ...]:
    """Module types that count as 'linear' for ``all-linear`` and the fallback: ``nn.Linear``,
    GPT-2's ``Conv1D``, and the layer types of registered stored-weight families (4-bit layers)."""
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [nn.Linear, Conv1D, *stored_weight_types()]
    # bitsandbytes layers exist only if the user already imported it (importing it here is
    # slow and noisy on machines without its kernels).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def is_linear(module: nn.Module) -> bool:
    """A linear layer by type, or a base layer whose weight a registered stored-weight family reads."""
    return isinstance(module, linear_types()) or stored_weight(module) is not None


def _is_adapter_wrapper(module: nn.Module) -> bool:
    # Duck-typed (base.py imports this module): an adapter layer or a ModulesToSaveWrapper.
    return (
        hasattr(module, "base_layer")
        and hasattr(module, "adapter_containers")
        or hasattr(module, "original_module")
    )


def _linear_paths(model: nn.Module) -> list[str]:
    """Paths of the model's linear layers, an adapter layer over a linear base counting as one
    (its inner modules, e.g. ``lora_A.<name>``, never do)."""
    wrappers = [n for n, m in model.named_modules() if n and _is_adapter_wrapper(m)]
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        base = getattr(module, "base_layer", None) if _is_adapter_wrapper(module) else module
        if base is not None and is_linear(base):
            out.append(name)
    return out


def all_linear_targets(model: nn.Module, task_type: str | None = None) -> list[str]:
    """Full paths that ``target_modules="all-linear"`` hits: every linear layer but the output head.

    As in PEFT: a transformers model leaves out its output embeddings (``get_output_embeddings``,
    e.g. ``lm_head``), or, having none, for ``task_type="SEQ_CLS"`` its ``score`` / ``classifier``
    head. Every other linear layer is a target (BERT's ``output.dense`` and ``pooler.dense`` too,
    and a plain torch model's last layer).
    """
    from transformers import PreTrainedModel

    exclude: set[str] = set()
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and task_type == "SEQ_CLS":
            head = next(
                (getattr(model, n) for n in _SEQ_CLS_HEADS if getattr(model, n, None) is not None), None
            )
        if head is not None:
            exclude |= {n for n, m in model.named_modules() if m is head}
    return [n for n in _linear_paths(model) if n not in exclude]


def fallback_targets(model: nn.Module) -> list[str]:
    """Targets for an architecture with no default: the linear layers of the attention and MLP
    blocks, never an output or task head (nor a plain torch model's last linear layer)."""
    paths = _linear_paths(model)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    heads = {n for n, m in model.named_modules() if head is not None and m is head}
    heads |= {p for p in paths if p.split(".")[-1] in _HEAD_NAMES}
    if not hasattr(model, "config") and paths:
        heads.add(paths[-1])
    return [p for p in paths if p not in heads]


def _under(key: str, names: Iterable[str]) -> bool:
    """True when ``key`` is one of the modules ``names`` (full paths or path suffixes) or inside one."""
    parts = key.split(".")
    for name in names:
        n = len(name.split("."))
        if any(".".join(parts[i : i + n]) == name for i in range(len(parts) - n + 1)):
            return True
    return False


def _layer_index(key: str, patterns: Iterable[str]) -> int | None:
    for pattern in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", key)
        if m:
            return int(m.group(1))
    return None


def name_matches(key: str, targets: str | Iterable[str] | None) -> bool:
    """True when module path ``key`` is hit by ``targets`` (regex string or list of names)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def find_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] | None,
    *,
    exclude_modules: str | Iterable[str] | None = None,
    layers_to_transform: int | Iterable[int] | None = None,
    layers_pattern: str | Iterable[str] | None = None,
    defaults: Mapping[str, list[str] | str] | None = None,
    accept: Callable[[str, nn.Module], bool] | None = None,
    method: str = "this method",
    modules_to_save: Iterable[str] | None = None,
    task_type: str | None = None,
) -> list[str]:
    """Return the paths of the modules a config targets, or raise an error that teaches.

    ``accept`` filters out modules of types the method cannot adapt (still counted as a match
    for the 'matched nothing' check, so the error can say the type is the problem).
    A module in ``modules_to_save`` (or inside one) is never a target: it is trained whole, and
    an adapter inside its copy would conflict with it (PEFT's rule). A target the user names by
    its full module path is taken whatever ``layers_to_transform`` says (also PEFT's rule), so
    e.g. ``["q_proj", "lm_head"]`` with ``layers_to_transform=[1]`` still adapts ``lm_head``.
    """
    exact: set[str] = set()
    if target_modules is None:
        mtype = model_type(model)
        if defaults is not None and mtype is not None and mtype in defaults:
            target_modules = defaults[mtype]
        else:
            target_modules = fallback_targets(model)
    elif target_modules == "all-linear":
        target_modules = all_linear_targets(model, task_type)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
        exact = set(target_modules)
    saved = list(modules_to_save or [])

    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    patterns = (
        [layers_pattern]
        if isinstance(layers_pattern, str)
        else list(layers_pattern or DEFAULT_LAYERS_PATTERNS)
    )

    matched: list[str] = []
    rejected: list[tuple[str, str]] = []
    covered: list[str] = []  # targets skipped because modules_to_save trains them whole
    for key, module in model.named_modules():
        if not key or not name_matches(key, target_modules):
            continue
        if exclude_modules is not None and name_matches(key, exclude_modules):
            continue
        if saved and _under(key, saved):
            covered.append(key)
            continue
        if layers_to_transform is not None and key not in exact:
            idx = _layer_index(key, patterns)
            if idx is None or idx not in layers_to_transform:
                continue
        if accept is not None and not accept(key, module):
            rejected.append((key, type(module).__name__))
            continue
        matched.append(key)

    if not matched:
        if covered and not rejected:
            raise ValueError(
                f"target_modules={_show(target_modules)} matched only modules inside modules_to_save "
                f"({_show(saved)}: e.g. {covered[0]!r}), which are trained whole and so get no adapter. "
                "Target other modules, or drop them from modules_to_save."
            )
        if rejected:
            kinds = sorted({k for _, k in rejected})
            raise ValueError(
                f"target_modules={_show(target_modules)} matched {len(rejected)} module(s), but of "
                f"type(s) {kinds} that {method} cannot adapt (e.g. {rejected[0][0]!r}). "
                "Target the linear layers inside them instead."
            )
        raise ValueError(no_match_message(model, target_modules, layers_to_transform))
    return matched


def resolved_targets(model: nn.Module, asked: str | list[str] | None, paths: list[str]) -> str | list[str]:
    """What to write as ``target_modules`` in a saved config so that any reader hits ``paths``.

    A regex or an explicit list is kept as the user wrote it; defaults and ``all-linear`` are
    written out: as leaf names when those hit exactly ``paths``, else as full module paths.
    """
    if isinstance(asked, list) or (isinstance(asked, str) and asked != "all-linear"):
        return asked
    leaves = sorted({p.split(".")[-1] for p in paths})
    hit = [n for n, _ in model.named_modules() if n and name_matches(n, leaves)]
    return leaves if sorted(hit) == sorted(paths) else sorted(paths)


def _show(targets: object) -> str:
    if isinstance(targets, list) and len(targets) > 8:
        return repr(targets[:8])[:-1] + ", ...]"
    return repr(targets)


def no_match_message(model: nn.Module, targets: object, layers: object = None) -> str:
    leaf_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and is_linear(m)})
    asked = [targets] if isinstance(targets, str) else list(targets or [])  # type: ignore[call-overload]
    close: list[str] = []
    for t in asked:
        leaf = str(t).split(".")[-1]
        close += [n for n in leaf_names if n.startswith(leaf) or leaf.startswith(n)]
        close += difflib.get_close_matches(leaf, leaf_names, n=4, cutoff=0.5)
    hint = f" Modules that look close: {sorted(set(close))}." if close else ""
    layer_hint = f" (restricted to layers {layers})" if layers is not None else ""
    return (
        f"target_modules={_show(targets)}{layer_hint} matched no module of the model.{hint} "
        f"The model's linear layers are named: {leaf_names}. Pass some of those, a regex that "
        "fully matches module paths, or 'all-linear'."
    )
