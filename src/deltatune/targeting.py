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
from collections.abc import Callable, Iterable

from torch import nn

# The ecosystem's defaults (what PEFT picks), so that a config with no targets means the
# same thing here and there.
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "electra": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
}

# Layer index patterns for ``layers_to_transform`` (model.layers.3, transformer.h.3, ...).
DEFAULT_LAYERS_PATTERNS = ["layers", "h", "block", "blocks", "layer"]

# Heads that the fallback never targets.
_HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "embed_out", "output"}


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def linear_types() -> tuple[type, ...]:
    """Module types that count as 'linear' for ``all-linear`` and the fallback."""
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [nn.Linear, Conv1D]
    try:  # 4-bit layers of our own and of bitsandbytes are linear layers too
        from deltatune.quant.nf4 import Linear4bit

        types.append(Linear4bit)
    except ImportError:
        pass
    # bitsandbytes layers exist only if the user already imported it (importing it here is
    # slow and noisy on machines without its kernels).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def _output_head_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        if name.split(".")[-1] in _HEAD_NAMES:
            names.add(name)
    if not hasattr(model, "config"):
        # A plain torch model: its last linear layer is its output head.
        linears = [n for n, m in model.named_modules() if isinstance(m, linear_types())]
        if linears:
            names.add(linears[-1])
    return names


def all_linear_targets(model: nn.Module) -> list[str]:
    """Full paths of every linear layer except the output / task heads."""
    heads = _output_head_names(model)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, linear_types()) or not name:
            continue
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        out.append(name)
    return out


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
    defaults: dict[str, list[str]] | None = None,
    accept: Callable[[str, nn.Module], bool] | None = None,
    method: str = "this method",
) -> list[str]:
    """Return the paths of the modules a config targets, or raise an error that teaches.

    ``accept`` filters out modules of types the method cannot adapt (still counted as a match
    for the 'matched nothing' check, so the error can say the type is the problem).
    """
    if target_modules is None:
        mtype = model_type(model)
        if defaults is not None and mtype in defaults:
            target_modules = defaults[mtype]
        else:
            target_modules = all_linear_targets(model)
    elif target_modules == "all-linear":
        target_modules = all_linear_targets(model)

    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    patterns = (
        [layers_pattern]
        if isinstance(layers_pattern, str)
        else list(layers_pattern or DEFAULT_LAYERS_PATTERNS)
    )

    matched: list[str] = []
    rejected: list[tuple[str, str]] = []
    for key, module in model.named_modules():
        if not key or not name_matches(key, target_modules):
            continue
        if exclude_modules is not None and name_matches(key, exclude_modules):
            continue
        if layers_to_transform is not None:
            idx = _layer_index(key, patterns)
            if idx is None or idx not in layers_to_transform:
                continue
        if accept is not None and not accept(key, module):
            rejected.append((key, type(module).__name__))
            continue
        matched.append(key)

    if not matched:
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
    leaf_names = sorted(
        {n.split(".")[-1] for n, m in model.named_modules() if n and isinstance(m, linear_types())}
    )
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
